"""Dense retriever: BERT pooled output -> dense(128) -> LayerNorm -> dropout (training only).

As in ORQA/REALM's `ict_model.module_fn`: one tower embeds queries and blocks
(`share_towers=True`, the released default); separate towers are the paper's
W_input / W_doc variant.  Relevance is a plain inner product.

`projection_init="identity"` (projection size = hidden size) starts the projection as the identity, so a
warm start from a sentence encoder (MiniLM, mean pooling) begins with that encoder's embedding space
(LayerNorm'd) instead of a random 128-d view of it.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from realm_jax.errors import InputError
from realm_jax.models.bert import BertConfig, BertEncoder, normal_init, ones_init, zeros_init

Array = jax.Array


PROJECTION_INITS = ("normal", "identity")


def identity_init(names: tuple[str, ...]) -> nn.initializers.Initializer:
  """Identity matrix init (square kernels only) carrying logical axis names."""

  def init(key, shape, dtype=jnp.float32):
    del key
    if shape[0] != shape[1]:
      raise InputError(f"projection_init='identity' needs projection_size == hidden_size, got kernel {shape}")
    return jnp.eye(shape[0], dtype=dtype)

  return nn.with_logical_partitioning(init, names)


class RetrieverTower(nn.Module):
  config: BertConfig
  projection_size: int = 128
  layer_norm_eps: float = 1e-3  # Keras LayerNormalization default, as in the released code
  dropout: float = 0.1
  projection_init: str = "normal"  # "identity": keep a sentence encoder's space (projection_size = hidden)

  @nn.compact
  def __call__(self, input_ids: Array, input_mask: Array, segment_ids: Array, deterministic: bool) -> Array:
    if self.projection_init not in PROJECTION_INITS:
      raise InputError(f"projection_init {self.projection_init!r}: expected one of {PROJECTION_INITS}")
    _, pooled = BertEncoder(self.config, name="encoder")(input_ids, input_mask, segment_ids, deterministic)
    kernel_init = (identity_init(("embed", "proj")) if self.projection_init == "identity"
                   else normal_init(self.config, ("embed", "proj")))
    x = nn.Dense(
        self.projection_size,
        dtype=self.config.compute_dtype,
        kernel_init=kernel_init,
        bias_init=zeros_init(("proj",)),
        name="projection",
    )(pooled)
    x = nn.LayerNorm(
        epsilon=self.layer_norm_eps,
        param_dtype=jnp.float32,
        scale_init=ones_init(("proj",)),
        bias_init=zeros_init(("proj",)),
        name="layer_norm",
    )(x.astype(jnp.float32))
    return nn.Dropout(self.dropout)(x, deterministic=deterministic)


class DualEncoder(nn.Module):
  """Query and block embeddings [B, projection_size] (float32)."""

  config: BertConfig
  projection_size: int = 128
  share_towers: bool = True
  dropout: float = 0.1
  layer_norm_eps: float = 1e-3  # released code (Keras default); Hugging Face's RealmEmbedder uses 1e-12
  projection_init: str = "normal"

  def setup(self):
    tower = lambda name: RetrieverTower(  # noqa: E731
        self.config, self.projection_size, self.layer_norm_eps, self.dropout, self.projection_init, name=name
    )
    self.query_tower = tower("query_tower")
    self.block_tower = self.query_tower if self.share_towers else tower("block_tower")

  def embed_queries(self, inputs: dict[str, Array], deterministic: bool = True) -> Array:
    return self.query_tower(inputs["input_ids"], inputs["input_mask"], inputs["segment_ids"], deterministic)

  def embed_blocks(self, inputs: dict[str, Array], deterministic: bool = True) -> Array:
    return self.block_tower(inputs["input_ids"], inputs["input_mask"], inputs["segment_ids"], deterministic)

  def __call__(self, queries: dict[str, Array], blocks: dict[str, Array], deterministic: bool = True):
    return self.embed_queries(queries, deterministic), self.embed_blocks(blocks, deterministic)


@dataclasses.dataclass(frozen=True)
class RetrieverConfig:
  """The retriever every job of a run shares: the trainer's model, the refresher's and fine-tuning's indexes.

  Bound once in a run gin (`retriever.RetrieverConfig`); the trainer records it in `<workdir>/retriever.json`
  so the refresh job embeds blocks exactly as the trainer's block tower does.
  """

  encoder: BertConfig
  projection_size: int = 128  # REALM/ORQA: 128
  projection_init: str = "normal"  # "identity": a sentence encoder's space (projection_size = hidden size)
  share_towers: bool = True  # one tower embeds queries and blocks (the released default)
  layer_norm_eps: float = 1e-3  # the projection's LayerNorm (Keras default, released code); HF REALM: 1e-12
  score_scale: float = 1.0  # REALM: p(z|x) = softmax(score_scale * <query, block>); 1.0: the released code
  block_len: int = 288  # the block tower's input length: the index's blocks

  @property
  def block_tower(self) -> str:
    """The name of the tower that embeds blocks (the index)."""
    return "query_tower" if self.share_towers else "block_tower"

  def dual_encoder(self) -> DualEncoder:
    return DualEncoder(self.encoder, self.projection_size, self.share_towers, layer_norm_eps=self.layer_norm_eps,
                       projection_init=self.projection_init)

  def tower(self) -> RetrieverTower:
    """One tower on its own (what the refresher embeds blocks with)."""
    return RetrieverTower(self.encoder, self.projection_size, self.layer_norm_eps,
                          projection_init=self.projection_init)

  def abstract_tower_params(self) -> dict:
    """Shapes of one tower's parameters (no memory, no FLOPs)."""
    x = jnp.zeros((1, 8), jnp.int32)
    init = lambda: self.tower().init(jax.random.key(0), x, x, x, True)["params"]  # noqa: E731
    return nn.meta.unbox(jax.eval_shape(init))
