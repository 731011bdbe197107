"""Ahead-of-time compilation of the real train/embedding steps for a named TPU topology, without TPUs.

`jax.experimental.topologies` gives compile-only devices of a TPU slice (libtpu's compiler runs on
the CPU host); each step is lowered through the same code as the real run (`Trainer.lower`,
`refresher.embed_step`) with `jax.ShapeDtypeStruct`s and compiled by the TPU compiler, which
reports per-device memory (`memory_analysis`) and FLOPs (`cost_analysis`).  XLA's FLOPs include
rematerialisation (and count a loop body once); `model_flops` are the matmul FLOPs by formula.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable

import gin
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from realm_jax import partitioning
from realm_jax.data.ict import IctDataConfig
from realm_jax.data.realm import RealmDataConfig
from realm_jax.errors import InputError
from realm_jax.models.bert import BertConfig
from realm_jax.models.retriever import RetrieverConfig
from realm_jax.objectives.ict import IctSpec
from realm_jax.objectives.openqa import OpenQaSpec
from realm_jax.objectives.realm import RealmSpec
from realm_jax.refresh.refresher import RefreshConfig, embed_step
from realm_jax.retrieval.mips import SearchConfig, index_axes, shard_layout, sharded_search
from realm_jax.train.optimizer import OptimizerConfig
from realm_jax.train.trainer import TrainerConfig, make_trainer

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One JAX device of a TPU generation: HBM and peak bf16 FLOP/s per device, and where they come from."""

  name: str
  hbm_bytes: int
  peak_flops: float
  chip_config: str  # libtpu chip config: "default" (one device per TensorCore) or "megacore" (one per chip)
  source: str


# Per JAX device.  v3 exposes each of a chip's 2 TensorCores as a device; v4 and v5p run as megacore
# (one device per chip), as on Cloud TPU VMs.
CHIPS = {
    "v3": Chip("TPU v3 core", 16 * GiB, 123e12 / 2, "default",
               "cloud.google.com/tpu/docs/v3: 32 GiB HBM and 123 TFLOP/s bf16 per chip, 2 TensorCores"),
    "v4": Chip("TPU v4 chip", 32 * GiB, 275e12, "megacore",
               "cloud.google.com/tpu/docs/v4: 32 GiB HBM and 275 TFLOP/s bf16 per chip"),
    "v5p": Chip("TPU v5p chip", 95 * GiB, 459e12, "megacore",
                "cloud.google.com/tpu/docs/v5p: 95 GiB HBM and 459 TFLOP/s bf16 per chip"),
}


class DoesNotFitError(RuntimeError):
  """A compiled step needs more HBM per device than the topology's chips have."""


def topology_mesh(topology: str, mesh_data: int = -1, mesh_model: int = 1) -> tuple[Mesh, Chip]:
  """A ("data", "model") mesh of compile-only devices of `topology` (e.g. "v3:4x8", "v4:4x4x2")."""
  from jax.experimental import topologies

  generation = topology.split(":", 1)[0]
  if generation not in CHIPS:
    raise InputError(f"topology {topology!r}: unknown TPU generation {generation!r} (known: {sorted(CHIPS)})")
  chip = CHIPS[generation]
  # libtpu looks for a Cloud TPU VM's environment; describe a single host so it stays quiet.
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", f"{generation}-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  os.environ.setdefault("TPU_WORKER_ID", "0")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compile-only: several compiles may run at once
  try:
    devices = topologies.get_topology_desc(topology, "tpu", chip_config_name=chip.chip_config).devices
  except Exception as e:  # noqa: BLE001  (libtpu missing or a bad name: say which)
    raise RuntimeError(f"cannot describe TPU topology {topology!r}: {e} (needs libtpu: "
                       "pip install 'jax[tpu]==0.10.2')") from e
  return partitioning.make_mesh(mesh_data, mesh_model, devices), chip


