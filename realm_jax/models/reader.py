"""Open-QA span reader (ORQA/REALM fine-tuning): BERT over `[CLS] question [SEP] block [SEP]` + span MLP.

As in the released `orqa_model.py`: dense(hidden -> 2 * span_hidden) on every token, split into start
and end halves; a span (s, e) is `start[s] + end[e]` -> ReLU -> LayerNorm(`layer_norm_eps`, 1e-3) -> dense(1).
Spans are every (s, e) with width 1..max_span_width whose start and end both lie in the block part.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.data.features import span_grid
from realm_jax.models.bert import BertConfig, BertEncoder, normal_init, ones_init, zeros_init

Array = jax.Array
INVALID_SPAN_LOGIT = -10000.0  # the released code's value for spans outside the block
HF_INVALID_SPAN_LOGIT = float(np.finfo(np.float32).min)  # Hugging Face RealmReader's value


class SpanScorer(nn.Module):
  """Span logits [..., num_spans] from token states [..., L, H] and a block mask [..., L]."""

  config: BertConfig
  span_hidden_size: int = 256
  max_span_width: int = 10
  layer_norm_eps: float = 1e-3
  invalid_span_logit: float = INVALID_SPAN_LOGIT

  @nn.compact
  def __call__(self, hidden: Array, block_mask: Array) -> Array:
    c = self.config
    seq_len = hidden.shape[-2]
    projected = nn.Dense(
        2 * self.span_hidden_size, dtype=c.compute_dtype,
        kernel_init=normal_init(c, ("embed", "hidden")), bias_init=zeros_init(("hidden",)), name="intermediate",
    )(hidden)
    start_part, end_part = jnp.split(projected, 2, axis=-1)
    starts, ends = span_grid(seq_len, self.max_span_width)
    clipped_ends = np.minimum(ends, seq_len - 1)
    span = jax.nn.relu(start_part[..., starts, :] + end_part[..., clipped_ends, :])
    span = nn.LayerNorm(
        epsilon=self.layer_norm_eps, param_dtype=jnp.float32,
        scale_init=ones_init(("hidden",)), bias_init=zeros_init(("hidden",)), name="layer_norm",
    )(span.astype(jnp.float32))
    logits = nn.Dense(
        1, dtype=c.compute_dtype, kernel_init=normal_init(c, ("hidden", None)), bias_init=zeros_init((None,)),
        name="output",
    )(span)[..., 0].astype(jnp.float32)
    in_block = block_mask.astype(bool)
    valid = (ends < seq_len) & in_block[..., starts] & in_block[..., clipped_ends]
    return jnp.where(valid, logits, self.invalid_span_logit)


class SpanReader(nn.Module):
  """BERT encoder + span scorer: span logits [B, K, num_spans] for K blocks per question."""

  config: BertConfig
  span_hidden_size: int = 256
  max_span_width: int = 10
  layer_norm_eps: float = 1e-3
  # Released code: -10000; Hugging Face's RealmReader adds float32 min (HF_INVALID_SPAN_LOGIT).
  invalid_span_logit: float = INVALID_SPAN_LOGIT

  def setup(self):
    self.encoder = BertEncoder(self.config)
    self.span_scorer = SpanScorer(self.config, self.span_hidden_size, self.max_span_width, self.layer_norm_eps,
                                  self.invalid_span_logit)

  def __call__(self, inputs: dict[str, Array], deterministic: bool = True) -> Array:
    batch, k, seq_len = inputs["input_ids"].shape
    flat = {name: inputs[name].reshape(batch * k, seq_len) for name in ("input_ids", "input_mask", "segment_ids")}
    hidden, _ = self.encoder(flat["input_ids"], flat["input_mask"], flat["segment_ids"], deterministic)
    logits = self.span_scorer(hidden, inputs["block_mask"].reshape(batch * k, seq_len))
    return logits.reshape(batch, k, -1)
