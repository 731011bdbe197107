r"""Expands a set of gin variants into REALM pre-training runs: locally in sequence, or as TPU pod commands.

  python launch/sweep.py --gin_file=gin/models/realm_demo.gin --run_gin=gin/runs/realm_pretrain_demo.gin \
    --variant=baseline= --variant=no_retrieval=gin/ablations/no_retrieval.gin \
    --variant=random_masks=gin/ablations/random_token_masking.gin \
    --variant="lr_1e3=optimizer.OptimizerConfig.learning_rate = 1e-3" \
    --workdir_root=workdir/sweep --mode=local

A variant with queries from a corpus of its own (X != Z, gin/runs/realm_pretrain_separate_corpora.gin) binds the
trainer's QUERY_STORE: --variant="x_ne_z=QUERY_STORE = 'workdir/demo_xz/query_blocks'" (retrieval stays on the
sweep's BLOCK_STORE, which the refresher embeds); in --mode=tpu, --query_store=gs://... is staged by every pod.

A variant is NAME=ITEM;ITEM;... where an item ending in .gin is a gin file and anything else a
binding.  A variant's items, like --run_bindings, reach the trainer only, and those written
`refresher:ITEM` the refresher only (after gin/runs/refresh.gin; e.g.
--variant=stale_mips=refresher:gin/ablations/slow_refresh.gin); --gin_bindings reach both.  Local mode
runs, per variant, the trainer and (unless the variant disables retrieval) a refresher beside it, each in
its own workdir `<workdir_root>/<NAME>` with its output in `trainer.log` / `refresher.log` there, then
prints a results table; with `--baseline=NAME` (and held-out blocks,
`realm_data.RealmDataConfig.eval_blocks`) also each variant's held-out loss minus the baseline's on the
same queries, with its standard error over those queries (a second seed is what measures training
noise).  With held-out evaluations it also writes `<workdir_root>/report.md` (each variant's held-out loss at every
evaluated step, ± its standard error over queries, then the lines above) and `heldout_loss.png` (the same as a
plot).  Rerunning the same command resumes each variant from its checkpoints (a finished one is not retrained)
and appends to its logs.  `--mode=tpu` prints the `launch/tpu/pod.py --dry_run` command of each variant instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from absl import app, flags

from launch import cli
from realm_jax import storage
from realm_jax.errors import InputError

_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Model gin files (trainer and refresher).")
_RUN_GIN = flags.DEFINE_multi_string("run_gin", [], "Trainer run gin files.")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Bindings for every variant (trainer and refresher).")
_RUN_BINDINGS = flags.DEFINE_multi_string("run_bindings", [], "Bindings for every variant's trainer only.")
_VARIANTS = flags.DEFINE_multi_string("variant", [], "NAME=ITEM;ITEM;... (gin files or bindings).")
_ROOT = flags.DEFINE_string("workdir_root", "workdir/sweep", "Each variant runs in <root>/<NAME>.")
_MODE = flags.DEFINE_enum("mode", "local", ["local", "tpu"], "Run locally in sequence, or print pod commands.")
_BASELINE = flags.DEFINE_string("baseline", None, "Variant whose final held-out evaluation the others are compared "
                                 "with, query by query (local mode).")
_DEVICES = flags.DEFINE_integer("local_devices", 1, "JAX_NUM_CPU_DEVICES for each local process.")
_POD_BLOCK_STORE = flags.DEFINE_string("block_store", None, "--mode=tpu: the gs:// block store that each pod "
                                       "stages on every host (launch/tpu/pod.py --block_store).")
_POD_QUERY_STORE = flags.DEFINE_string("query_store", None, "--mode=tpu: a gs:// query-corpus block store that "
                                       "each pod stages on its trainer hosts (launch/tpu/pod.py --query_store).")

REPO = Path(__file__).resolve().parents[1]
REFRESHER = "refresher:"  # a variant item for the refresher


@dataclasses.dataclass(frozen=True)
class Variant:
  """A variant's gin files and bindings: the trainer's, and its refresher's (`refresher:` items)."""

  name: str
  files: list[str]
  bindings: list[str]
  refresher_files: list[str]
  refresher_bindings: list[str]


