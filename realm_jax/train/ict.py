"""ICT warm-start run (ORQA): the retriever's towers trained on the Inverse Cloze Task (`objectives.ict`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import jax
from absl import logging

from realm_jax.checkpoints import init as init_lib
from realm_jax.checkpoints.train_dir import RetrieverDescription
from realm_jax.data.ict import ict_iterator
from realm_jax.objectives.ict import IctSpec
from realm_jax.retrieval.index import LiveIndex
from realm_jax.train.live_index import LiveIndexConfig, following
from realm_jax.train.optimizer import OptimizerConfig
from realm_jax.train.trainer import TrainerConfig, TrainHooks, make_trainer


def starting_weights(spec: IctSpec) -> Callable[[dict], dict] | None:
  """`TrainHooks.pretrained` putting the `spec.init` encoder into every tower (None without an init)."""
  if not spec.init:
    return None
  encoder = init_lib.EncoderWeights(init_lib.load_encoder(spec.init, spec.retriever.encoder))
  logging.info("retriever towers start from %s", spec.init)
  return encoder.into_retriever


def run_ict(workdir: str, mesh: jax.sharding.Mesh, spec: IctSpec, trainer: TrainerConfig,
            optimizer: OptimizerConfig, follow_index: bool = False,
            index: LiveIndexConfig | None = None) -> list[dict[str, float]]:
  """ICT warm start (gin/runs/ict.gin: ORQA's batch 4096, 100k steps, lr 1e-4, 90% removal).

  With `follow_index`, indexes the refresh job publishes in `<workdir>/index` are hot-swapped between steps as
  `index` says and `index_step` / `index_staleness` are logged (the ICT loss itself uses none).
  """
  index = index or LiveIndexConfig()
  store = spec.store()
  RetrieverDescription(spec.retriever, (spec.retriever.block_tower,), store.manifest["tokenizer"]).write(workdir)
  pretrained = starting_weights(spec)
  fit = make_trainer(spec.objective(), mesh, workdir, trainer, optimizer).fit
  data = ict_iterator(store, spec.data)
  with contextlib.ExitStack() as stack:
    hooks = TrainHooks(pretrained=pretrained)
    if follow_index:
      poller = stack.enter_context(following(LiveIndex(mesh, index.search), workdir, store, index))
      hooks = TrainHooks(pretrained=pretrained, before_step=poller.maybe_swap)
    _, history = fit(data, hooks)
    if follow_index:
      logging.info("hot-swapped %d published indexes", poller.swaps)
  return history
