"""Hugging Face REALM checkpoints (config.json + safetensors) <-> realm-jax parameters, both ways.

Five HF classes, one row each in `HF_CLASSES`: its name and where its sub-models (a RealmEmbedder, a
RealmReader, a knowledge-augmented encoder) sit in realm-jax's parameter tree.  Every loader and exporter
reads that table; the tensor names come from `realm_names` (built on `hf_bert.hf_to_flax_names`) and export
is their inverse, so HF -> realm-jax -> HF is bit-identical.

HF stores some tensors twice (tied weights, RealmScorer's shared query embedder): these aliases
must equal their source and are written back.  Tensors HF keeps but never uses in its forward pass
(the MLM heads inside RealmEmbedder and RealmReader, RealmForOpenQA's `block_emb`) are returned as
`passthrough` and written back verbatim; an export without them leaves them for HF to initialise.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from realm_jax.checkpoints.hf_bert import (
  IDENTITY,
  IGNORED_HF_TENSORS,
  RUNTIME_FIELDS,
  CheckpointMismatchError,
  NameTable,
  check_architecture,
  dense_names,
  hf_to_flax_names,
  map_tensors,
  norm_names,
)
from realm_jax.errors import InputError
from realm_jax.models.bert import BertConfig, BertEncoder, MlmHead
from realm_jax.models.reader import SpanReader
from realm_jax.models.retriever import DualEncoder

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# RealmLMPredictionHead tensors (HF ties `decoder.bias` to `bias`).
_HEAD_TENSORS = ("transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight",
                 "transform.LayerNorm.bias", "bias", "decoder.weight")


@dataclasses.dataclass(frozen=True)
class Part:
  """A sub-model: its HF tensors are under `hf_prefix`, its realm-jax parameters under `path`."""

  hf_prefix: str
  path: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class HfRealmClass:
  """One HF REALM class: its name and where its sub-models sit in the realm-jax parameter tree."""

  name: str  # config.json `architectures`
  retriever: Part | None = None  # a RealmEmbedder: DualEncoder params {'query_tower'[, 'block_tower']}
  query_prefix: str | None = None  # RealmScorer's query embedder (`retriever` embeds the blocks)
  reader: Part | None = None  # RealmReader's BERT + span scorer: SpanReader params {'encoder', 'span_scorer'}
  mlm: Part | None = None  # RealmKnowledgeAugEncoder: RealmModel's {'reader', 'mlm_head'}
  unused: tuple[str, ...] = ()  # further HF tensors without a realm-jax parameter

  @property
  def bert(self) -> tuple[str, ...]:
    """The path of its BertEncoder params: the reader's if it has one, else the query tower's."""
    if self.mlm is not None:
      return self.mlm.path + ("reader",)
    if self.reader is not None:
      return self.reader.path + ("encoder",)
    return self.retriever.path + ("query_tower", "encoder")


HF_CLASSES = {
    "embedder": HfRealmClass("RealmEmbedder", retriever=Part("")),
    "scorer": HfRealmClass("RealmScorer", retriever=Part("embedder."), query_prefix="query_embedder."),
    "encoder": HfRealmClass("RealmKnowledgeAugEncoder", mlm=Part("")),
    "reader": HfRealmClass("RealmReader", reader=Part("")),
    "openqa": HfRealmClass("RealmForOpenQA", retriever=Part("embedder.", ("retriever",)),
                           reader=Part("reader.", ("reader",)), unused=("block_emb",)),
}


def hf_class(kind: str) -> HfRealmClass:
  """The `HF_CLASSES` row of `kind`."""
  if kind not in HF_CLASSES:
    raise InputError(f"unknown REALM checkpoint kind {kind!r}; one of {sorted(HF_CLASSES)}")
  return HF_CLASSES[kind]


@dataclasses.dataclass(frozen=True)
class RealmArchitecture:
  """What a RealmConfig fixes about realm-jax's modules."""

  bert: BertConfig
  projection_size: int = 128
  span_hidden_size: int = 256
  max_span_width: int = 10
  reader_layer_norm_eps: float = 1e-3

  @classmethod
  def from_hf_config(cls, hf: Mapping, source: str, **bert_overrides) -> RealmArchitecture:
    """From a RealmConfig dict (read from `source`)."""
    return cls(
        bert=BertConfig.from_hf_dict(dict(hf), source, **bert_overrides),
        projection_size=hf.get("retriever_proj_size", 128),
        span_hidden_size=hf.get("span_hidden_size", 256),
        max_span_width=hf.get("max_span_width", 10),
        reader_layer_norm_eps=hf.get("reader_layer_norm_eps", 1e-3),
    )

  def to_hf_config(self, kind: str) -> dict:
    """A RealmConfig `config.json` for `kind` (HF's defaults for everything realm-jax does not fix)."""
    b = self.bert
    return {
        "architectures": [hf_class(kind).name],
        "model_type": "realm",
        "vocab_size": b.vocab_size,
        "hidden_size": b.hidden_size,
        "num_hidden_layers": b.num_layers,
        "num_attention_heads": b.num_heads,
        "intermediate_size": b.intermediate_size,
        "hidden_act": b.hidden_act,
        "hidden_dropout_prob": b.hidden_dropout,
        "attention_probs_dropout_prob": b.attention_dropout,
        "max_position_embeddings": b.max_position_embeddings,
        "type_vocab_size": b.type_vocab_size,
        "initializer_range": b.initializer_range,
        "layer_norm_eps": b.layer_norm_eps,
        "retriever_proj_size": self.projection_size,
        "span_hidden_size": self.span_hidden_size,
        "max_span_width": self.max_span_width,
        "reader_layer_norm_eps": self.reader_layer_norm_eps,
    }


