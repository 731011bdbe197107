"""Launchers: gin typos fail fast naming the binding; ICT launch on a gs:// workdir writes config, checkpoints,
TensorBoard; trainer + refresher processes; a 2-variant sweep on gs://; unusable workdirs fail before training."""

import json
import re
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env
from etils import epath


def run_launcher(script, *args, timeout=600):
  env = subprocess_env(JAX_NUM_CPU_DEVICES="2")
  return subprocess.run([sys.executable, str(REPO / "launch" / script), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_reader_copy_launcher_writes_each_evaluation(demo_store, tmp_path):
  workdir = tmp_path / "reader_copy"
  result = run_launcher(
      "reader_copy.py", "--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/reader_copy_demo.gin",
      f"--gin_bindings=BLOCK_STORE = '{demo_store.path}'", "--gin_bindings=realm_data.RealmDataConfig.batch_size = 4",
      "--gin_bindings=trainer.TrainerConfig.num_steps = 2",
      "--gin_bindings=trainer.TrainerConfig.eval_every = 1",
      "--gin_bindings=reader_copy.run_reader_copy.eval_queries = 8", f"--workdir={workdir}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert [row["step"] for row in json.loads((workdir / "reader_copy.json").read_text())] == [0, 1, 2]
  assert "| step | train loss | oracle log-lik |" in result.stdout


def test_ict_launcher_end_to_end_on_a_gcs_workdir(demo_store, gcs_bucket):
  workdir = epath.Path(f"{gcs_bucket}/ict")
  result = run_launcher(
      "ict.py", "--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/ict_demo.gin",
      f"--gin_bindings=BLOCK_STORE = '{demo_store.path}'", "--gin_bindings=NUM_STEPS = 4",
      "--gin_bindings=BATCH_SIZE = 8", "--gin_bindings=trainer.TrainerConfig.checkpoint_every = 2",
      f"--workdir={workdir}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "ICT finished at step 4" in result.stdout
  assert (workdir / "ict.config.gin").read_text().count("hidden_size = 128") == 1
  assert "run_ict" in (workdir / "ict.operative_config.gin").read_text()
  assert sorted(p.name for p in (workdir / "train").iterdir() if p.name.isdigit()) == ["2", "4"]
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert (workdir / "TRAINING_DONE").read_text() == "4"
  assert json.loads((workdir / "retriever.json").read_text())["tower_path"] == ["query_tower"]


@pytest.mark.parametrize("workdir", ["gs://no-such-bucket-here/run", "gs://{bucket}/run"])
def test_unusable_gcs_workdir_fails_before_training_naming_it(gcs_server, gcs_bucket, workdir):
  from gcs import FaultProxy

  proxy = FaultProxy(gcs_server.url)  # a read-only bucket: every upload is refused
  proxy.fail(r"/upload/", mode="403", methods=("POST", "PUT"))
  workdir = workdir.format(bucket=gcs_bucket.removeprefix("gs://"))
  env = subprocess_env(JAX_NUM_CPU_DEVICES="2", STORAGE_EMULATOR_HOST=proxy.url)
  result = subprocess.run([sys.executable, "launch/ict.py", "--gin_file=gin/models/tiny.gin",
                           "--gin_file=gin/runs/ict_demo.gin", "--gin_bindings=BLOCK_STORE = 'unused'",
                           f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  proxy.stop()
  assert result.returncode == 2
  assert f"error: {workdir}: cannot write the run directory" in result.stderr
  assert "ICT finished" not in result.stdout and "step 1:" not in result.stderr  # before any training step


def test_ict_launcher_rejects_a_typo_before_training(tmp_path):
  result = run_launcher("ict.py", "--gin_file=gin/models/tiny.gin", "--gin_file=gin/runs/ict_demo.gin",
                        "--gin_bindings=optimizer.OptimizerConfig.lerning_rate = 0.1", f"--workdir={tmp_path}")
  assert result.returncode == 2
  assert "lerning_rate" in result.stderr.strip().splitlines()[-1] and "Traceback" not in result.stderr
  assert not (tmp_path / "train").exists()


def test_trainer_and_refresher_processes_run_concurrently_and_the_trainer_hot_swaps(demo_store, tmp_path):
  workdir = tmp_path / "run"
  env = subprocess_env(JAX_NUM_CPU_DEVICES="2")
  model = ["--gin_file=gin/models/tiny.gin", f"--gin_bindings=BLOCK_STORE = '{demo_store.path}'"]
  trainer = subprocess.Popen(
      [sys.executable, "launch/ict.py", *model, "--gin_file=gin/runs/ict_demo.gin", "--gin_bindings=NUM_STEPS = 80",
       "--gin_bindings=BATCH_SIZE = 16", "--gin_bindings=trainer.TrainerConfig.checkpoint_every = 20",
       "--gin_bindings=BLOCK_LEN = 32", "--gin_bindings=ict_run.run_ict.follow_index = True",
       "--gin_bindings=live_index.LiveIndexConfig.poll_seconds = 0.2",
       "--gin_bindings=live_index.LiveIndexConfig.max_staleness = 30", f"--workdir={workdir}"],
      cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )
  # Files, not pipes: an undrained pipe would block the refresher while the trainer waits for it.
  with (tmp_path / "refresh.out").open("w") as out, (tmp_path / "refresh.log").open("w") as log:
    refresher = subprocess.Popen(
        [sys.executable, "launch/refresh_index.py", "--gin_file=gin/runs/refresh.gin",
         f"--block_store={demo_store.path}",
         "--gin_bindings=refresher.RefreshJob.block_len = 32",  # agrees with the trainer's retriever.json
         "--gin_bindings=refresher.RefreshJob.batch_size = 512",
         f"--gin_bindings=refresher.run_refresh.compilation_cache_dir = '{tmp_path / 'jax_cache'}'",
         "--poll_seconds=0.2", f"--workdir={workdir}"],
        cwd=REPO, env={**env, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}, stdout=out, stderr=log,
    )
    try:
      _, train_log = trainer.communicate(timeout=600)
      refresher.wait(timeout=600)
    finally:
      trainer.kill()
      refresher.kill()
  refresh_out, refresh_log = (tmp_path / "refresh.out").read_text(), (tmp_path / "refresh.log").read_text()
  assert trainer.returncode == 0, train_log[-3000:]
  assert refresher.returncode == 0, refresh_log[-3000:]
  swaps = [int(line.rsplit(" ", 1)[1]) for line in train_log.splitlines() if "swapped in index step" in line]
  assert len(swaps) >= 2 and swaps == sorted(set(swaps)), swaps
  staleness = [float(x) for x in re.findall(r"index_staleness=([\d.]+)", train_log)]
  assert staleness and max(staleness) <= 30  # bounded: the trainer waited for the refresher when it lagged
  assert "refresher published index steps" in refresh_out
  assert (workdir / "index" / "commits" / "80.json").is_file()  # the final checkpoint is indexed
  assert list((tmp_path / "jax_cache").iterdir())  # a restarted refresher would load its compiled steps
  # A refresher told to embed differently from the trainer's retriever.json is refused, both values named.
  result = run_launcher("refresh_index.py", f"--block_store={demo_store.path}", "--once", f"--workdir={workdir}",
                        "--gin_file=gin/runs/refresh.gin", "--gin_bindings=refresher.RefreshJob.block_len = 64")
  assert result.returncode != 0
  assert re.search(r"RefreshJob.block_len = 64, but the trainer of this run wrote block_len = 32 in .*retriever.json",
                   result.stderr), result.stderr[-2000:]


def test_sweep_runs_each_variant_locally_with_its_refresher_and_tabulates_the_results(demo_store, gcs_bucket):
  root = epath.Path(f"{gcs_bucket}/sweep")
  result = subprocess.run(
      [sys.executable, "launch/sweep.py", "--gin_file=gin/models/tiny.gin",
       "--run_gin=gin/runs/realm_pretrain_demo.gin",
       f"--gin_bindings=BLOCK_STORE = '{demo_store.path}'", "--gin_bindings=BLOCK_LEN = 32",
       "--gin_bindings=NUM_STEPS = 4", "--run_bindings=trainer.TrainerConfig.checkpoint_every = 2",
       "--run_bindings=realm_data.RealmDataConfig.eval_blocks = 8",
       "--run_bindings=trainer.TrainerConfig.eval_every = 2",
       "--variant=retrieval=", "--variant=null_only=gin/ablations/no_retrieval.gin", "--baseline=null_only",
       f"--workdir_root={root}"],
      cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=900,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  *table, paired, wrote_report, wrote_plot = result.stdout.strip().splitlines()[-5:]
  assert (wrote_report, wrote_plot) == (f"wrote {root / 'report.md'}", f"wrote {root / 'heldout_loss.png'}")
  assert (root / "heldout_loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  report = (root / "report.md").read_text()
  assert re.search(r"\| retrieval \| \d+\.\d{3} ± \d\.\d{3} \| \d+\.\d{3} ± \d\.\d{3} \|", report), report  # steps 2, 4
  assert paired in report
  # Table 2's ablation table from the same sweep: final losses, the paired difference, each variant's R@5.
  from realm_jax.eval import sweep_report

  recall = root / "recall" / "retrieval" / "eval_retrieval" / "results.json"
  recall.parent.mkdir(parents=True)
  recall.write_text(json.dumps([{"dataset": "nq_open_dev", "system": "realm-jax", "recall@5": 12.5}]))
  ablation, plot = sweep_report.ablation_table(root, ["null_only", "retrieval"], "null_only")
  rows = ablation.splitlines()
  assert re.fullmatch(r"\| null_only \| 4 \| \d+\.\d{3} ± \d\.\d{3} \| – \| – \| – \|", rows[2]), rows[2]
  assert re.fullmatch(r"\| retrieval \| 4 \| \d+\.\d{3} ± \d\.\d{3} \| [+-]\d\.\d{3} ± \d\.\d{3} \| \d+% \| 12\.5 \|",
                      rows[3]), rows[3]
  assert plot[:4] == b"\x89PNG"
  assert [line.split(":")[0].strip() for line in table] == ["retrieval", "null_only"]
  assert all("REALM pre-training finished at step 4" in line for line in table)
  assert "p(null) 1.000, masked span retrieved 0.000" in table[1]  # the null block only
  assert "reading the null block only" in table[0]
  # The null-only variant reads nothing else: its held-out loss is its null-block reading's.
  assert re.search(r"held-out \(8 queries\): loss (\d+\.\d{3}) with retrieval, \1 reading the null block only "
                   r"\(retrieval utility -?0\.000 ± 0\.000 s\.e\. over queries\)", table[1]), table[1]
  # Both variants read the same 8 held-out queries at their last step: a paired comparison.
  assert re.fullmatch(r"\s*retrieval: held-out loss minus null_only's [+-]\d\.\d{4} \+- \d\.\d{4} s\.e\. over queries "
                      r"\(step 4 vs 4, 8 queries, \d+ masks; .*\)", paired), paired
  for name in ("retrieval", "null_only"):
    assert "REALM pre-training finished at step 4" in (root / name / "trainer.log").read_text()
  assert "refresher published index steps" in (root / "retrieval" / "refresher.log").read_text()
  assert not (root / "null_only" / "refresher.log").exists()
  assert (root / "retrieval" / "index" / "commits" / "4.json").is_file()