@dataclasses.dataclass
class StepPlan:
  """A step ready to compile: lowering thunk, model FLOPs by formula, items (examples/blocks) per step."""

  name: str
  lower: Callable[[], jax.stages.Lowered]
  model_flops: float
  items: int
  item_name: str


def encoder_forward_flops(c: BertConfig, sequences: int, length: int) -> float:
  """Matmul FLOPs of one BERT forward pass: 2·N_layers per token + attention 4·L·d·T per token + pooler."""
  layer_params = c.num_layers * (4 * c.hidden_size**2 + 2 * c.hidden_size * c.intermediate_size)
  per_token = 2 * layer_params + 4 * c.num_layers * c.hidden_size * length
  return sequences * (length * per_token + 2 * c.hidden_size**2)


def tower_forward_flops(c: BertConfig, projection_size: int, sequences: int, length: int) -> float:
  return encoder_forward_flops(c, sequences, length) + sequences * 2 * c.hidden_size * projection_size


def _compile_only_trainer(objective, mesh: Mesh):
  """A trainer without checkpoints for lowering one step (the schedule's length does not change the step)."""
  return make_trainer(objective, mesh, None, TrainerConfig(num_steps=1000), OptimizerConfig(learning_rate=1e-4))


@gin.configurable
def ict_step(mesh: Mesh, encoder: BertConfig = gin.REQUIRED, batch_size: int = 4096, query_len: int = 96,
             block_len: int = 288, projection_size: int = 128) -> StepPlan:
  """ORQA's ICT step (batch 4096, in-batch negatives over the global batch)."""
  spec = IctSpec("", RetrieverConfig(encoder, projection_size, block_len=block_len),
                 IctDataConfig(batch_size, query_len, block_len))
  trainer = _compile_only_trainer(spec.objective(), mesh)
  forward = (tower_forward_flops(encoder, projection_size, batch_size, query_len)
             + tower_forward_flops(encoder, projection_size, batch_size, block_len)
             + 2 * batch_size**2 * projection_size)
  return StepPlan("ICT step", lambda: trainer.lower(spec.batch_shapes()),
                  3 * forward, batch_size, "examples")


@gin.configurable
def realm_step(mesh: Mesh, retriever: BertConfig = gin.REQUIRED, reader: BertConfig = gin.REQUIRED,
               data: RealmDataConfig | None = None, projection_size: int = 128) -> StepPlan:
  """REALM's pre-training step on host-retrieved candidates (batch 512 x 8 candidates incl. null)."""
  data = data or RealmDataConfig()
  spec = RealmSpec("", RetrieverConfig(retriever, projection_size, block_len=data.block_len), reader, data)
  trainer = _compile_only_trainer(spec.objective(), mesh)
  b, k = data.batch_size, data.num_candidates
  masks = b * k * data.max_masks
  forward = (tower_forward_flops(retriever, projection_size, b, data.query_len)
             + tower_forward_flops(retriever, projection_size, b * k, data.block_len)
             + encoder_forward_flops(reader, b * k, data.joint_len)
             + masks * 2 * (reader.hidden_size**2 + reader.hidden_size * reader.vocab_size))
  return StepPlan("REALM pre-training step", lambda: trainer.lower(spec.batch_shapes()),
                  3 * forward, b, "examples")


@gin.configurable
def embedding_step(mesh: Mesh, encoder: BertConfig = gin.REQUIRED, batch_size: int = 2048, block_len: int = 288,
                   projection_size: int = 128) -> StepPlan:
  """The refresh job's step: embed `batch_size` blocks with the block tower (forward only)."""
  config = RefreshConfig(RetrieverConfig(encoder, projection_size, block_len=block_len), batch_size=batch_size)
  replicated = NamedSharding(mesh, P())
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                        config.retriever.abstract_tower_params())
  inputs = {k: jax.ShapeDtypeStruct((batch_size, block_len), jnp.int32, sharding=partitioning.data_sharding(mesh, 2))
            for k in ("input_ids", "input_mask", "segment_ids")}

  def lower():
    with jax.set_mesh(mesh):
      return embed_step(config, mesh).lower(params, inputs)

  return StepPlan("embedding step", lower, tower_forward_flops(encoder, projection_size, batch_size, block_len),
                  batch_size, "blocks")


