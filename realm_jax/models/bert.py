"""BERT encoder (post-LN, tanh pooler) and MLM head in Flax Linen.

Parameters carry logical axis names (see `realm_jax.partitioning.LOGICAL_AXIS_RULES`);
activations are constrained at layer boundaries.  Parameters are float32; `dtype`
sets the compute dtype (bfloat16 on TPU).  Module names follow the structure of
Hugging Face `BertModel` so `realm_jax.checkpoints.hf_bert` maps them one to one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from realm_jax.errors import InputError

Array = jax.Array

# BertConfig.hidden_act -> whether GELU uses the tanh approximation.
GELU_APPROXIMATE = {"gelu": False, "gelu_new": True}
# HF `hidden_act` names -> BertConfig.hidden_act ("gelu_pytorch_tanh" is the same tanh formula).
HF_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new"}
REQUIRED_HF_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                      "max_position_embeddings", "type_vocab_size")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT encoder.  Defaults are BERT-base uncased."""

  vocab_size: int = 30522
  hidden_size: int = 768
  num_layers: int = 12
  num_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  initializer_range: float = 0.02
  hidden_act: str = "gelu"  # "gelu" (exact erf, HF BERT) or "gelu_new" (tanh approximation: TF BERT, REALM)
  dtype: str = "float32"  # compute dtype: "float32" or "bfloat16"
  remat: bool = False  # rematerialise each layer in the backward pass
  # Pooled output: "cls" = tanh(dense([CLS])) as BERT/REALM; "mean" = mean of the token states over the
  # input mask, as sentence-transformers (all-MiniLM-L6-v2) was trained.  The pooler weights exist either way.
  pooling: str = "cls"

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise InputError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.dtype not in ("float32", "bfloat16"):
      raise InputError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
    if self.pooling not in ("cls", "mean"):
      raise InputError(f"pooling must be 'cls' or 'mean', got {self.pooling!r}")
    if self.hidden_act not in GELU_APPROXIMATE:
      raise InputError(f"hidden_act must be one of {sorted(GELU_APPROXIMATE)}, got {self.hidden_act!r}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def gelu_approximate(self) -> bool:
    return GELU_APPROXIMATE[self.hidden_act]

  @property
  def compute_dtype(self) -> jnp.dtype:
    return jnp.dtype(self.dtype)

  @classmethod
  def from_hf_json(cls, path: str | Path, **overrides: Any) -> BertConfig:
    """Reads a Hugging Face BERT `config.json`."""
    path = Path(path)
    try:
      hf = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
      raise InputError(f"{path}: cannot read BERT config: {e}") from e
    return cls.from_hf_dict(hf, str(path), **overrides)

  @classmethod
  def from_hf_dict(cls, hf: dict[str, Any], source: str, **overrides: Any) -> BertConfig:
    """A Hugging Face BERT config (as read from `source`, named in errors)."""
    hidden_act = HF_ACTIVATIONS.get(hf.get("hidden_act", "gelu"))
    if hidden_act is None:
      raise InputError(f"{source}: hidden_act={hf['hidden_act']!r} unsupported (one of {sorted(HF_ACTIVATIONS)})")
    if hf.get("position_embedding_type", "absolute") != "absolute":
      raise InputError(f"{source}: only absolute position embeddings are supported")
    missing = [k for k in REQUIRED_HF_FIELDS if k not in hf]
    if missing:
      raise InputError(f"{source}: config lacks {missing}")
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf["max_position_embeddings"],
        type_vocab_size=hf["type_vocab_size"],
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        initializer_range=hf.get("initializer_range", 0.02),
        hidden_act=hidden_act,
    )
    fields.update(overrides)
    return cls(**fields)


def normal_init(config: BertConfig, names: tuple[str, ...]) -> nn.initializers.Initializer:
  """Normal(initializer_range) init carrying logical axis names."""
  return nn.with_logical_partitioning(nn.initializers.normal(config.initializer_range), names)