def parse_variant(spec: str) -> Variant:
  """'NAME=a.gin;x.y = 1;refresher:b.gin' -> Variant(NAME, [a.gin], [x.y = 1], [b.gin], [])."""
  name, sep, body = spec.partition("=")
  if not sep or not name.isidentifier():
    raise InputError(f"--variant {spec!r}: expected NAME=ITEM;ITEM;... with NAME a plain identifier")
  items = [item.strip() for item in body.split(";") if item.strip()]
  refresher = [item[len(REFRESHER):].strip() for item in items if item.startswith(REFRESHER)]
  trainer = [item for item in items if not item.startswith(REFRESHER)]
  for file in [item for item in trainer + refresher if item.endswith(".gin")]:
    if not (REPO / file).is_file() and not Path(file).is_file():
      raise FileNotFoundError(f"--variant {name}: gin file {file} not found")
  files = lambda group: [item for item in group if item.endswith(".gin")]  # noqa: E731
  bindings = lambda group: [item for item in group if not item.endswith(".gin")]  # noqa: E731
  return Variant(name, files(trainer), bindings(trainer), files(refresher), bindings(refresher))


def gin_args(files: list[str], bindings: list[str]) -> list[str]:
  return [f"--gin_file={f}" for f in files] + [f"--gin_bindings={b}" for b in bindings]


def uses_retrieval(files: list[str], bindings: list[str]) -> bool:
  text = "\n".join([*(Path(REPO / f).read_text() for f in files), *bindings])
  return "retrieval = False" not in text


def check_variant(variant: Variant) -> None:
  """Parses the variant's trainer and refresher configs (a bad one fails before any variant runs) and checks its
  workdir (new, empty or a realm-jax run directory)."""
  import gin  # the configurables are registered by the gin files themselves (dynamic registration)

  name, retrieval = variant.name, uses_retrieval(variant.files, variant.bindings)
  staged = [f"BLOCK_STORE = {'/staged/by/pod.py'!r}"] if _POD_BLOCK_STORE.value else []  # pod.py binds it
  trainer_staged = [f"QUERY_STORE = {'/staged/by/pod.py'!r}"] if _POD_QUERY_STORE.value else []
  if not retrieval and (variant.refresher_files or variant.refresher_bindings):
    raise InputError(f"--variant {name}: has {REFRESHER} items, but retrieval is off: no refresher runs")
  try:
    cli.parse_gin([*_GIN_FILES.value, *_RUN_GIN.value, *variant.files], [*_GIN_BINDINGS.value, *variant.bindings,
                                                                        *staged, *trainer_staged])
    if retrieval:
      gin.clear_config()
      cli.parse_gin(refresher_files(variant), [*_GIN_BINDINGS.value, *variant.refresher_bindings, *staged])
  except InputError as e:
    raise InputError(f"--variant {name}: {e}") from e
  finally:
    gin.clear_config()
  if _MODE.value == "local":
    cli.check_workdir(storage.as_path(_ROOT.value) / name)


def refresher_files(variant: Variant) -> list[str]:
  """The refresher's gin files: the model gins, the refresh job's, the variant's."""
  return [*_GIN_FILES.value, "gin/runs/refresh.gin", *variant.refresher_files]


