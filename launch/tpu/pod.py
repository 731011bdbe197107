r"""Cloud TPU VM commands for realm-jax: create slices, install, start the trainer and the refresher.

  python launch/tpu/pod.py --name=realm --zone=europe-west4-a --accelerator=v3-64 \
    --refresh_accelerator=v3-16 --workdir=gs://BUCKET/realm --job=pretrain \
    --gin_file=gin/models/bert_base.gin --run_gin=gin/runs/realm_pretrain.gin \
    --block_store=gs://BUCKET/blocks --dry_run

Every host of a slice runs the same launcher (`--worker=all`) with `--coordinator_address=auto`;
the trainer and the refresher share only `--workdir` (see WORKSPACE.md).  --gin_file/--gin_bindings reach both
jobs, --run_gin/--run_bindings the trainer only, --refresh_gin/--refresh_bindings the refresher only (e.g.
--refresh_gin=gin/ablations/slow_refresh.gin, Table 2's "30x stale MIPS").  Block stores are memory-mapped
from local disk: the `stage` step copies --block_store (from `launch/build_blocks.py --out=gs://...`) to
--local_block_store on every host of both slices (`launch/stage_blocks.py`, a verified copy), and both jobs
get `BLOCK_STORE = '<local_block_store>'`.  A separate query corpus (gin/runs/realm_pretrain_separate_corpora.gin)
is staged the same way, on the trainer's hosts only, from --query_store to --local_query_store, and the trainer
gets `QUERY_STORE = '<local_query_store>'`.  `--dry_run` prints the commands instead of running them.
"""

from __future__ import annotations

import re
import shlex
import subprocess

from absl import app, flags

from launch import cli

_NAME = flags.DEFINE_string("name", "realm", "TPU VM name prefix (trainer: NAME, refresher: NAME-refresh).")
_ZONE = flags.DEFINE_string("zone", "europe-west4-a", "GCE zone.")
_PROJECT = flags.DEFINE_string("project", None, "GCP project (default: gcloud's).")
_ACCELERATOR = flags.DEFINE_string("accelerator", "v3-64", "Trainer slice (paper: 64 TPUs to train).")
_REFRESH_ACCELERATOR = flags.DEFINE_string("refresh_accelerator", "v3-16", "Refresher slice (paper: 16 TPUs).")
_VERSION = flags.DEFINE_string("runtime_version", "tpu-ubuntu2204-base", "TPU VM software version.")
_REPO_URL = flags.DEFINE_string("repo_url", "https://github.com/OWNER/realm-jax.git", "Where hosts clone realm-jax.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Shared run directory (gs://...).", required=True)
_JOB = flags.DEFINE_enum("job", "pretrain", ["ict", "pretrain"], "Trainer launcher to run.")
_GIN_FILES = flags.DEFINE_multi_string("gin_file", [], "Model gin files (trainer and refresher).")
_RUN_GIN = flags.DEFINE_multi_string("run_gin", [], "Run gin files of the trainer (e.g. gin/runs/realm_pretrain.gin).")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings for both jobs.")
_RUN_BINDINGS = flags.DEFINE_multi_string("run_bindings", [], "Gin bindings for the trainer only.")
_REFRESH_GIN = flags.DEFINE_multi_string("refresh_gin", [], "Gin files of the refresher only, after "
                                         "gin/runs/refresh.gin (e.g. gin/ablations/slow_refresh.gin).")
_REFRESH_BINDINGS = flags.DEFINE_multi_string("refresh_bindings", [], "Gin bindings for the refresher only.")
_BLOCK_STORE = flags.DEFINE_string("block_store", None, "Block store on GCS (gs://BUCKET/blocks), staged to "
                                   "--local_block_store on every host; without it, bind a local BLOCK_STORE.")
_LOCAL_BLOCK_STORE = flags.DEFINE_string("local_block_store", "/tmp/realm-jax-blocks",
                                         "Where every host stages --block_store; the jobs' BLOCK_STORE.")
_QUERY_STORE = flags.DEFINE_string("query_store", None, "Query corpus block store on GCS, staged to "
                                   "--local_query_store on every trainer host (the trainer's QUERY_STORE).")
_LOCAL_QUERY_STORE = flags.DEFINE_string("local_query_store", "/tmp/realm-jax-query-blocks",
                                         "Where every trainer host stages --query_store.")
STEPS = ["create", "install", "stage", "train", "refresh"]
_STEPS = flags.DEFINE_multi_enum("step", STEPS, STEPS, "Which commands to issue (always in this order; stage "
                                 "only with --block_store or --query_store).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")


def _gcloud(*args: str) -> list[str]:
  command = ["gcloud", "compute", "tpus", "tpu-vm", *args, f"--zone={_ZONE.value}"]
  if _PROJECT.value:
    command.append(f"--project={_PROJECT.value}")
  return command


