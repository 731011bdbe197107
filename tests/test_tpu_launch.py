"""Cloud TPU pod commands, checked in --dry_run mode (nothing is run)."""

import shlex
import subprocess
import sys

from conftest import REPO


def test_pod_dry_run_prints_create_install_trainer_and_refresher_commands():
  result = subprocess.run(
      [sys.executable, "launch/tpu/pod.py", "--name=realm", "--zone=us-central2-b", "--accelerator=v4-64",
       "--refresh_accelerator=v4-16", "--workdir=gs://bucket/run", "--gin_file=gin/models/bert_base.gin",
       "--run_gin=gin/runs/realm_pretrain.gin", "--gin_bindings=BLOCK_STORE = 'gs://bucket/blocks'", "--dry_run"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
  )
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line) for line in result.stdout.strip().splitlines()]
  assert [c[4] for c in commands] == ["create", "create", "ssh", "ssh", "ssh", "ssh"]
  assert "--accelerator-type=v4-64" in commands[0] and "--accelerator-type=v4-16" in commands[1]
  trainer, refresher = commands[4], commands[5]
  assert trainer[5] == "realm" and refresher[5] == "realm-refresh"
  assert all("--worker=all" in c and "--zone=us-central2-b" in c for c in commands[2:])
  train_shell = shlex.split(next(a for a in trainer if a.startswith("--command=")).split("=", 1)[1])
  assert "launch/pretrain.py" in train_shell and "--coordinator_address=auto" in train_shell
  assert "--gin_file=gin/runs/realm_pretrain.gin" in train_shell
  assert "--gin_bindings=BLOCK_STORE = 'gs://bucket/blocks'" in train_shell
  refresh_shell = shlex.split(next(a for a in refresher if a.startswith("--command=")).split("=", 1)[1])
  assert "launch/refresh_index.py" in refresh_shell and "--gin_file=gin/runs/refresh.gin" in refresh_shell
  assert "--gin_file=gin/runs/realm_pretrain.gin" not in refresh_shell
  assert "--gin_bindings=TOWER_PATH = ('retriever', 'query_tower')" in refresh_shell


def test_sweep_expands_variants_into_pod_commands():
  result = subprocess.run(
      [sys.executable, "launch/sweep.py", "--gin_file=gin/models/bert_base.gin",
       "--run_gin=gin/runs/realm_pretrain.gin",
       "--variant=baseline=", "--variant=no_null=gin/ablations/no_null_document.gin",
       "--variant=lr=pretrain.run_pretrain.learning_rate = 1e-4", "--workdir_root=gs://b/sweep", "--mode=tpu"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
  )
  assert result.returncode == 0, result.stderr
  lines = [shlex.split(line) for line in result.stdout.strip().splitlines()]
  assert [next(a for a in c if a.startswith("--workdir=")) for c in lines] == [
      "--workdir=gs://b/sweep/baseline", "--workdir=gs://b/sweep/no_null", "--workdir=gs://b/sweep/lr"]
  assert "--run_gin=gin/ablations/no_null_document.gin" in lines[1]
  assert "--run_bindings=pretrain.run_pretrain.learning_rate = 1e-4" in lines[2]


def test_sweep_refuses_a_missing_gin_file():
  result = subprocess.run([sys.executable, "launch/sweep.py", "--variant=x=gin/ablations/nope.gin", "--mode=tpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "gin/ablations/nope.gin not found" in result.stderr