def zeros_init(names: tuple[str, ...]) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def ones_init(names: tuple[str, ...]) -> nn.initializers.Initializer:
  return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32, scale/bias named for the rules table."""

  epsilon: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return nn.LayerNorm(
        epsilon=self.epsilon,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        scale_init=ones_init(("embed",)),
        bias_init=zeros_init(("embed",)),
        name="norm",
    )(x.astype(jnp.float32)).astype(self.dtype)


class Embeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array, deterministic: bool) -> Array:
    c = self.config
    embed = lambda n, rows, names: nn.Embed(  # noqa: E731
        rows, c.hidden_size, embedding_init=normal_init(c, names), name=n
    )
    word = embed("word_embeddings", c.vocab_size, ("vocab", "embed"))(input_ids)
    positions = jnp.arange(input_ids.shape[-1])[None, :]
    pos = embed("position_embeddings", c.max_position_embeddings, ("position", "embed"))(positions)
    types = embed("token_type_embeddings", c.type_vocab_size, ("type_vocab", "embed"))(token_type_ids)
    x = LayerNorm(c.layer_norm_eps, c.compute_dtype, name="layer_norm")(word + pos + types)
    return nn.Dropout(c.hidden_dropout)(x, deterministic=deterministic)


class Einsum(nn.Module):
  """`einsum(equation, x, kernel) + bias` with logically named parameters of any rank.

  (Flax's DenseGeneral initialises a flattened kernel, which breaks logical constraints.)
  """

  equation: str
  kernel_shape: tuple[int, ...]
  kernel_axes: tuple[str, ...]
  bias_axes: tuple[str, ...]
  config: BertConfig

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.config
    kernel = self.param("kernel", normal_init(c, self.kernel_axes), self.kernel_shape, jnp.float32)
    bias_shape = self.kernel_shape[-len(self.bias_axes) :]
    bias = self.param("bias", zeros_init(self.bias_axes), bias_shape, jnp.float32)
    y = jnp.einsum(self.equation, x.astype(c.compute_dtype), kernel.astype(c.compute_dtype))
    return y + bias.astype(c.compute_dtype)


class SelfAttention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    c = self.config
    proj = lambda n: Einsum(  # noqa: E731
        "ble,ehd->blhd", (c.hidden_size, c.num_heads, c.head_dim),
        ("embed", "heads", "kv"), ("heads", "kv"), c, name=n,
    )
    q, k, v = proj("query")(x), proj("key")(x), proj("value")(x)
    q = nn.with_logical_constraint(q, ("batch", "length", "heads", "kv"))
    # Heads-major [B, H, L, D] for both attention products: with their batch dims leading XLA:CPU runs the
    # attention forward ~1.6x faster (bench/cpu_kernels.py); on TPU/GPU layout assignment absorbs the swap.
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(c.head_dim)
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(c.attention_dropout)(probs, deterministic=deterministic)
    context = jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", probs.astype(c.compute_dtype), v), 1, 2)
    return Einsum(
        "blhd,hde->ble", (c.num_heads, c.head_dim, c.hidden_size),
        ("heads", "kv", "embed"), ("embed",), c, name="output",
    )(context)


class TransformerLayer(nn.Module):
  """One post-LN BERT layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

  config: BertConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    c = self.config
    dropout = nn.Dropout(c.hidden_dropout)
    attn = SelfAttention(c, name="attention")(x, mask, deterministic)
    x = LayerNorm(c.layer_norm_eps, c.compute_dtype, name="attention_layer_norm")(
        x + dropout(attn, deterministic=deterministic)
    )
    h = nn.Dense(
        c.intermediate_size,
        dtype=c.compute_dtype,
        kernel_init=normal_init(c, ("embed", "mlp")),
        bias_init=zeros_init(("mlp",)),
        name="intermediate",
    )(x)
    h = nn.with_logical_constraint(jax.nn.gelu(h, approximate=c.gelu_approximate), ("batch", "length", "mlp"))
    h = nn.Dense(
        c.hidden_size,
        dtype=c.compute_dtype,
        kernel_init=normal_init(c, ("mlp", "embed")),
        bias_init=zeros_init(("embed",)),
        name="output",
    )(h)
    x = LayerNorm(c.layer_norm_eps, c.compute_dtype, name="output_layer_norm")(
        x + dropout(h, deterministic=deterministic)
    )
    return nn.with_logical_constraint(x, ("batch", "length", "embed"))


class BertEncoder(nn.Module):
  """Returns (sequence_output [B, L, H], pooled_output [B, H]); `config.pooling` picks the pooled output."""

  config: BertConfig

  @nn.compact
  def __call__(
      self,
      input_ids: Array,
      attention_mask: Array,
      token_type_ids: Array | None = None,
      deterministic: bool = True,
  ) -> tuple[Array, Array]:
    c = self.config
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    mask = attention_mask.astype(bool)
    x = Embeddings(c, name="embeddings")(input_ids, token_type_ids, deterministic)
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    layer_cls = nn.remat(TransformerLayer, static_argnums=(3,)) if c.remat else TransformerLayer
    for i in range(c.num_layers):
      x = layer_cls(c, name=f"layer_{i}")(x, mask, deterministic)
    pooled = nn.Dense(
        c.hidden_size,
        dtype=c.compute_dtype,
        kernel_init=normal_init(c, ("embed", "hidden")),
        bias_init=zeros_init(("hidden",)),
        name="pooler",
    )(x[:, 0])
    if c.pooling == "mean":
      weights = attention_mask.astype(jnp.float32)[..., None]
      mean = (x.astype(jnp.float32) * weights).sum(1) / jnp.maximum(weights.sum(1), 1.0)
      return x, mean.astype(x.dtype)
    return x, jnp.tanh(pooled)


class MlmHead(nn.Module):
  """BERT's MLM head: dense + GELU + LayerNorm, output tied to the word embeddings, plus a bias."""

  config: BertConfig

  @nn.compact
  def __call__(self, hidden: Array, word_embeddings: Array) -> Array:
    c = self.config
    h = nn.Dense(
        c.hidden_size,
        dtype=c.compute_dtype,
        kernel_init=normal_init(c, ("embed", "hidden")),
        bias_init=zeros_init(("hidden",)),
        name="transform",
    )(hidden)
    h = LayerNorm(c.layer_norm_eps, c.compute_dtype, name="layer_norm")(jax.nn.gelu(h, approximate=c.gelu_approximate))
    bias = self.param("bias", zeros_init(("vocab",)), (c.vocab_size,), jnp.float32)
    logits = jnp.einsum("...h,vh->...v", h, jnp.asarray(word_embeddings, c.compute_dtype))
    return logits.astype(jnp.float32) + bias