@dataclasses.dataclass(frozen=True)
class RealmNames:
  """The name table of one HF REALM class."""

  params: NameTable  # HF tensor -> (realm-jax parameter path, layout)
  aliases: dict[str, str]  # HF tensor -> the mapped HF tensor it duplicates
  unused: tuple[str, ...]  # HF tensors without a realm-jax parameter (never read by HF's forward either)


def _bert(config: BertConfig, hf_prefix: str, path: tuple[str, ...]) -> NameTable:
  return {k: (path + p, layout) for k, (p, layout) in hf_to_flax_names(config, hf_prefix).items()}


def _unused_head(prefix: str) -> tuple[tuple[str, ...], dict[str, str]]:
  head = f"{prefix}cls.predictions."
  return tuple(head + n for n in _HEAD_TENSORS), {f"{head}decoder.bias": f"{head}bias"}


def _embedder(arch: RealmArchitecture, prefix: str, tower: tuple[str, ...]) -> RealmNames:
  params = _bert(arch.bert, f"{prefix}realm.", tower + ("encoder",))
  params |= dense_names(f"{prefix}cls.dense", tower + ("projection",))
  params |= norm_names(f"{prefix}cls.LayerNorm", tower + ("layer_norm",))
  unused, aliases = _unused_head(prefix)
  return RealmNames(params, aliases, unused)


def _retriever(cls: HfRealmClass, arch: RealmArchitecture, share_towers: bool) -> RealmNames:
  part = cls.retriever
  if cls.query_prefix is None:
    return _embedder(arch, part.hf_prefix, part.path + ("query_tower",))
  if not share_towers:
    return _merge(_embedder(arch, part.hf_prefix, part.path + ("block_tower",)),
                  _embedder(arch, cls.query_prefix, part.path + ("query_tower",)))
  block = _embedder(arch, part.hf_prefix, part.path + ("query_tower",))
  twins = {cls.query_prefix + n.removeprefix(part.hf_prefix): block.aliases.get(n, n)
           for n in (*block.params, *block.aliases, *block.unused)}
  return RealmNames(block.params, block.aliases | twins, block.unused)