@gin.configurable
def openqa_step(mesh: Mesh, spec: OpenQaSpec = gin.REQUIRED, questions_per_device: int = 1) -> StepPlan:
  """ORQA's fine-tuning step: one question per device (ORQA: 1 per step), retriever loss over the top 5000
  frozen block embeddings, reader over the top 5 blocks of 320 word pieces, every span of width <= 10."""
  d = spec.data
  batch = questions_per_device * mesh.shape["data"]
  trainer = _compile_only_trainer(spec.objective(), mesh)
  r = spec.retriever
  spans = d.reader_len * d.max_span_width
  forward = (tower_forward_flops(r.encoder, r.projection_size, batch, d.query_len)
             + 2 * batch * d.retrieve_k * r.projection_size
             + encoder_forward_flops(spec.reader, batch * d.reader_k, d.reader_len)
             + batch * d.reader_k * (2 * d.reader_len * spec.reader.hidden_size * 2 * spec.span_hidden_size
                                     + spans * 2 * spec.span_hidden_size))
  return StepPlan("Open-QA fine-tuning step", lambda: trainer.lower(spec.batch_shapes(batch)), 3 * forward, batch,
                  "questions")


@gin.configurable
def search_step(mesh: Mesh, num_blocks: int = 13_353_718, dim: int = 128, batch_size: int = 512, k: int = 8,
                search: SearchConfig | None = None) -> StepPlan:
  """The trainer's search of the live index (`ExactSearcher`): `batch_size` queries (REALM's whole batch, on
  every device) against `num_blocks` rows sharded over all devices, top `k` (REALM: 8 candidates)."""
  search = search or SearchConfig()
  rows, chunk = shard_layout(num_blocks, mesh.size, search.chunk_rows)
  fn = sharded_search(mesh, num_blocks, rows, chunk, k, search)
  embeddings = jax.ShapeDtypeStruct((rows * mesh.size, dim), jnp.float32,
                                    sharding=NamedSharding(mesh, P(index_axes(mesh), None)))
  queries = jax.ShapeDtypeStruct((batch_size, dim), jnp.float32, sharding=NamedSharding(mesh, P()))
  how = (f"approx_max_k, recall target {search.recall_target}" if search.backend == "approx_max_k" else
         f"exact, {rows // chunk} chunk(s) of {chunk} rows")
  return StepPlan(f"search of {num_blocks} blocks ({how})", lambda: fn.lower(embeddings, queries),
                  2 * batch_size * num_blocks * dim, batch_size, "queries")


STEPS: dict[str, Callable[[Mesh], StepPlan]] = {"ict": ict_step, "realm": realm_step, "embed": embedding_step,
                                                "openqa": openqa_step, "search": search_step}


