"""ICT warm start: examples, global in-batch negatives on the mesh, exact resume, NaN stop, init."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from conftest import TINY_BERT as TINY

from realm_jax import partitioning
from realm_jax.data.ict import IctDataConfig, IctExamples, ict_dataset, ict_iterator
from realm_jax.models.retriever import DualEncoder, RetrieverConfig
from realm_jax.objectives.ict import IctSpec, ict_loss
from realm_jax.train.ict import starting_weights
from realm_jax.train.optimizer import OptimizerConfig
from realm_jax.train.trainer import NonFiniteLossError, TrainerConfig, TrainHooks, make_trainer


def ict_run(store, workdir, encoder=TINY, init=None, projection_size=32, batch_size=16, num_steps=6,
            learning_rate=1e-3, warmup_steps=2, checkpoint_every=2, log_every=2, mesh=None):
  """(trainer, data, hooks) of an ICT run as `train.ict.run_ict` builds them (seed 3, query 32, block 64)."""
  spec = IctSpec(str(store.path), RetrieverConfig(encoder, projection_size, block_len=64),
                 IctDataConfig(batch_size, query_len=32, block_len=64, seed=3), init)
  trainer = make_trainer(spec.objective(), mesh or partitioning.make_mesh(), str(workdir),
                         TrainerConfig(num_steps, checkpoint_every, log_every, seed=3),
                         OptimizerConfig(learning_rate, warmup_steps))
  return trainer, ict_iterator(store, spec.data), TrainHooks(pretrained=starting_weights(spec))


def test_query_is_a_sentence_of_its_block_and_is_removed_90_percent_of_the_time(demo_store):
  config = IctDataConfig(batch_size=8, query_len=96, block_len=288)
  examples = IctExamples(demo_store, config)
  rng = np.random.default_rng(0)
  removed = 0
  for block_id in examples.block_ids[:400]:
    ex = examples(int(block_id), rng)
    query = ex["query_input_ids"][1 : ex["query_input_mask"].sum() - 1]
    body = demo_store.body_ids(int(block_id))
    starts = demo_store.sentence_starts(int(block_id)).tolist() + [len(body)]
    sentences = [body[a:b].tolist() for a, b in zip(starts[:-1], starts[1:], strict=True)]
    assert query.tolist() in [s[:94] for s in sentences]
    n_block = ex["block_input_mask"].sum()
    title = len(demo_store.title_ids(int(block_id)))
    assert ex["block_segment_ids"][: title + 2].sum() == 0 and ex["block_segment_ids"][title + 2 : n_block].all()
    removed += int(ex["sentence_removed"])
    expected_body = len(body) - (len(query) if ex["sentence_removed"] else 0)
    assert n_block == min(288, title + 3 + expected_body)
  assert 0.85 < removed / 400 < 0.95


def test_batches_are_deterministic_per_seed(demo_store):
  config = IctDataConfig(batch_size=4, query_len=32, block_len=64, seed=1)
  a, b = ict_dataset(demo_store, config)[5], ict_dataset(demo_store, config)[5]
  assert all(np.array_equal(a[k], b[k]) for k in a)
  other = ict_dataset(demo_store, IctDataConfig(batch_size=4, query_len=32, block_len=64, seed=2))[5]
  assert not np.array_equal(a["block_id"], other["block_id"])


def test_negatives_come_from_the_global_batch_and_8_devices_equal_1(demo_store):
  batch = ict_dataset(demo_store, IctDataConfig(batch_size=16, query_len=32, block_len=64))[0]
  model = DualEncoder(TINY, projection_size=32)
  zeros = {k: np.zeros((1, 32), np.int32) for k in ("input_ids", "input_mask", "segment_ids")}
  params = nn.meta.unbox(model.init(jax.random.key(0), zeros, zeros)["params"])
  rng = jax.random.key(7)
  grad_fn = jax.jit(jax.value_and_grad(lambda p, b: ict_loss(model, p, b, rng), has_aux=True))
  (loss1, metrics1), grads1 = grad_fn(params, batch)
  mesh = partitioning.make_mesh(8, 1)
  with jax.set_mesh(mesh):
    (loss8, metrics8), grads8 = grad_fn(params, partitioning.shard_batch(batch, mesh))
  assert metrics1["chance"] == pytest.approx(1 / 16)  # 15 negatives per query, not 1 per device
  np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-6), grads8, grads1)


def _params(state):
  return jax.tree.map(np.asarray, jax.device_get(state.params))


def test_killed_run_resumes_to_the_same_parameters(demo_store, tmp_path):
  trainer, data, _ = ict_run(demo_store, tmp_path / "straight")
  straight, _ = trainer.fit(data)

  def crash(step, state):
    if step == 5:
      raise KeyboardInterrupt("simulated kill after the step-4 checkpoint")

  trainer, data, _ = ict_run(demo_store, tmp_path / "killed")
  with pytest.raises(KeyboardInterrupt):
    trainer.fit(data, TrainHooks(after_step=crash))
  assert trainer.checkpoints.latest_step() == 4
  trainer, data, _ = ict_run(demo_store, tmp_path / "killed")
  resumed, history = trainer.fit(data)
  assert [h["step"] for h in history] == [6]
  jax.tree.map(np.testing.assert_array_equal, _params(resumed), _params(straight))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(demo_store, tmp_path):
  trainer, data, _ = ict_run(demo_store, tmp_path, learning_rate=1e30, warmup_steps=0)
  with pytest.raises(NonFiniteLossError, match=r"step \d+: loss is nan.*Last good checkpoint: (None|\d+)"):
    trainer.fit(data)
  steps = trainer.checkpoints.all_steps()
  for step in steps:
    restored = trainer.checkpoints.restore(step)
    leaves = jax.tree.leaves(restored["state"]["params"])
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)


def test_init_from_minilm_puts_real_weights_in_the_tower(demo_store, tmp_path, minilm_path):
  from realm_jax.checkpoints.hf_bert import load_hf_bert

  config, reference = load_hf_bert(minilm_path)
  trainer, data, hooks = ict_run(demo_store, tmp_path, encoder=config, init="minilm", num_steps=1)
  state = trainer.init_state(hooks.pretrained)
  got = jax.device_get(state.params["query_tower"]["encoder"])
  jax.tree.map(np.testing.assert_array_equal, got, reference)
  scratch = jax.device_get(trainer.init_state().params["query_tower"]["encoder"])
  assert not np.allclose(scratch["layer_0"]["intermediate"]["kernel"], reference["layer_0"]["intermediate"]["kernel"])


def test_identity_projection_starts_as_the_layer_normed_sentence_embedding():
  import dataclasses

  from realm_jax.models.bert import BertEncoder

  config = dataclasses.replace(TINY, pooling="mean")
  ids = jax.random.randint(jax.random.key(1), (3, 12), 1, 30522)
  inputs = {"input_ids": ids, "input_mask": np.ones((3, 12), np.int32), "segment_ids": np.zeros((3, 12), np.int32)}
  model = DualEncoder(config, projection_size=64, projection_init="identity")
  params = model.init(jax.random.key(0), inputs, inputs)["params"]
  got = model.apply({"params": params}, inputs, method=DualEncoder.embed_blocks)
  _, mean = BertEncoder(config).apply({"params": nn.unbox(params)["query_tower"]["encoder"]},
                                      ids, inputs["input_mask"], inputs["segment_ids"], True)
  centred = mean - mean.mean(-1, keepdims=True)
  expected = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-3)
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_identity_projection_needs_projection_size_equal_to_hidden_size():
  inputs = {k: np.ones((2, 8), np.int32) for k in ("input_ids", "input_mask", "segment_ids")}
  with pytest.raises(ValueError, match=r"projection_size == hidden_size, got kernel \(64, 32\)"):
    DualEncoder(TINY, projection_size=32, projection_init="identity").init(jax.random.key(0), inputs, inputs)
  with pytest.raises(ValueError, match="projection_init 'eye'"):
    DualEncoder(TINY, projection_size=64, projection_init="eye").init(jax.random.key(0), inputs, inputs)


def test_checkpoint_of_another_architecture_is_refused(demo_store, tmp_path, minilm_path):
  with pytest.raises(ValueError, match=r"architecture differs.*hidden_size=\(64, 384\)"):
    ict_run(demo_store, tmp_path, init="minilm")


@pytest.mark.slow
def test_ict_from_minilm_raises_held_out_in_batch_accuracy_well_above_chance(demo_store, tmp_path, minilm_path):
  from realm_jax.checkpoints.hf_bert import load_hf_bert

  config, _ = load_hf_bert(minilm_path)
  trainer, data, hooks = ict_run(
      demo_store, tmp_path, encoder=config, init="minilm", projection_size=128, batch_size=32, num_steps=80,
      learning_rate=5e-5, warmup_steps=8, checkpoint_every=80, log_every=10,
      mesh=partitioning.make_mesh(1, 1, jax.devices()[:1]),
  )
  model = DualEncoder(config, projection_size=128)
  held_out = ict_dataset(demo_store, IctDataConfig(batch_size=64, query_len=32, block_len=64, seed=99))[0]
  evaluate = jax.jit(lambda p: ict_loss(model, p, held_out, jax.random.key(0), train=False)[1]["accuracy"])
  before = float(evaluate(trainer.init_state(hooks.pretrained).params))
  state, _ = trainer.fit(data, hooks)
  after = float(evaluate(state.params))
  print(f"held-out in-batch accuracy@1 (64-way): {before:.3f} -> {after:.3f}")
  assert after > 10 / 64
  assert after > before + 0.05