def _reader(arch: RealmArchitecture, part: Part) -> RealmNames:
  prefix, path = part.hf_prefix, part.path
  params = _bert(arch.bert, f"{prefix}realm.", path + ("encoder",))
  scorer, qa = path + ("span_scorer",), f"{prefix}qa_outputs."
  params |= dense_names(f"{qa}dense_intermediate", scorer + ("intermediate",))
  params |= norm_names(f"{qa}layer_normalization", scorer + ("layer_norm",))
  params |= dense_names(f"{qa}dense_output", scorer + ("output",))
  unused, aliases = _unused_head(prefix)
  return RealmNames(params, aliases, unused)


def _knowledge_augmented_encoder(arch: RealmArchitecture, part: Part) -> RealmNames:
  head, reader = f"{part.hf_prefix}cls.predictions.", f"{part.hf_prefix}realm."
  params = _bert(arch.bert, reader, part.path + ("reader",))
  mlm_head = part.path + ("mlm_head",)
  params |= dense_names(f"{head}transform.dense", mlm_head + ("transform",))
  params |= norm_names(f"{head}transform.LayerNorm", mlm_head + ("layer_norm", "norm"))
  params[f"{head}bias"] = (mlm_head + ("bias",), IDENTITY)
  aliases = {  # the MLM output layer is tied to the word embeddings in HF and in realm-jax's MlmHead
      f"{head}decoder.weight": f"{reader}embeddings.word_embeddings.weight",
      f"{head}decoder.bias": f"{head}bias",
  }
  return RealmNames(params, aliases, ())


def _merge(*tables: RealmNames, unused: tuple[str, ...] = ()) -> RealmNames:
  return RealmNames(
      {k: v for t in tables for k, v in t.params.items()},
      {k: v for t in tables for k, v in t.aliases.items()},
      sum((t.unused for t in tables), unused),
  )


def realm_names(kind: str, arch: RealmArchitecture, share_towers: bool = True) -> RealmNames:
  """The HF <-> realm-jax name table of `kind` (`share_towers`: whether a RealmScorer's towers are one)."""
  cls = hf_class(kind)
  tables = [_retriever(cls, arch, share_towers)] if cls.retriever else []
  tables += [_reader(arch, cls.reader)] if cls.reader else []
  tables += [_knowledge_augmented_encoder(arch, cls.mlm)] if cls.mlm else []
  return _merge(*tables, unused=cls.unused)


def _shapes(module: nn.Module, *args) -> dict[tuple[str, ...], tuple[int, ...]]:
  params = nn.meta.unbox(jax.eval_shape(lambda: module.init(jax.random.key(0), *args))["params"])
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params).items()}


def expected_shapes(kind: str, arch: RealmArchitecture, share_towers: bool = True) -> dict:
  """Flat realm-jax parameter shapes of `kind`, from the modules themselves (abstractly)."""
  cls = hf_class(kind)
  ids = jnp.zeros((1, 1, 4 + arch.max_span_width), jnp.int32)
  seq = {n: ids[0] for n in ("input_ids", "input_mask", "segment_ids")}
  at = lambda path, shapes: {path + k: v for k, v in shapes.items()}  # noqa: E731
  shapes = {}
  if cls.retriever:
    share = share_towers or cls.query_prefix is None
    shapes |= at(cls.retriever.path, _shapes(DualEncoder(arch.bert, arch.projection_size, share), seq, seq))
  if cls.reader:
    reader = SpanReader(arch.bert, arch.span_hidden_size, arch.max_span_width, arch.reader_layer_norm_eps)
    shapes |= at(cls.reader.path, _shapes(reader, {n: ids for n in (*seq, "block_mask")}))
  if cls.mlm:
    hidden = jnp.zeros((1, arch.bert.hidden_size))
    table = jnp.zeros((arch.bert.vocab_size, arch.bert.hidden_size))
    shapes |= at(cls.mlm.path + ("reader",), _shapes(BertEncoder(arch.bert), seq["input_ids"], seq["input_ids"]))
    shapes |= at(cls.mlm.path + ("mlm_head",), _shapes(MlmHead(arch.bert), hidden, table))
  return shapes


