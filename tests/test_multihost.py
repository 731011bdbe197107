"""A pod on one machine: 2 trainer processes x 4 CPU devices (jax.distributed) and a refresher process sharing a
gs:// run directory on a real GCS server, the block store built to gs:// and staged to each "host".

REALM pre-training with the refresher beside it hot-swaps the bootstrap index and the refresher's indexes (at
steps fixed by `max_index_staleness = checkpoint_every`, so runs are comparable); killed (trainer and refresher,
a preempted pod) and resumed, it ends where the uninterrupted 1-process run on local disk ends, held-out
evaluation included.  The 2-process refresh job publishes the embeddings one process computes.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import DEMO_ENTITIES, DEMO_PASSAGES, REPO, subprocess_env
from etils import epath

from realm_jax.data.blocks import BlockStore
from realm_jax.eval.realm_mlm import load_eval

STEPS = 6
PASSAGES = 500  # a slice of the demo corpus: every refresh re-embeds all its blocks


def realm_args(store, workdir):
  return ["launch/pretrain.py", "--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/realm_pretrain_demo.gin",
          f"--gin_bindings=BLOCK_STORE = '{store}'", f"--gin_bindings=NUM_STEPS = {STEPS}",
          "--gin_bindings=BATCH_SIZE = 8", "--gin_bindings=trainer.TrainerConfig.checkpoint_every = 2",
          # A step waits for the index of the previous checkpoint: every run swaps the same indexes at the same steps.
          "--gin_bindings=live_index.LiveIndexConfig.max_staleness = 2",
          "--gin_bindings=live_index.LiveIndexConfig.poll_seconds = 0.2",
          "--gin_bindings=trainer.TrainerConfig.log_every = 1", "--gin_bindings=trainer.TrainerConfig.eval_every = 2",
          "--gin_bindings=realm_data.RealmDataConfig.eval_blocks = 12", f"--workdir={workdir}"]


def refresher_args(store, workdir, *extra):
  return ["launch/refresh_index.py", "--gin_file=gin/runs/refresh.gin", f"--block_store={store}",
          "--gin_bindings=refresher.RefreshJob.batch_size = 64", "--poll_seconds=0.2", f"--workdir={workdir}",
          "--gin_bindings=refresher.run_refresh.compilation_cache_dir = None", *extra]


def two_processes(args, **kwargs):
  command = [sys.executable, "launch/local_multihost.py", "--num_processes=2", "--devices_per_process=4", "--", *args]
  return subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, **kwargs)


def refresher(store, workdir, log):
  return subprocess.Popen([sys.executable, *refresher_args(store, workdir)], cwd=REPO,
                          env=subprocess_env(JAX_NUM_CPU_DEVICES="4"), stdout=log, stderr=subprocess.STDOUT,
                          start_new_session=True)


def final_loss(stdout):
  return [float(x) for x in re.findall(r"finished at step \d+: loss ([\d.]+)", stdout)]


def swapped(log):
  return sorted({int(s) for s in re.findall(r"swapped in index step (\d+)", log)})


def restored_state(workdir, step):
  path = os.fspath(epath.Path(workdir) / "train" / str(step) / "state")
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  return checkpointer.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))


@pytest.fixture(scope="module")
def gcs_store(gcs_server, tmp_path_factory):
  """A block store built straight to gs:// (launch/build_blocks.py), staged to two local "hosts"."""
  root = tmp_path_factory.mktemp("gcs_store")
  for source, name in ((DEMO_PASSAGES, "p.jsonl"), (DEMO_ENTITIES, "e.jsonl")):
    (root / name).write_text("\n".join(source.read_text().splitlines()[:PASSAGES]) + "\n")
  bucket = gcs_server.create_bucket("multihost")
  remote = f"{bucket}/blocks"
  env = subprocess_env()
  build = subprocess.run([sys.executable, "launch/build_blocks.py", f"--passages={root / 'p.jsonl'}",
                          f"--entities={root / 'e.jsonl'}", f"--out={remote}"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=600)
  assert build.returncode == 0, build.stderr[-3000:]
  staged = {}
  for host in ("trainer_host", "refresher_host"):
    stage = subprocess.run([sys.executable, "launch/stage_blocks.py", f"--source={remote}", f"--dest={root / host}"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert stage.returncode == 0, stage.stderr[-3000:]
    staged[host] = BlockStore(root / host)
  return bucket, staged


@pytest.fixture(scope="module")
def one_process_run(gcs_store, tmp_path_factory):
  """The uninterrupted reference: 1 trainer process x 8 devices and its refresher, on local disk."""
  _, staged = gcs_store
  workdir = tmp_path_factory.mktemp("one_process") / "realm"
  with open(workdir.parent / "refresher.log", "w") as log:
    refresh = refresher(staged["refresher_host"].path, workdir, log)
    result = subprocess.run([sys.executable, *realm_args(staged["trainer_host"].path, workdir)], cwd=REPO,
                            env=subprocess_env(JAX_NUM_CPU_DEVICES="8"), capture_output=True, text=True, timeout=900)
    refresh.wait(timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert refresh.returncode == 0, (workdir.parent / "refresher.log").read_text()[-3000:]
  assert swapped(result.stderr) == [0, 2, 4]
  return workdir, final_loss(result.stdout)


def test_two_processes_and_a_refresher_on_gcs_killed_and_resumed_end_like_one_process(gcs_store, one_process_run,
                                                                                      tmp_path):
  from gcs import local_gs_entries

  bucket, staged = gcs_store
  reference, reference_loss = one_process_run
  workdir = epath.Path(f"{bucket}/run")
  trainer_store, refresher_store = staged["trainer_host"].path, staged["refresher_host"].path
  with open(tmp_path / "refresher_1.log", "w") as log:
    refresh = refresher(refresher_store, workdir, log)
    run = two_processes(realm_args(trainer_store, workdir), start_new_session=True)
    deadline, first_refresh = time.monotonic() + 600, workdir / "index" / "commits" / "2.json"
    while not first_refresh.exists() and run.poll() is None and time.monotonic() < deadline:
      time.sleep(0.2)
    for process in (run, refresh):  # a preempted pod: the launcher, both trainer processes and the refresher
      os.killpg(process.pid, signal.SIGKILL)
    _, first_err = run.communicate()
    refresh.wait()
  assert not (workdir / "TRAINING_DONE").exists(), "killed too late: the run had finished"
  assert swapped(first_err) and "swapped in index step 0" in first_err

  with open(tmp_path / "refresher_2.log", "w") as log:
    refresh = refresher(refresher_store, workdir, log)
    resumed = two_processes(realm_args(trainer_store, workdir))
    out, err = resumed.communicate(timeout=900)
    refresh.wait(timeout=300)
  refresher_log = (tmp_path / "refresher_2.log").read_text()
  assert resumed.returncode == 0, err[-3000:]
  assert refresh.returncode == 0, refresher_log[-3000:]
  assert all(re.search(rf"\[process {i}\].*resumed from gs://.* at step [24]\b", err) for i in (0, 1)), err[-3000:]
  # Both runs together swapped the bootstrap index and at least two of the refresher's, every process alike.
  for i in (0, 1):
    steps = set(swapped("\n".join(line for line in (first_err + err).splitlines() if f"[process {i}]" in line)))
    assert {0, 2, 4} <= steps, steps
  assert "refresher published index steps" in refresher_log
  assert [s for s in [0, 2, 4, 6] if (workdir / "index" / "commits" / f"{s}.json").exists()] == [2, 4, 6]  # keep 3
  losses = final_loss(out)
  assert len(losses) == 2 and losses[0] == losses[1]
  np.testing.assert_allclose(losses[0], reference_loss[0], atol=2e-3)
  expected_eval, got_eval = load_eval(reference, STEPS), load_eval(workdir, STEPS)
  np.testing.assert_array_equal(got_eval["block_id"], expected_eval["block_id"])
  assert len(got_eval["block_id"]) == 12
  np.testing.assert_allclose(got_eval["log_likelihood"], expected_eval["log_likelihood"], rtol=1e-3, atol=2e-3)

  expected, got = restored_state(reference, STEPS), restored_state(workdir, STEPS)
  assert int(got["step"]) == STEPS
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               {"params": expected["params"], "opt_state": expected["opt_state"]},
               {"params": got["params"], "opt_state": got["opt_state"]})
  assert not local_gs_entries(REPO, tmp_path)


def test_two_process_refresher_publishes_what_one_process_embeds(gcs_store, one_process_run, tmp_path):
  from realm_jax import partitioning
  from realm_jax.checkpoints.train_dir import restore_params_subtree
  from realm_jax.models.bert import BertConfig
  from realm_jax.models.retriever import RetrieverConfig
  from realm_jax.refresh.refresher import RefreshConfig, embed_all_blocks
  from realm_jax.retrieval import index as index_lib

  store = gcs_store[1]["refresher_host"]
  workdir = tmp_path / "realm"
  shutil.copytree(one_process_run[0], workdir, ignore=shutil.ignore_patterns("index"))
  refresh = two_processes(refresher_args(store.path, workdir, f"--step={STEPS}"))
  out, err = refresh.communicate(timeout=600)
  assert refresh.returncode == 0, err[-3000:]
  assert out.count(f"refresher published index steps [{STEPS}]") == 2
  assert index_lib.committed_steps(workdir / "index") == [STEPS]
  commit, published = index_lib.load_index(workdir / "index", STEPS, store)
  assert commit["train_step"] == STEPS and commit["writer"] == "refresher"
  half = store.num_blocks // 2  # each process wrote only the rows it embedded; the commit lists both parts
  assert {name: entry["rows"] for name, entry in commit["files"].items()} == {
      index_lib.part_name(0, 2): [0, half], index_lib.part_name(1, 2): [half, store.num_blocks]}
  assert json.loads((workdir / "retriever.json").read_text())["block_len"] == 128

  retriever = RetrieverConfig(BertConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512),
                              block_len=128)
  mesh = partitioning.make_mesh()
  tower = restore_params_subtree(workdir / "train", STEPS, ("retriever", "query_tower"),
                                 retriever.abstract_tower_params(), partitioning.replicated(mesh))
  expected = embed_all_blocks(tower, RefreshConfig(retriever, batch_size=64), store, mesh).embeddings
  np.testing.assert_allclose(published, expected, rtol=1e-5, atol=1e-5)



TWO_PROCESS_PASSES = """
import sys
import numpy as np
args = dict(a.removeprefix("--").split("=", 1) for a in sys.argv[1:])
from realm_jax import partitioning
partitioning.initialize_distributed(args["coordinator_address"], int(args["num_processes"]), int(args["process_id"]))
import jax
from realm_jax.data.blocks import BlockStore
from realm_jax.refresh.refresher import BlockEmbedder, RefreshConfig
sys.path.insert(0, "tests")
from test_multihost import pass_setup
big = 2**40 + 3  # collectives carry int64 values whole (byte sizes, sha256 words), not truncated to 32 bits
assert partitioning.agree(big if jax.process_index() == 0 else 0) == big
assert partitioning.gather_ints([big + jax.process_index(), -big]).tolist() == [[big, -big], [big + 1, -big]]
params, config = pass_setup()
embedder, store = BlockEmbedder(config, partitioning.make_mesh()), BlockStore(args["store"])
asked, later = [], []
mine = embedder(params, store, abandon=lambda: asked.append(1) or False)  # checked before every batch
abandoned = embedder(params, store, abandon=lambda: later.append(1) or len(later) == 5) is None  # at batch 4
print(f"asked {len(asked)} abandoned {abandoned} rows {mine.start}:{mine.start + len(mine.embeddings)}")
np.save(f"{args['out']}.{jax.process_index()}.npy", mine.embeddings)  # each process holds only its own rows
"""


def pass_setup():
  """Tower params and an embedding config that asks whether to abandon before every batch."""
  import flax.linen as nn

  from realm_jax.models.bert import BertConfig
  from realm_jax.models.retriever import RetrieverConfig
  from realm_jax.refresh.refresher import RefreshConfig

  retriever = RetrieverConfig(BertConfig(hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128), 16,
                              block_len=64)
  x = np.zeros((1, 8), np.int32)
  params = jax.device_get(nn.meta.unbox(retriever.tower().init(jax.random.key(0), x, x, x, True)["params"]))
  return params, RefreshConfig(retriever, batch_size=64, abandon_check_seconds=0.0)


def test_two_processes_decide_abandonment_together_and_each_embeds_its_half_as_one_process_does(demo_store,
                                                                                                  tmp_path):
  from realm_jax import partitioning
  from realm_jax.refresh.refresher import embed_all_blocks

  script = tmp_path / "two_process_passes.py"
  script.write_text(TWO_PROCESS_PASSES)
  run = two_processes([str(script), f"--store={demo_store.path}", f"--out={tmp_path / 'rows'}"])
  out, err = run.communicate(timeout=600)
  assert run.returncode == 0, err[-3000:]
  seen = re.findall(r"\[process (\d)\] asked (\d+) abandoned (\w+) rows (\d+):(\d+)", out)
  asked = {int(p): (int(n), a, (int(start), int(stop))) for p, n, a, start, stop in seen}
  # Process 0 asked before every batch, process 1 never (it takes process 0's answer); both dropped pass 2.
  assert asked[0][0] >= demo_store.num_blocks / 64 and asked[1][0] == 0 and asked[0][1] == asked[1][1] == "True"
  half = demo_store.num_blocks // 2
  assert asked[0][2] == (0, half) and asked[1][2] == (half, demo_store.num_blocks)
  params, config = pass_setup()
  expected = embed_all_blocks(params, config, demo_store, partitioning.make_mesh()).embeddings
  for process, (_, _, (start, stop)) in asked.items():
    np.testing.assert_allclose(np.load(tmp_path / f"rows.{process}.npy"), expected[start:stop], rtol=1e-5, atol=1e-5)
