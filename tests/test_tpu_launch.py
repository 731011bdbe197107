"""Cloud TPU pod commands, checked in --dry_run mode (nothing is run)."""

import shlex
import subprocess
import sys

from conftest import REPO


def _pod_dry_run(*flags: str) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, "launch/tpu/pod.py", "--name=realm", "--zone=us-central2-b", "--accelerator=v4-64",
       "--refresh_accelerator=v4-16", "--workdir=gs://bucket/run", "--gin_file=gin/models/bert_base.gin",
       "--run_gin=gin/runs/realm_pretrain.gin", *flags, "--dry_run"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
  )


def _shell(command: list[str]) -> list[str]:
  """The shell command a `gcloud ... ssh` runs on the workers ([] for other gcloud commands)."""
  return shlex.split(next((a for a in command if a.startswith("--command=")), "--command=").split("=", 1)[1])


def test_pod_dry_run_prints_create_install_stage_trainer_and_refresher_commands():
  result = _pod_dry_run("--block_store=gs://bucket/blocks")
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line) for line in result.stdout.strip().splitlines()]
  assert [c[4] for c in commands] == ["create", "create", "ssh", "ssh", "ssh", "ssh", "ssh", "ssh"]
  assert "--accelerator-type=v4-64" in commands[0] and "--accelerator-type=v4-16" in commands[1]
  trainer, refresher = commands[6], commands[7]
  assert trainer[5] == "realm" and refresher[5] == "realm-refresh"
  assert all("--worker=all" in c and "--zone=us-central2-b" in c for c in commands[2:])
  train_shell = _shell(trainer)
  assert "launch/pretrain.py" in train_shell and "--coordinator_address=auto" in train_shell
  assert "--gin_file=gin/runs/realm_pretrain.gin" in train_shell
  refresh_shell = _shell(refresher)
  assert "launch/refresh_index.py" in refresh_shell and "--gin_file=gin/runs/refresh.gin" in refresh_shell
  assert "--gin_file=gin/runs/realm_pretrain.gin" not in refresh_shell
  assert "TOWER_PATH" not in refresh_shell  # read from the trainer's retriever.json


def test_pod_stages_the_block_store_on_every_host_of_both_slices_and_jobs_read_the_copy():
  result = _pod_dry_run("--block_store=gs://bucket/blocks", "--local_block_store=/mnt/disk/blocks")
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line) for line in result.stdout.strip().splitlines()]
  stage = ["launch/stage_blocks.py", "--source=gs://bucket/blocks", "--dest=/mnt/disk/blocks"]
  staged = [c for c in commands if "launch/stage_blocks.py" in _shell(c)]
  assert [(c[5], c.index("--worker=all") > 0) for c in staged] == [("realm", True), ("realm-refresh", True)]
  assert all(_shell(c)[-3:] == stage for c in staged)
  jobs = commands[-2:]  # trainer, refresher: after the staging
  assert commands.index(staged[-1]) < commands.index(jobs[0])
  assert all("--gin_bindings=BLOCK_STORE = '/mnt/disk/blocks'" in _shell(c) for c in jobs)
  assert "gs://bucket/blocks" not in " ".join(" ".join(_shell(c)) for c in jobs)


def test_pod_stages_a_separate_query_corpus_on_the_trainer_hosts_only_and_the_trainer_reads_the_copy():
  result = _pod_dry_run("--block_store=gs://bucket/wiki", "--query_store=gs://bucket/ccnews",
                        "--local_query_store=/mnt/disk/ccnews",
                        "--run_gin=gin/runs/realm_pretrain_separate_corpora.gin")
  assert result.returncode == 0, result.stderr
  commands = [shlex.split(line) for line in result.stdout.strip().splitlines()]
  staged = [c for c in commands if "--source=gs://bucket/ccnews" in _shell(c)]
  assert [c[5] for c in staged] == ["realm"]  # the refresher embeds the knowledge corpus only
  assert _shell(staged[0])[-1] == "--dest=/mnt/disk/ccnews"
  trainer, refresher = commands[-2:]
  assert "--gin_bindings=QUERY_STORE = '/mnt/disk/ccnews'" in _shell(trainer)
  assert not any("QUERY_STORE" in a for a in _shell(refresher))
  refused = _pod_dry_run("--run_bindings=QUERY_STORE = 'gs://bucket/ccnews'")
  assert refused.returncode != 0 and "pass --query_store=gs://... instead" in refused.stderr
  refused = _pod_dry_run("--query_store=gs://bucket/ccnews", "--job=ict")
  assert refused.returncode != 0 and "only REALM pre-training (--job=pretrain) reads a query corpus" in refused.stderr


def test_pod_refuses_a_gs_block_store_binding_that_jobs_cannot_memory_map():
  result = _pod_dry_run("--gin_bindings=BLOCK_STORE = 'gs://bucket/blocks'")
  assert result.returncode != 0
  assert "pass --block_store=gs://... instead" in result.stderr and not result.stdout.strip()


def test_pod_gives_refresher_files_and_bindings_to_the_refresher_only():
  result = _pod_dry_run("--refresh_gin=gin/ablations/slow_refresh.gin",
                        "--refresh_bindings=refresher.RefreshJob.keep = 5", "--step=train", "--step=refresh")
  assert result.returncode == 0, result.stderr
  trainer, refresher = (_shell(shlex.split(line)) for line in result.stdout.strip().splitlines())
  assert refresher.index("--gin_file=gin/runs/refresh.gin") < refresher.index(
      "--gin_file=gin/ablations/slow_refresh.gin")  # after the job's defaults
  assert "--gin_bindings=refresher.RefreshJob.keep = 5" in refresher
  assert not [a for a in trainer if "slow_refresh" in a or "RefreshJob" in a]