@dataclasses.dataclass
class Report:
  """Per-device memory and FLOPs of one compiled step on one topology."""

  step: str
  topology: str
  mesh_shape: dict[str, int]
  chip: Chip
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  xla_flops_per_device: float
  model_flops: float
  items: int
  item_name: str

  @property
  def devices(self) -> int:
    return math.prod(self.mesh_shape.values())

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs not aliased to (donated) arguments + temporaries."""
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def fits(self) -> bool:
    return self.peak_bytes <= self.chip.hbm_bytes

  @property
  def xla_flops(self) -> float:
    return self.xla_flops_per_device * self.devices

  def seconds(self, flops: float, utilisation: float = 1.0) -> float:
    """Step time if `flops` run at `utilisation` of the slice's peak bf16 FLOP/s."""
    return flops / (self.devices * self.chip.peak_flops * utilisation)

  def text(self) -> str:
    c = self.chip
    mesh = " x ".join(f"{k}={v}" for k, v in self.mesh_shape.items())
    verdict = "fits" if self.fits else f"DOES NOT FIT (short by {(self.peak_bytes - c.hbm_bytes) / GiB:.2f} GiB)"
    model_t, xla_t = self.seconds(self.model_flops), self.seconds(self.xla_flops)
    return "\n".join([
        f"{self.step} on {self.topology}: {self.devices} x {c.name} ({c.hbm_bytes / GiB:.0f} GiB HBM, "
        f"{c.peak_flops / 1e12:.1f} TFLOP/s bf16 each; {c.source}); mesh {mesh}",
        f"  per device: arguments {self.argument_bytes / GiB:.3f} GiB, temporaries {self.temp_bytes / GiB:.3f} GiB, "
        f"outputs {self.output_bytes / GiB:.3f} GiB (aliased to donated arguments {self.alias_bytes / GiB:.3f} GiB)"
        f" -> {self.peak_bytes / GiB:.3f} of {c.hbm_bytes / GiB:.0f} GiB: {verdict}",
        f"  FLOPs per step: XLA {self.xla_flops:.3e} ({self.xla_flops_per_device:.3e} per device, incl. "
        f"rematerialisation), model matmuls by formula {self.model_flops:.3e}",
        f"  step time at peak: {model_t:.4g} s (formula) / {xla_t:.4g} s (XLA); at 50% of peak: "
        f"{2 * model_t:.4g} s / {2 * xla_t:.4g} s; {self.items} {self.item_name} per step",
    ])


_OOM = re.compile(r"(RESOURCE_EXHAUSTED|Ran out of memory|exceed.{0,40}capacity)", re.IGNORECASE)


def compile_step(plan: StepPlan, topology: str, mesh: Mesh, chip: Chip) -> Report:
  """Compiles `plan` with the TPU compiler; raises `DoesNotFitError` naming the topology and the shortfall."""
  try:
    compiled = plan.lower().compile()
  except Exception as e:  # noqa: BLE001  (XLA reports out-of-memory at compile time on TPU)
    if _OOM.search(str(e)):
      raise DoesNotFitError(f"{plan.name} does not fit on {topology} ({chip.name}, {chip.hbm_bytes / GiB:.0f} GiB "
                            f"per device): the TPU compiler says: {str(e).strip()[:2000]}") from e
    raise
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  report = Report(plan.name, topology, dict(mesh.shape), chip, memory.argument_size_in_bytes,
                  memory.output_size_in_bytes, memory.alias_size_in_bytes, memory.temp_size_in_bytes,
                  float(cost.get("flops", 0.0)), plan.model_flops, plan.items, plan.item_name)
  if not report.fits:
    raise DoesNotFitError(
        f"{plan.name} does not fit on {topology}: needs {report.peak_bytes / GiB:.2f} GiB per device, a "
        f"{chip.name} has {chip.hbm_bytes / GiB:.2f} GiB (short by {(report.peak_bytes - chip.hbm_bytes) / GiB:.2f} "
        "GiB); enable rematerialisation (bert.BertConfig.remat = True), shard over 'model', or use more devices")
  return report


def refresh_schedule(train: Report, embed: Report, num_blocks: int, num_steps: int, refresh_every: int,
                     utilisation: float = 0.5) -> str:
  """One full re-embed set against the train step: how many train steps it spans, vs the paper's schedule."""
  embed_steps = -(-num_blocks // embed.items)
  embed_s = embed_steps * embed.seconds(embed.model_flops, utilisation)
  train_s = train.seconds(train.model_flops, utilisation)
  return "\n".join([
      f"schedule at {utilisation:.0%} of peak (model FLOPs): one {train.step} on {train.topology} {train_s:.4g} s; "
      f"{num_steps} steps {num_steps * train_s / 3600:.1f} h",
      f"  full re-embed of {num_blocks} blocks on {embed.topology} ({embed.devices} devices): {embed_steps} embedding "
      f"steps, {embed_s / 60:.1f} min = {embed_s / train_s:.0f} train steps (paper: a refresh about every "
      f"{refresh_every} steps; {num_steps // max(1, round(embed_s / train_s))} refreshes over the run)",
  ])
