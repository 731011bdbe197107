"""Multi-host on one machine: 2 processes x 4 CPU devices over jax.distributed behave as 1 process x 8 devices.

REALM pre-training in 2 processes (each loading its half of every batch, one bootstrap index published
and hot-swapped by both), killed after a checkpoint and resumed, ends where the uninterrupted
1-process run ends, held-out evaluation included; the 2-process refresh job publishes the embeddings one
process computes.
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
from conftest import REPO

from realm_jax.eval.realm_mlm import load_eval

STEPS = 4


def realm_args(store, workdir):
  return ["launch/pretrain.py", "--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/realm_pretrain_demo.gin",
          f"--gin_bindings=BLOCK_STORE = '{store.path}'", f"--gin_bindings=NUM_STEPS = {STEPS}",
          "--gin_bindings=BATCH_SIZE = 8", "--gin_bindings=pretrain.run_pretrain.checkpoint_every = 2",
          "--gin_bindings=pretrain.run_pretrain.log_every = 1", "--gin_bindings=pretrain.run_pretrain.eval_every = 2",
          "--gin_bindings=realm_data.RealmDataConfig.eval_blocks = 12", f"--workdir={workdir}"]


def two_processes(args, **kwargs):
  command = [sys.executable, "launch/local_multihost.py", "--num_processes=2", "--devices_per_process=4", "--", *args]
  env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
  return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **kwargs)


def final_loss(stdout):
  return [float(x) for x in re.findall(r"finished at step \d+: loss ([\d.]+)", stdout)]


def restored_state(workdir, step):
  path = workdir / "train" / str(step) / "state"
  checkpointer = ocp.PyTreeCheckpointer()
  tree = checkpointer.metadata(path).item_metadata.tree
  return checkpointer.restore(path, restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree))


@pytest.fixture(scope="module")
def one_process_run(demo_store, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one_process") / "realm"
  env = {"JAX_NUM_CPU_DEVICES": "8", "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
  result = subprocess.run([sys.executable, *realm_args(demo_store, workdir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, final_loss(result.stdout)


def test_two_processes_killed_and_resumed_end_like_one_process(demo_store, one_process_run, tmp_path):
  reference, reference_loss = one_process_run
  workdir = tmp_path / "realm"
  run = two_processes(realm_args(demo_store, workdir), start_new_session=True)
  deadline = time.monotonic() + 600
  while not (workdir / "train" / "2").is_dir() and run.poll() is None and time.monotonic() < deadline:
    time.sleep(0.1)
  os.killpg(run.pid, signal.SIGKILL)  # the launcher and both processes: a preempted pod
  run.communicate()
  assert not (workdir / "TRAINING_DONE").exists(), "killed too late: the run had finished"

  resumed = two_processes(realm_args(demo_store, workdir))
  out, err = resumed.communicate(timeout=600)
  assert resumed.returncode == 0, err[-3000:]
  assert re.search(r"\[process 0\].*resumed from .* at step 2", err) and re.search(r"\[process 1\].*resumed from", err)
  assert all(re.search(rf"\[process {i}\].*swapped in index step 0", err) for i in (0, 1))
  assert sorted(p.name for p in (workdir / "index" / "committed").iterdir()) == ["0"]  # published once
  losses = final_loss(out)
  assert len(losses) == 2 and losses[0] == losses[1]
  np.testing.assert_allclose(losses[0], reference_loss[0], atol=2e-3)
  # The held-out evaluation (12 queries: 2 global batches of 8, each process reading its half) matches too.
  expected_eval, got_eval = load_eval(reference, STEPS), load_eval(workdir, STEPS)
  np.testing.assert_array_equal(got_eval["block_id"], expected_eval["block_id"])
  assert len(got_eval["block_id"]) == 12
  np.testing.assert_allclose(got_eval["log_likelihood"], expected_eval["log_likelihood"], rtol=1e-3, atol=2e-3)

  expected, got = restored_state(reference, STEPS), restored_state(workdir, STEPS)
  assert int(got["step"]) == STEPS
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               {"params": expected["params"], "opt_state": expected["opt_state"]},
               {"params": got["params"], "opt_state": got["opt_state"]})


def test_two_process_refresher_publishes_what_one_process_embeds(demo_store, one_process_run, tmp_path):
  from realm_jax import partitioning
  from realm_jax.models.bert import BertConfig
  from realm_jax.refresh.refresher import RefreshConfig, abstract_tower_params, embed_all_blocks
  from realm_jax.train.trainer import restore_params_subtree

  workdir = tmp_path / "realm"
  shutil.copytree(one_process_run[0], workdir)
  refresh = two_processes([
      "launch/refresh_index.py", "--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/refresh.gin",
      f"--gin_bindings=BLOCK_STORE = '{demo_store.path}'", "--gin_bindings=BLOCK_LEN = 64",
      "--gin_bindings=TOWER_PATH = ('retriever', 'query_tower')",
      "--gin_bindings=refresher.RefreshConfig.batch_size = 64",
      f"--step={STEPS}", f"--workdir={workdir}"])
  out, err = refresh.communicate(timeout=600)
  assert refresh.returncode == 0, err[-3000:]
  assert out.count(f"refresher published index steps [{STEPS}]") == 2
  published = workdir / "index" / "committed" / str(STEPS)
  assert json.loads((published / "manifest.json").read_text())["train_step"] == STEPS
  assert not list((workdir / "index" / "tmp").iterdir())

  tiny = BertConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512)
  mesh = partitioning.make_mesh()
  tower = restore_params_subtree(workdir / "train", STEPS, ("retriever", "query_tower"),
                                 abstract_tower_params(tiny, 128), partitioning.replicated(mesh))
  expected = embed_all_blocks(tower, RefreshConfig(tiny, block_len=64, batch_size=64), demo_store, mesh)
  np.testing.assert_allclose(np.load(published / "embeddings.npy"), expected, rtol=1e-5, atol=1e-5)