def test_sweep_expands_variants_into_pod_commands():
  ablations = sorted(p.name for p in (REPO / "gin" / "ablations").glob("*.gin") if p.name != "slow_refresh.gin")
  result = subprocess.run(
      [sys.executable, "launch/sweep.py", "--gin_file=gin/models/bert_base.gin",
       "--run_gin=gin/runs/realm_pretrain.gin",
       "--variant=baseline=", "--variant=no_null=gin/ablations/no_null_document.gin",
       "--variant=lr=optimizer.OptimizerConfig.learning_rate = 1e-4",
       "--variant=stale=refresher:gin/ablations/slow_refresh.gin;refresher:refresher.RefreshJob.keep = 5",
       *[f"--variant=a{i}=gin/ablations/{name}" for i, name in enumerate(ablations)],  # each parses
       "--workdir_root=gs://b/sweep", "--mode=tpu", "--block_store=gs://b/blocks"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
  )
  assert result.returncode == 0, result.stderr
  lines = [shlex.split(line) for line in result.stdout.strip().splitlines()]
  assert [next(a for a in c if a.startswith("--workdir=")) for c in lines[:4]] == [
      "--workdir=gs://b/sweep/baseline", "--workdir=gs://b/sweep/no_null", "--workdir=gs://b/sweep/lr",
      "--workdir=gs://b/sweep/stale"]
  assert "--run_gin=gin/ablations/no_null_document.gin" in lines[1]
  assert "--run_bindings=optimizer.OptimizerConfig.learning_rate = 1e-4" in lines[2]
  refresher_only = [a for c in lines for a in c if a.startswith("--refresh_")]
  assert refresher_only == ["--refresh_gin=gin/ablations/slow_refresh.gin",
                            "--refresh_bindings=refresher.RefreshJob.keep = 5"]  # the stale variant's, to pod.py
  assert not [a for a in lines[3] if a.startswith("--run_") and "refresh" in a.lower()]
  assert all("--block_store=gs://b/blocks" in c for c in lines)  # every pod stages the store on its hosts


def test_sweep_passes_a_separate_query_corpus_to_every_pod_and_a_local_variant_binds_it_for_the_trainer():
  result = subprocess.run(
      [sys.executable, "launch/sweep.py", "--gin_file=gin/models/bert_base.gin",
       "--run_gin=gin/runs/realm_pretrain_separate_corpora.gin", "--variant=baseline=",
       "--workdir_root=gs://b/sweep", "--mode=tpu", "--block_store=gs://b/wiki", "--query_store=gs://b/ccnews"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
  )
  assert result.returncode == 0, result.stderr
  assert "--query_store=gs://b/ccnews" in shlex.split(result.stdout)
  without = subprocess.run(  # the separate-corpora run gin requires QUERY_STORE
      [sys.executable, "launch/sweep.py", "--gin_file=gin/models/bert_base.gin",
       "--run_gin=gin/runs/realm_pretrain_separate_corpora.gin", "--variant=baseline=",
       "--workdir_root=gs://b/sweep", "--mode=tpu", "--block_store=gs://b/wiki"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
  )
  assert without.returncode != 0 and "QUERY_STORE" in without.stderr
  local = subprocess.run(  # a local sweep would ignore it: refused
      [sys.executable, "launch/sweep.py", "--run_gin=gin/runs/realm_pretrain.gin", "--variant=baseline=",
       "--mode=local", "--query_store=gs://b/ccnews"], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert local.returncode != 0 and "--query_store is staged by each pod (--mode=tpu)" in local.stderr


def test_sweep_refuses_refresher_items_of_a_variant_without_a_refresher():
  result = subprocess.run(
      [sys.executable, "launch/sweep.py", "--gin_file=gin/models/bert_base.gin",
       "--run_gin=gin/runs/realm_pretrain.gin",
       "--variant=x=gin/ablations/no_retrieval.gin;refresher:gin/ablations/slow_refresh.gin",
       "--workdir_root=gs://b/sweep", "--mode=tpu", "--block_store=gs://b/blocks"],
      cwd=REPO, capture_output=True, text=True, timeout=120,
  )
  assert result.returncode == 2, result.stderr[-2000:]
  assert "--variant x: has refresher: items, but retrieval is off: no refresher runs" in result.stderr


def test_sweep_refuses_a_missing_gin_file():
  result = subprocess.run([sys.executable, "launch/sweep.py", "--variant=x=gin/ablations/nope.gin", "--mode=tpu"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0 and "gin/ablations/nope.gin not found" in result.stderr


def test_sweep_checks_every_variant_config_before_running_any():
  result = subprocess.run([sys.executable, "launch/sweep.py", "--gin_file=gin/models/bert_base.gin",
                           "--run_gin=gin/runs/realm_pretrain.gin", "--variant=good=",
                           "--variant=typo=NUM_STEP = 3", "--workdir_root=gs://b/sweep", "--mode=tpu",
                           "--block_store=gs://b/blocks"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "error: --variant typo: --gin_bindings: gin macro NUM_STEP is bound but never used" in result.stderr
  assert not result.stdout.strip()  # not even the good variant's command