def run_local(variant: Variant) -> dict:
  name = variant.name
  workdir = storage.as_path(_ROOT.value) / name
  env = {"JAX_NUM_CPU_DEVICES": str(_DEVICES.value), "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}
  # What gs:// workdirs need: credentials (application default ones live under HOME) or an emulator.
  env.update({k: v for k, v in os.environ.items() if k in ("HOME", "GOOGLE_APPLICATION_CREDENTIALS",
                                                           "STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")})
  trainer_args = gin_args([*_GIN_FILES.value, *_RUN_GIN.value, *variant.files],
                          [*_GIN_BINDINGS.value, *variant.bindings]) + [f"--workdir={workdir}"]
  refresher_args = gin_args(refresher_files(variant), [*_GIN_BINDINGS.value, *variant.refresher_bindings])
  storage.check_writable(workdir)
  # Process output goes to local files (a pipe left undrained would block its writer), copied into a gs:// workdir.
  log_dir = storage.as_path(tempfile.mkdtemp(prefix=f"sweep-{name}-")) if storage.is_remote(workdir) else workdir
  trainer_log, refresher_log = log_dir / "trainer.log", log_dir / "refresher.log"
  with_refresher = uses_retrieval(variant.files, variant.bindings)
  print(f"variant {name}: logs in {trainer_log}" + (f" and {refresher_log}" if with_refresher else ""), flush=True)
  # Files, not pipes: an undrained pipe would block the process writing to it.
  with contextlib.ExitStack() as stack:
    # Appended: a rerun resumes the variant from its checkpoints (a finished one prints so) and keeps earlier logs.
    trainer_out = stack.enter_context(open(trainer_log, "a"))
    trainer = subprocess.Popen([sys.executable, "launch/pretrain.py", *trainer_args], cwd=REPO, env=env,
                               stdout=trainer_out, stderr=subprocess.STDOUT, text=True)
    refresher = None
    if with_refresher:
      refresher_out = stack.enter_context(open(refresher_log, "a"))
      refresher = subprocess.Popen(
          [sys.executable, "launch/refresh_index.py", *refresher_args, f"--workdir={workdir}", "--poll_seconds=2"],
          cwd=REPO, env=env, stdout=refresher_out, stderr=subprocess.STDOUT, text=True,
      )
    trainer.wait()
    if refresher:
      refresher.wait()
  if storage.is_remote(workdir):
    for log in (trainer_log, refresher_log):
      if log.exists():
        storage.write_once(workdir / log.name, log.read_bytes())
  if trainer.returncode:
    raise RuntimeError(f"variant {name}: trainer exited with {trainer.returncode}; see {trainer_log}")
  if refresher and refresher.returncode:
    raise RuntimeError(f"variant {name}: refresher exited with {refresher.returncode}; see {refresher_log}")
  finished = [line for line in trainer_log.read_text().splitlines() if line.startswith("REALM pre-training finished")]
  if not finished:
    raise RuntimeError(f"variant {name}: no 'REALM pre-training finished' line in {trainer_log}")
  summary = finished[-1]
  return {"variant": name, "summary": summary}


def main(argv):
  del argv
  variants = [dataclasses.replace(v, bindings=[*_RUN_BINDINGS.value, *v.bindings])
              for v in map(parse_variant, _VARIANTS.value)]
  if not variants:
    raise app.UsageError("give at least one --variant")
  for flag in (_POD_BLOCK_STORE, _POD_QUERY_STORE):
    if flag.value and _MODE.value != "tpu":
      raise app.UsageError(f"--{flag.name} is staged by each pod (--mode=tpu); a local sweep reads local stores: "
                           f"bind {'BLOCK_STORE' if flag is _POD_BLOCK_STORE else 'QUERY_STORE'} instead")
  names = [v.name for v in variants]
  if _BASELINE.value and (_MODE.value != "local" or _BASELINE.value not in names):
    raise app.UsageError(f"--baseline={_BASELINE.value} needs --mode=local and one of the variants {names}")
  for variant in variants:
    check_variant(variant)
  results = []
  for v in variants:
    if _MODE.value == "tpu":
      command = ["python", "launch/tpu/pod.py", f"--name=realm-{v.name.replace('_', '-')}",
                 f"--workdir={_ROOT.value}/{v.name}", *gin_args(_GIN_FILES.value, _GIN_BINDINGS.value),
                 *[f"--run_gin={f}" for f in [*_RUN_GIN.value, *v.files]],
                 *[f"--run_bindings={b}" for b in v.bindings],
                 *[f"--refresh_gin={f}" for f in v.refresher_files],
                 *[f"--refresh_bindings={b}" for b in v.refresher_bindings],
                 *([f"--block_store={_POD_BLOCK_STORE.value}"] if _POD_BLOCK_STORE.value else []),
                 *([f"--query_store={_POD_QUERY_STORE.value}"] if _POD_QUERY_STORE.value else []), "--dry_run"]
      print(shlex.join(command))
    else:
      results.append(run_local(v))
      print(json.dumps(results[-1]))
  lines = [f"{r['variant']:>20}: {r['summary']}" for r in results]
  if results and _BASELINE.value:
    lines += paired_differences(names, _BASELINE.value)
  print("\n".join(lines))
  if results:
    from realm_jax.eval import sweep_report  # JAX: only when there is something to report

    for path in sweep_report.write_report(_ROOT.value, names, lines):
      print(f"wrote {path}")


def paired_differences(names: list[str], baseline: str) -> list[str]:
  """Each variant's final held-out loss minus the baseline's, over the same queries: one line per variant."""
  from realm_jax.eval import realm_mlm  # JAX: only when there is something to compare

  lines = []
  for name in names:
    if name == baseline:
      continue
    try:
      reference = realm_mlm.load_eval(storage.as_path(_ROOT.value) / baseline)
      evaluation = realm_mlm.load_eval(storage.as_path(_ROOT.value) / name)
      d = realm_mlm.paired_difference(evaluation, reference)
    except (OSError, ValueError) as e:
      lines.append(f"{name:>20}: not comparable with {baseline}: {e}")
      continue
    steps = f"step {evaluation['step']} vs {reference['step']}"
    lines.append(f"{name:>20}: held-out loss minus {baseline}'s {d['loss_difference']:+.4f} +- "
                 f"{d['standard_error']:.4f} s.e. over queries ({steps}, {d['queries']:.0f} queries, "
                 f"{d['masks']:.0f} masks; better on {d['queries_better']:.0%} of queries, worse on "
                 f"{d['queries_worse']:.0%})")
  return lines


if __name__ == "__main__":
  cli.run(main)
