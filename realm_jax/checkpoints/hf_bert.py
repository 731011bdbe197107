"""Hugging Face BERT checkpoints (config.json + safetensors) <-> realm-jax parameters.

The name mapping lives in `hf_to_flax_names` only.  Torch `Linear` weights are
[out, in] and are transposed; attention projections are reshaped to
[embed, heads, head_dim].  Each `Layout` also knows its inverse (only transposes and
reshapes, so export is bit-exact).  Safetensors holds plain tensors: nothing is unpickled.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util
from safetensors.numpy import load_file

from realm_jax.errors import InputError
from realm_jax.models.bert import BertConfig, BertEncoder


@dataclasses.dataclass(frozen=True)
class Layout:
  """HF tensor layout -> flax parameter layout (`__call__`) and back (`inverse`)."""

  forward: Callable[[np.ndarray], np.ndarray]
  inverse: Callable[[np.ndarray], np.ndarray]

  def __call__(self, x: np.ndarray) -> np.ndarray:
    return self.forward(x)


NameTable = dict[str, tuple[tuple[str, ...], Layout]]
IDENTITY = Layout(np.asarray, np.asarray)
TRANSPOSE = Layout(lambda w: w.T, lambda k: k.T)  # torch Linear [out, in] <-> flax Dense [in, out]

# Tensors in HF files that carry no parameters.
IGNORED_HF_TENSORS = ("embeddings.position_ids",)
# BertConfig fields a checkpoint does not fix: gin's values are used, never compared.
RUNTIME_FIELDS = ("dtype", "remat", "hidden_dropout", "attention_dropout", "pooling")
# BertConfig fields only parameter initialisation reads (`models.bert.normal_init`), no forward pass.
INIT_ONLY_FIELDS = ("initializer_range",)


def norm_names(hf: str, flax: tuple[str, ...]) -> NameTable:
  """A torch LayerNorm (weight, bias) <-> flax LayerNorm (scale, bias)."""
  return {f"{hf}.weight": (flax + ("scale",), IDENTITY), f"{hf}.bias": (flax + ("bias",), IDENTITY)}


def dense_names(hf: str, flax: tuple[str, ...], kernel: Layout = TRANSPOSE, bias: Layout = IDENTITY) -> NameTable:
  """A torch Linear (weight, bias) <-> flax Dense (kernel, bias)."""
  return {f"{hf}.weight": (flax + ("kernel",), kernel), f"{hf}.bias": (flax + ("bias",), bias)}


def hf_to_flax_names(config: BertConfig, prefix: str = "") -> NameTable:
  """HF tensor name -> (flax parameter path, layout transform from HF to flax)."""
  h, d = config.num_heads, config.head_dim
  identity = IDENTITY
  heads_in = Layout(lambda w: w.T.reshape(-1, h, d), lambda k: k.reshape(k.shape[0], h * d).T)  # [out,in]->[in,h,d]
  heads_bias = Layout(lambda b: b.reshape(h, d), lambda b: b.reshape(h * d))
  heads_out = Layout(lambda w: w.T.reshape(h, d, -1), lambda k: k.reshape(h * d, -1).T)  # [out,in] -> [h,d,out]

  norm = lambda hf, flax: norm_names(hf, flax + ("norm",))  # noqa: E731  realm_jax.models.bert.LayerNorm
  dense = dense_names

  table = {}
  for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
    table[f"embeddings.{name}.weight"] = (("embeddings", name, "embedding"), identity)
  table |= norm("embeddings.LayerNorm", ("embeddings", "layer_norm"))
  for i in range(config.num_layers):
    hf, fx = f"encoder.layer.{i}", (f"layer_{i}",)
    for proj in ("query", "key", "value"):
      table |= dense(f"{hf}.attention.self.{proj}", fx + ("attention", proj), heads_in, heads_bias)
    table |= dense(f"{hf}.attention.output.dense", fx + ("attention", "output"), heads_out)
    table |= norm(f"{hf}.attention.output.LayerNorm", fx + ("attention_layer_norm",))
    table |= dense(f"{hf}.intermediate.dense", fx + ("intermediate",))
    table |= dense(f"{hf}.output.dense", fx + ("output",))
    table |= norm(f"{hf}.output.LayerNorm", fx + ("output_layer_norm",))
  table |= dense("pooler.dense", ("pooler",))
  return {prefix + k: v for k, v in table.items()}


def check_architecture(expected: BertConfig, found: BertConfig, where: str) -> None:
  """Refuses a checkpoint config `found` (read from `where`) whose forward pass differs from gin's `expected`.

  `INIT_ONLY_FIELDS` that differ are logged (gin's value is used); `RUNTIME_FIELDS` are not compared.
  """
  diffs = {f.name: (getattr(expected, f.name), getattr(found, f.name)) for f in dataclasses.fields(BertConfig)
           if f.name not in RUNTIME_FIELDS and getattr(expected, f.name) != getattr(found, f.name)}
  listed = lambda names: ", ".join(f"{k}={diffs[k]!r}" for k in names)
  refused = [k for k in diffs if k not in INIT_ONLY_FIELDS]
  if refused:
    raise InputError(f"{where}: architecture differs from the gin encoder (gin value, checkpoint value): "
                     f"{listed(refused)}")
  if diffs:
    logging.warning("%s: differs from the gin encoder only in what initialisation reads (gin value, checkpoint "
                    "value): %s; gin's values are used", where, listed(diffs))


class CheckpointMismatchError(InputError):
  """A checkpoint whose tensors do not match the model: names what is missing, extra or mis-shaped."""


def find_prefix(names: set[str]) -> str:
  """HF files store BERT either bare or under "bert." (e.g. BertForPreTraining)."""
  return "bert." if any(n.startswith("bert.encoder.") for n in names) else ""


def map_tensors(
    tensors: Mapping[str, np.ndarray],
    mapping: NameTable,
    expected_shapes: Mapping[tuple[str, ...], tuple[int, ...]],
    source: str,
    tolerated: Callable[[str], bool] = lambda name: False,
) -> dict:
  """Maps HF tensors onto a flax parameter tree by `mapping`, naming every missing, extra or mis-shaped tensor.

  Tensors outside `mapping` are errors unless `tolerated(name)`.
  """
  missing = sorted(set(mapping) - set(tensors))
  problems = [f"missing tensor {n!r}" for n in missing]
  flat = {}
  for hf_name, (path, transform) in mapping.items():
    if hf_name in missing:
      continue
    value = transform(np.asarray(tensors[hf_name], np.float32))
    want = expected_shapes.get(path)
    if want is None:
      problems.append(f"tensor {hf_name!r} maps to unknown parameter {'/'.join(path)}")
    elif tuple(value.shape) != tuple(want):
      problems.append(
          f"tensor {hf_name!r} has shape {tuple(tensors[hf_name].shape)}; "
          f"{'/'.join(path)} needs {tuple(want)} after conversion, got {value.shape}"
      )
    flat[path] = value
  unmapped = set(expected_shapes) - set(flat) - {mapping[n][0] for n in missing}
  problems += [f"parameter {'/'.join(p)} has no tensor in the checkpoint" for p in sorted(unmapped)]
  extra = sorted(n for n in tensors if n not in mapping and not tolerated(n))
  problems += [f"unexpected tensor {n!r}" for n in extra]
  if problems:
    raise CheckpointMismatchError(f"{source}: " + "; ".join(problems))
  return traverse_util.unflatten_dict(flat)


def convert_hf_tensors(
    tensors: Mapping[str, np.ndarray],
    config: BertConfig,
    expected_shapes: Mapping[tuple[str, ...], tuple[int, ...]],
    source: str,
) -> dict:
  """Maps HF BERT tensors onto an encoder's flax parameter tree, checking names and shapes."""
  prefix = find_prefix(set(tensors))
  return map_tensors(tensors, hf_to_flax_names(config, prefix), expected_shapes, source,
                     lambda n: n.endswith(IGNORED_HF_TENSORS) or not n.startswith(prefix))


def load_hf_bert(model_dir: str | Path, **config_overrides) -> tuple[BertConfig, dict]:
  """Loads `config.json` + `model.safetensors` from a HF BERT directory into encoder params."""
  model_dir = Path(model_dir)
  weights = model_dir / "model.safetensors"
  if not weights.exists():
    bin_file = model_dir / "pytorch_model.bin"
    hint = " (convert pytorch_model.bin to safetensors first)" if bin_file.exists() else ""
    raise FileNotFoundError(f"{weights}: no safetensors weights{hint}")
  config = BertConfig.from_hf_json(model_dir / "config.json", **config_overrides)
  try:
    tensors = load_file(str(weights))
  except Exception as e:  # safetensors raises its own error types for corrupt headers
    raise InputError(f"{weights}: unreadable safetensors file: {e}") from e
  return config, convert_hf_tensors(tensors, config, encoder_param_shapes(config), str(weights))


def encoder_param_shapes(config: BertConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat parameter shapes of `BertEncoder(config)`, computed abstractly (no FLOPs, no memory)."""
  ids = jnp.zeros((1, 4), jnp.int32)
  abstract = jax.eval_shape(lambda: BertEncoder(config).init(jax.random.key(0), ids, ids))
  params = nn.meta.unbox(abstract["params"])
  return {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(params).items()}