def _towers_shared(cls: HfRealmClass, tensors: Mapping[str, np.ndarray]) -> bool:
  """RealmScorer files hold query-embedder copies of its embedder; they differ only if the towers were not shared."""
  if cls.query_prefix is None:
    return True
  for name, value in tensors.items():
    if name.startswith(cls.query_prefix):
      twin = tensors.get(cls.retriever.hf_prefix + name.removeprefix(cls.query_prefix))
      if twin is None or twin.shape != value.shape or not np.array_equal(twin, value):
        return False
  return True


def import_tensors(
    tensors: Mapping[str, np.ndarray], kind: str, arch: RealmArchitecture, source: str
) -> tuple[dict, dict[str, np.ndarray]]:
  """HF tensors -> (realm-jax params of `kind`, passthrough tensors realm-jax does not use)."""
  share = _towers_shared(hf_class(kind), tensors)
  names = realm_names(kind, arch, share)
  problems = []
  for alias, target in names.aliases.items():
    if alias in tensors and target in tensors and not np.array_equal(tensors[alias], tensors[target]):
      problems.append(f"tensor {alias!r} differs from {target!r} (Hugging Face ties them)")
  if problems:
    raise CheckpointMismatchError(f"{source}: " + "; ".join(problems))
  kept = set(names.unused) | {n for n in tensors if n.endswith(IGNORED_HF_TENSORS)}
  params = map_tensors(tensors, names.params, expected_shapes(kind, arch, share), source,
                       lambda n: n in kept or n in names.aliases)
  passthrough = {n: np.asarray(tensors[n]) for n in sorted(kept) if n in tensors}
  return params, passthrough


