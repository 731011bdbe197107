"""Ahead-of-time compilation for TPU topologies with libtpu's compiler on this CPU host (no TPU needed)."""

import dataclasses
import importlib.util
import re
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install 'jax[tpu]==0.10.2'; scripts/setup_venv.sh installs it)",
)


@pytest.mark.slow
def test_tiny_steps_compile_for_a_v3_64_pod_and_report_memory_and_flops():
  result = subprocess.run(
      [sys.executable, "launch/aot_compile.py", "--gin_file=gin/models/tiny.gin", "--gin_file=gin/aot/tiny.gin",
       "--topology=v3:4x8", "--steps=realm", "--steps=embed", "--steps=openqa"],
      cwd=REPO, env={"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}, capture_output=True,
      text=True, timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "REALM pre-training step on v3:4x8: 64 x TPU v3 core (16 GiB HBM, 61.5 TFLOP/s bf16 each" in out
  assert "embedding step on v3:4x8" in out and "cloud.google.com/tpu/docs/v3" in out
  assert "Open-QA fine-tuning step on v3:4x8" in out
  assert out.count(": fits") == 3
  xla, formula = map(float, re.search(r"XLA ([\d.e+]+) .*by formula ([\d.e+]+)", out).groups())
  assert formula <= xla < 3 * formula  # remat recomputes the forward pass; XLA also counts non-matmul ops
  assert "full re-embed of 13353718 blocks on v3:4x8 (64 devices)" in out


def test_a_step_that_does_not_fit_names_the_topology_and_the_shortfall():
  from realm_jax.models.bert import BertConfig
  from realm_jax.train import aot

  mesh, chip = aot.topology_mesh("v3:2x4")
  assert mesh.size == 16 and chip.hbm_bytes == 16 * aot.GiB
  plan = aot.embedding_step(mesh, BertConfig(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512),
                            batch_size=64, block_len=32)
  tiny_chip = dataclasses.replace(chip, hbm_bytes=1 << 20)
  with pytest.raises(aot.DoesNotFitError, match=r"embedding step does not fit on v3:2x4: needs 0.02 GiB per "
                     r"device, a TPU v3 core has 0.00 GiB \(short by 0.02 GiB\)"):
    aot.compile_step(plan, "v3:2x4", mesh, tiny_chip)


def test_unknown_generations_are_refused():
  from realm_jax.train import aot

  with pytest.raises(ValueError, match="unknown TPU generation 'v9'"):
    aot.topology_mesh("v9:2x2")


def test_chunked_search_holds_one_chunk_of_scores_and_approx_max_k_none_for_a_v3_pod():
  from realm_jax.retrieval.mips import SearchConfig, shard_layout
  from realm_jax.train import aot

  mesh, chip = aot.topology_mesh("v3:4x8")
  shape = {"num_blocks": 2_000_003, "dim": 128, "batch_size": 512, "k": 8}
  configs = {"whole shard": SearchConfig(chunk_rows=1 << 20), "chunked": SearchConfig(chunk_rows=8192),
             "approx": SearchConfig(backend="approx_max_k")}
  reports = {name: aot.compile_step(aot.search_step(mesh, **shape, search=search), "v3:4x8", mesh, chip)
             for name, search in configs.items()}
  assert reports["chunked"].step == "search of 2000003 blocks (exact, 4 chunk(s) of 7816 rows)"
  for name, report in reports.items():
    rows, _ = shard_layout(2_000_003, 64, configs[name].chunk_rows)
    assert report.argument_bytes == rows * 128 * 4 + 512 * 128 * 4  # the device's rows and the queries
  scores = 512 * 31_256 * 4  # [batch, rows per device] f32
  assert scores <= reports["whole shard"].temp_bytes < 1.1 * scores
  assert reports["chunked"].temp_bytes < 0.5 * scores  # a chunk's scores (+ a bf16 copy of the shard on TPU)
  assert reports["approx"].temp_bytes < 0.05 * scores  # the TPU fuses approx_max_k's reduction into the matmul
