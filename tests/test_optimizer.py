"""BERT AdamW: schedule formula, no bias correction, no decay on LayerNorm/bias, clipping."""

import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax.train.optimizer import (
  OptimizerConfig,
  bert_adamw,
  bert_schedule,
  bert_warmup_steps,
  decay_mask,
  subtree_multipliers,
)


@pytest.mark.parametrize("steps, warmup", [(500, 100), (5_000, 500), (200_000, 10_000), (10, 100)])
def test_warmup_is_min_10000_max_100_tenth(steps, warmup):
  assert bert_warmup_steps(steps) == warmup


def test_schedule_warms_up_then_decays_linearly_from_step_zero():
  lr = bert_schedule(1e-4, num_steps=1000)  # warmup 100
  np.testing.assert_allclose([lr(0), lr(50), lr(100), lr(500), lr(1000)], [0, 5e-5, 9e-5, 5e-5, 0], atol=1e-12)


def test_decay_mask_skips_layer_norm_and_biases():
  params = {"layer_0": {"intermediate": {"kernel": 1, "bias": 2}, "output_layer_norm": {"norm": {"scale": 3}}},
            "embeddings": {"word_embeddings": {"embedding": 4}}}
  mask = decay_mask(params)
  assert mask["layer_0"]["intermediate"] == {"kernel": True, "bias": False}
  assert mask["layer_0"]["output_layer_norm"]["norm"]["scale"] is False
  assert mask["embeddings"]["word_embeddings"]["embedding"] is True


def test_two_updates_match_bert_adam_weight_decay_by_hand():
  lr, wd, b1, b2, eps = 1e-3, 0.01, 0.9, 0.999, 1e-6
  params = {"w": {"kernel": jnp.array([1.0, -2.0])}, "b": {"bias": jnp.array([0.5])}}
  grads = [{"w": {"kernel": jnp.array([0.3, -0.1])}, "b": {"bias": jnp.array([0.2])}},
           {"w": {"kernel": jnp.array([-0.2, 0.4])}, "b": {"bias": jnp.array([0.1])}}]
  opt = bert_adamw(lr, num_steps=1000, weight_decay=wd, warmup_steps=0)
  state = opt.init(params)
  p = {k: {n: np.asarray(v) for n, v in d.items()} for k, d in params.items()}
  m = {k: {n: 0 * v for n, v in d.items()} for k, d in p.items()}
  v = {k: {n: 0 * x for n, x in d.items()} for k, d in p.items()}
  for step, g in enumerate(grads):
    updates, state = opt.update(g, state, params)
    params = {k: {n: params[k][n] + updates[k][n] for n in d} for k, d in params.items()}
    rate = lr * (1 - step / 1000)
    for k in p:
      for n in p[k]:
        gk = np.asarray(g[k][n])
        m[k][n] = b1 * m[k][n] + (1 - b1) * gk
        v[k][n] = b2 * v[k][n] + (1 - b2) * gk**2
        update = m[k][n] / (np.sqrt(v[k][n]) + eps)  # no bias correction
        if n != "bias":
          update = update + wd * p[k][n]
        p[k][n] = p[k][n] - rate * update
  for k in p:
    for n in p[k]:
      np.testing.assert_allclose(params[k][n], p[k][n], rtol=1e-6)


def _second_update_by_hand(first, second, clip_norm, lr=1.0, num_steps=10**6, b1=0.9, b2=0.999, eps=1e-6):
  """BERT Adam's second update on two gradients, each clipped to global norm `clip_norm` first."""
  clip = lambda g: g * min(1.0, clip_norm / np.linalg.norm(g))  # noqa: E731
  g1, g2 = clip(np.asarray(first, np.float64)), clip(np.asarray(second, np.float64))
  m = b1 * (1 - b1) * g1 + (1 - b1) * g2
  v = b2 * (1 - b2) * g1**2 + (1 - b2) * g2**2
  return -lr * (1 - 1 / num_steps) * m / (np.sqrt(v) + eps)


def test_gradients_are_clipped_to_global_norm_one():
  """A gradient of norm 500 enters Adam's moments as its unit vector; one of norm 0.5 enters unchanged."""
  first, second = [300.0, 400.0], [0.3, -0.4]
  params = {"kernel": jnp.zeros(2)}
  updates = {}
  for clip_norm in (1.0, 1e9):
    opt = bert_adamw(1.0, num_steps=10**6, weight_decay=0.0, clip_norm=clip_norm, warmup_steps=0)
    state = opt.init(params)
    _, state = opt.update({"kernel": jnp.asarray(first)}, state, params)
    updates[clip_norm], _ = opt.update({"kernel": jnp.asarray(second)}, state, params)
  clipped, unclipped = _second_update_by_hand(first, second, 1.0), _second_update_by_hand(first, second, 1e9)
  np.testing.assert_allclose(updates[1.0]["kernel"], clipped, rtol=1e-5)
  np.testing.assert_allclose(updates[1e9]["kernel"], unclipped, rtol=1e-5)
  assert np.abs(clipped - unclipped).max() > 1.0  # far beyond Adam's epsilon: clipping is what tells them apart
  assert OptimizerConfig(1e-4).clip_norm == 1.0  # the released code's global-norm clip


def test_a_multiplier_scales_one_subtrees_learning_rate_and_a_wrong_name_is_refused():
  params = {"retriever": {"kernel": jnp.ones(3)}, "reader": {"kernel": jnp.ones(3)}}
  grads = {"retriever": {"kernel": jnp.full(3, 0.1)}, "reader": {"kernel": jnp.full(3, 0.1)}}
  plain, scaled = bert_adamw(1e-3, 100, warmup_steps=0), bert_adamw(1e-3, 100, warmup_steps=0,
                                                                    multipliers={"retriever": 0.25})
  base, _ = plain.update(grads, plain.init(params), params)
  updates, _ = scaled.update(grads, scaled.init(params), params)
  np.testing.assert_allclose(updates["retriever"]["kernel"], 0.25 * base["retriever"]["kernel"], rtol=1e-6)
  np.testing.assert_array_equal(updates["reader"]["kernel"], base["reader"]["kernel"])
  with pytest.raises(ValueError, match=r"\['retriver'\].*\['reader', 'retriever'\]"):
    bert_adamw(1e-3, 100, multipliers={"retriver": 0.1}).init(params)


def test_subtrees_given_their_own_peak_rate_get_its_ratio_to_the_base_rate():
  assert subtree_multipliers(2e-4, retriever=1e-5, mlm_head=5e-3) == pytest.approx({"retriever": 0.05, "mlm_head": 25})
  assert subtree_multipliers(2e-4, retriever=None) is None
  with pytest.raises(ValueError, match="learning_rate > 0"):
    subtree_multipliers(0.0, mlm_head=1e-3)