def export_tensors(
    params: Mapping, kind: str, arch: RealmArchitecture, passthrough: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
  """realm-jax params of `kind` -> HF tensors (aliases written out, as in HF's own `state_dict`)."""
  flat = traverse_util.flatten_dict(nn.meta.unbox(dict(params)))
  cls = hf_class(kind)
  block_tower = cls.retriever.path + ("block_tower",) if cls.query_prefix else None
  share = block_tower is None or all(k[:len(block_tower)] != block_tower for k in flat)
  names = realm_names(kind, arch, share)
  want = expected_shapes(kind, arch, share)
  problems = [f"parameter {'/'.join(p)} is missing" for p in sorted(set(want) - set(flat))]
  problems += [f"parameter {'/'.join(p)} is not part of a {kind} checkpoint" for p in sorted(set(flat) - set(want))]
  problems += [f"parameter {'/'.join(p)} has shape {np.shape(flat[p])}, {kind} needs {want[p]}"
               for p in sorted(set(flat) & set(want)) if tuple(np.shape(flat[p])) != want[p]]
  if problems:
    raise CheckpointMismatchError(f"cannot export {kind}: " + "; ".join(problems))
  out = {hf: np.ascontiguousarray(layout.inverse(np.asarray(flat[path], np.float32)))
         for hf, (path, layout) in names.params.items()}
  out |= {n: np.ascontiguousarray(v) for n, v in (passthrough or {}).items()}
  out |= {alias: out[target].copy() for alias, target in names.aliases.items() if target in out}
  return dict(sorted(out.items()))


def read_hf_config(path: str | Path) -> dict:
  """A config.json as a dict; unreadable files are named."""
  path = Path(path)
  try:
    return json.loads(path.read_text())
  except (OSError, json.JSONDecodeError) as e:
    raise InputError(f"{path}: cannot read REALM config: {e}") from e


def checkpoint_kind(model_dir: str | Path) -> str:
  """The kind of a HF REALM directory, from `architectures` in its config.json."""
  hf = read_hf_config(Path(model_dir) / CONFIG_FILE)
  for kind, cls in HF_CLASSES.items():
    if cls.name in hf.get("architectures", ()):
      return kind
  raise InputError(f"{model_dir}/{CONFIG_FILE}: architectures={hf.get('architectures')!r} names no REALM class "
                   f"{sorted(c.name for c in HF_CLASSES.values())}; pass the kind explicitly")


@dataclasses.dataclass
class HfRealmCheckpoint:
  """An imported HF REALM checkpoint: what `save_hf_realm` needs to write it back unchanged."""

  kind: str
  architecture: RealmArchitecture
  params: dict
  passthrough: dict[str, np.ndarray]
  hf_config: dict


def read_safetensors(path: Path, skip: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """All tensors of a safetensors file but `skip`; a missing `.bin`-only checkpoint gets a conversion hint."""
  if not path.exists():
    bin_file = path.with_name("pytorch_model.bin")
    hint = " (convert pytorch_model.bin with tools/convert_pytorch_bin.py first)" if bin_file.exists() else ""
    raise FileNotFoundError(f"{path}: no safetensors weights{hint}")
  try:
    with safe_open(str(path), framework="numpy") as f:
      return {n: f.get_tensor(n) for n in f.keys() if n not in skip}
  except Exception as e:  # safetensors raises its own error types for corrupt headers
    raise InputError(f"{path}: unreadable safetensors file: {e}") from e


def load_hf_realm(
    model_dir: str | Path, kind: str | None = None, with_block_emb: bool = False, **bert_overrides
) -> HfRealmCheckpoint:
  """Loads a HF REALM directory (config.json + model.safetensors) into realm-jax parameters.

  RealmForOpenQA's `block_emb` (13.3M x 128 for the released models) is read only if `with_block_emb`.
  """
  model_dir = Path(model_dir)
  kind = kind or checkpoint_kind(model_dir)
  hf_config = read_hf_config(model_dir / CONFIG_FILE)
  arch = RealmArchitecture.from_hf_config(hf_config, str(model_dir / CONFIG_FILE), **bert_overrides)
  weights = model_dir / WEIGHTS_FILE
  tensors = read_safetensors(weights, () if with_block_emb else ("block_emb",))
  params, passthrough = import_tensors(tensors, kind, arch, str(weights))
  return HfRealmCheckpoint(kind, arch, params, passthrough, hf_config)


def save_hf_realm(
    model_dir: str | Path,
    kind: str,
    arch: RealmArchitecture,
    params: Mapping,
    passthrough: Mapping[str, np.ndarray] | None = None,
    hf_config: Mapping | None = None,
    overwrite: bool = False,
) -> Path:
  """Writes realm-jax params as a HF REALM directory; `hf_config` (e.g. the imported one) is updated, not replaced.

  `model_dir` must be absent or empty, or (with `overwrite`) hold only an earlier export's two files; each file is
  written to a temporary name and renamed into place, so a failed export leaves what was there."""
  model_dir = check_hf_destination(model_dir, overwrite)
  tensors = export_tensors(params, kind, arch, passthrough)
  model_dir.mkdir(parents=True, exist_ok=True)
  config = {**(hf_config or {}), **arch.to_hf_config(kind)}
  _replace(model_dir / WEIGHTS_FILE, lambda temp: save_file(tensors, str(temp), metadata={"format": "pt"}))
  _replace(model_dir / CONFIG_FILE, lambda temp: temp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n"))
  return model_dir


def check_hf_destination(model_dir: str | Path, overwrite: bool = False) -> Path:
  """`model_dir` when an HF export may be written there: absent, empty, or (`overwrite`) an earlier export."""
  model_dir = Path(model_dir)
  if model_dir.exists():
    entries = sorted(p.name for p in model_dir.iterdir()) if model_dir.is_dir() else None
    if entries is None or set(entries) - {WEIGHTS_FILE, CONFIG_FILE}:
      raise InputError(f"{model_dir}: exists and is not an HF REALM export ({entries or 'not a directory'}); "
                       "nothing is written over what realm-jax did not make: choose a new directory")
    if entries and not overwrite:
      raise InputError(f"{model_dir}: holds an HF checkpoint ({', '.join(entries)}); pass --overwrite to replace it")
  return model_dir


def check_params_destination(path: str | Path, overwrite: bool = False) -> Path:
  """`path` when a parameter file may be written there: absent, or (`overwrite`) a realm-jax parameter file."""
  path = Path(path)
  if path.exists():
    if not overwrite:
      raise InputError(f"{path}: exists; pass --overwrite to replace it (only a realm-jax parameter file is replaced)")
    load_params_file(path)  # refuses anything that is not a realm-jax parameter file
  return path


def _replace(path: Path, write: Callable[[Path], object]) -> None:
  """`write(temp)` to a hidden sibling of `path`, then renames it to `path`; the sibling is removed on failure."""
  temp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.partial")
  try:
    write(temp)
    os.replace(temp, path)
  finally:
    temp.unlink(missing_ok=True)


def save_params_file(path: str | Path, checkpoint: HfRealmCheckpoint, overwrite: bool = False) -> Path:
  """realm-jax parameters ("params/<flax path>"), HF passthrough ("hf/<name>"), kind and HF config, in one file.

  What `launch/convert.py --to=jax` writes and `--to=hf` reads.  An existing `path` is replaced only with
  `overwrite` and only when it is such a file.
  """
  path = check_params_destination(path, overwrite)
  flat = traverse_util.flatten_dict(nn.meta.unbox(checkpoint.params), sep="/")
  tensors = {f"params/{k}": np.ascontiguousarray(np.asarray(v, np.float32)) for k, v in flat.items()}
  tensors |= {f"hf/{k}": np.ascontiguousarray(v) for k, v in checkpoint.passthrough.items()}
  path.parent.mkdir(parents=True, exist_ok=True)
  metadata = {"kind": checkpoint.kind, "hf_config": json.dumps(checkpoint.hf_config)}
  _replace(path, lambda temp: save_file(tensors, str(temp), metadata=metadata))
  return path


def load_params_file(path: str | Path) -> HfRealmCheckpoint:
  """Reads a `save_params_file` file back, checking its parameters against the kind's modules."""
  path = Path(path)
  try:
    with safe_open(str(path), framework="numpy") as f:
      meta = f.metadata() or {}
      tensors = {n: f.get_tensor(n) for n in f.keys()}
  except Exception as e:  # safetensors raises its own error types for corrupt headers
    raise InputError(f"{path}: unreadable safetensors file: {e}") from e
  if "kind" not in meta or "hf_config" not in meta:
    raise InputError(f"{path}: not a realm-jax REALM parameter file (no kind / hf_config metadata)")
  hf_config = json.loads(meta["hf_config"])
  arch = RealmArchitecture.from_hf_config(hf_config, str(path))
  params = traverse_util.unflatten_dict({k[len("params/"):]: v for k, v in tensors.items()
                                         if k.startswith("params/")}, sep="/")
  passthrough = {k[len("hf/"):]: v for k, v in tensors.items() if k.startswith("hf/")}
  export_tensors(params, meta["kind"], arch)  # validates names and shapes
  return HfRealmCheckpoint(meta["kind"], arch, params, passthrough, hf_config)


SPEC_PREFIX = "hf_realm:"  # gin init specs: RETRIEVER_INIT / READER_INIT = 'hf_realm:<HF REALM directory>'


def _spec_dir(spec: str | Path) -> Path:
  return Path(str(spec).removeprefix(SPEC_PREFIX))


def _load_for(spec: str | Path, encoder: BertConfig, role: str,
              accepts: Callable[[HfRealmClass], bool]) -> tuple[HfRealmCheckpoint, HfRealmClass]:
  """Loads `spec` for `role`, refusing classes not `accepts`ed and an architecture other than the gin `encoder`."""
  path = _spec_dir(spec)
  kind = checkpoint_kind(path)
  cls = HF_CLASSES[kind]
  if not accepts(cls):
    raise InputError(f"{path}: a {cls.name} checkpoint cannot initialise the {role} "
                     f"(needs one of {[c.name for c in HF_CLASSES.values() if accepts(c)]})")
  checkpoint = load_hf_realm(path, kind, **{k: getattr(encoder, k) for k in RUNTIME_FIELDS})
  check_architecture(encoder, checkpoint.architecture.bert, str(path / CONFIG_FILE))
  return checkpoint, cls


def _subtree(params: dict, path: tuple[str, ...]) -> dict:
  for key in path:
    params = params[key]
  return params


def load_hf_realm_retriever(path: str | Path, encoder: BertConfig, projection_size: int) -> dict:
  """DualEncoder params from a RealmEmbedder, RealmScorer or RealmForOpenQA (its embedder) directory."""
  checkpoint, cls = _load_for(path, encoder, "retriever", lambda c: c.retriever is not None)
  if checkpoint.architecture.projection_size != projection_size:
    raise InputError(f"{path}: retriever_proj_size {checkpoint.architecture.projection_size} != {projection_size}")
  return _subtree(checkpoint.params, cls.retriever.path)


def load_hf_realm_encoder(path: str | Path, encoder: BertConfig) -> dict:
  """RealmModel's {'reader', 'mlm_head'} from a RealmKnowledgeAugEncoder directory (REALM pre-training)."""
  checkpoint, cls = _load_for(path, encoder, "knowledge-augmented encoder", lambda c: c.mlm is not None)
  return _subtree(checkpoint.params, cls.mlm.path)


def load_hf_realm_reader(path: str | Path, encoder: BertConfig, span_hidden_size: int = 256,
                         max_span_width: int = 10, *, reader_layer_norm_eps: float = 1e-3) -> dict:
  """SpanReader params from a RealmReader / RealmForOpenQA directory; from a RealmKnowledgeAugEncoder only
  {'encoder'} (ORQA fine-tuning starts the reader's BERT from REALM's and its span scorer afresh).

  The span scorer's shape and LayerNorm eps must be the model's (`reader_layer_norm_eps`: `SpanReader.layer_norm_eps`).
  """
  checkpoint, cls = _load_for(path, encoder, "Open-QA reader", lambda c: c.reader is not None or c.mlm is not None)
  if cls.reader is None:
    return {"encoder": _subtree(checkpoint.params, cls.bert)}
  arch, config = checkpoint.architecture, _spec_dir(path) / CONFIG_FILE
  if (arch.span_hidden_size, arch.max_span_width) != (span_hidden_size, max_span_width):
    raise InputError(f"{config}: span_hidden_size/max_span_width {arch.span_hidden_size}/{arch.max_span_width} "
                     f"!= {span_hidden_size}/{max_span_width}")
  if arch.reader_layer_norm_eps != reader_layer_norm_eps:
    raise InputError(f"{config}: reader_layer_norm_eps {arch.reader_layer_norm_eps} != the reader's "
                     f"{reader_layer_norm_eps}; bind openqa.OpenQaSpec.reader_layer_norm_eps = "
                     f"{arch.reader_layer_norm_eps}")
  return _subtree(checkpoint.params, cls.reader.path)


def load_hf_realm_bert(path: str | Path, encoder: BertConfig) -> dict:
  """The BertEncoder params of any REALM checkpoint: its reader's (encoder, reader, openqa) or else its
  query tower's (embedder, scorer).  What `'hf_realm:<dir>'` means where plain BERT weights are expected."""
  checkpoint, cls = _load_for(path, encoder, "BERT encoder", lambda c: True)
  return _subtree(checkpoint.params, cls.bert)