def _on_all_workers(vm: str, shell: str) -> list[str]:
  return _gcloud("ssh", vm, "--worker=all", f"--command={shell}")


def _check_block_store_flags() -> None:
  """Jobs read local block stores: a gs:// BLOCK_STORE / QUERY_STORE binding, or one beside its flag, is refused."""
  for macro, flag, local in (("BLOCK_STORE", _BLOCK_STORE, _LOCAL_BLOCK_STORE),
                             ("QUERY_STORE", _QUERY_STORE, _LOCAL_QUERY_STORE)):
    bound = [b for b in [*_GIN_BINDINGS.value, *_RUN_BINDINGS.value, *_REFRESH_BINDINGS.value]
             if re.match(rf"\s*{macro}\s*=", b)]
    if flag.value and bound:
      raise app.UsageError(f"--{flag.name}={flag.value} and the binding {bound[0]!r}: give one of them")
    if any("gs://" in b for b in bound):
      raise app.UsageError(f"{bound[0]!r}: a block store is memory-mapped from each host's disk; pass "
                           f"--{flag.name}=gs://... instead, which the stage step copies to --{local.name}")
    if "://" in local.value:
      raise app.UsageError(f"--{local.name}={local.value} must be a directory on each host's disk")
  if _QUERY_STORE.value and _JOB.value != "pretrain":
    raise app.UsageError(f"--query_store: only REALM pre-training (--job=pretrain) reads a query corpus, not "
                         f"--job={_JOB.value}")


def _block_store_binding() -> list[str]:
  return [f"BLOCK_STORE = {_LOCAL_BLOCK_STORE.value!r}"] if _BLOCK_STORE.value else []


def _stage(source: str, dest: str) -> str:
  return "cd ~/realm-jax && .venv/bin/python " + shlex.join(
      ["launch/stage_blocks.py", f"--source={source}", f"--dest={dest}"])


def _launcher(script: str, run_gins: list[str], extra_bindings: list[str]) -> str:
  args = [f"--gin_file={f}" for f in [*_GIN_FILES.value, *run_gins]]
  args += [f"--gin_bindings={b}" for b in [*_GIN_BINDINGS.value, *extra_bindings, *_block_store_binding()]]
  args += [f"--workdir={_WORKDIR.value}", "--coordinator_address=auto"]
  log = "~/" + script.split("/")[-1].replace(".py", ".log")
  return f"cd ~/realm-jax && nohup .venv/bin/python {shlex.join([script, *args])} > {log} 2>&1 &"


def pod_commands() -> list[list[str]]:
  """The gcloud commands for the selected steps, in order."""
  _check_block_store_flags()
  trainer_vm, refresh_vm = _NAME.value, f"{_NAME.value}-refresh"
  install = (f"git clone {_REPO_URL.value} ~/realm-jax || (cd ~/realm-jax && git pull); cd ~/realm-jax && "
             "bash scripts/setup_venv.sh && .venv/bin/pip install -q 'jax[tpu]==0.10.2'")
  commands = []
  for step in [s for s in STEPS if s in _STEPS.value]:
    if step == "create":
      for vm, accelerator in ((trainer_vm, _ACCELERATOR.value), (refresh_vm, _REFRESH_ACCELERATOR.value)):
        commands.append(_gcloud("create", vm, f"--accelerator-type={accelerator}", f"--version={_VERSION.value}"))
    elif step == "install":
      commands += [_on_all_workers(trainer_vm, install), _on_all_workers(refresh_vm, install)]
    elif step == "stage":
      if _BLOCK_STORE.value:
        stage = _stage(_BLOCK_STORE.value, _LOCAL_BLOCK_STORE.value)
        commands += [_on_all_workers(trainer_vm, stage), _on_all_workers(refresh_vm, stage)]
      if _QUERY_STORE.value:  # only the trainer reads the query corpus
        commands.append(_on_all_workers(trainer_vm, _stage(_QUERY_STORE.value, _LOCAL_QUERY_STORE.value)))
    elif step == "train":
      queries = [f"QUERY_STORE = {_LOCAL_QUERY_STORE.value!r}"] if _QUERY_STORE.value else []
      trainer = _launcher(f"launch/{_JOB.value}.py", _RUN_GIN.value, [*_RUN_BINDINGS.value, *queries])
      commands.append(_on_all_workers(trainer_vm, trainer))
    elif step == "refresh":
      # The refresher reads what to embed with (tower, block length, ...) from the trainer's <workdir>/retriever.json.
      refresh = _launcher("launch/refresh_index.py", ["gin/runs/refresh.gin", *_REFRESH_GIN.value],
                          _REFRESH_BINDINGS.value)
      commands.append(_on_all_workers(refresh_vm, refresh))
  return commands


def main(argv):
  del argv
  for command in pod_commands():
    if _DRY_RUN.value:
      print(shlex.join(command))
    else:
      subprocess.run(command, check=True)


if __name__ == "__main__":
  cli.run(main)
