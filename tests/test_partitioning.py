"""Mesh and logical-axis sharding on 8 fake CPU devices: sharded BERT equals the unsharded one."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SHARDED_BERT as TINY
from jax.sharding import PartitionSpec as P

from realm_jax import partitioning
from realm_jax.models.bert import BertEncoder


def test_eight_fake_devices_are_available():
  assert jax.device_count() == 8


@pytest.mark.parametrize("data, model, shape", [(-1, 1, (8, 1)), (-1, 2, (4, 2)), (2, 4, (2, 4))])
def test_mesh_shapes_from_flags(data, model, shape):
  mesh = partitioning.make_mesh(data, model)
  assert mesh.axis_names == ("data", "model")
  assert tuple(mesh.devices.shape) == shape


def test_impossible_meshes_are_refused():
  with pytest.raises(ValueError, match="needs 6 devices, have 8"):
    partitioning.make_mesh(3, 2)
  with pytest.raises(ValueError, match="do not split into model=3"):
    partitioning.make_mesh(-1, 3)


def test_rules_table_places_parameters_on_the_model_axis():
  mesh = partitioning.make_mesh(4, 2)
  ids = jnp.zeros((2, 8), jnp.int32)
  abstract = jax.eval_shape(lambda: BertEncoder(TINY).init(jax.random.key(0), ids, ids))
  shardings = partitioning.logical_sharding(abstract["params"], mesh)
  assert shardings["layer_0"]["intermediate"]["kernel"].spec == P(None, "model")
  assert shardings["layer_0"]["attention"]["query"]["kernel"].spec == P(None, "model", None)
  assert shardings["embeddings"]["word_embeddings"]["embedding"].spec == P("model", None)
  assert shardings["embeddings"]["layer_norm"]["norm"]["scale"].spec == P(None)


@pytest.mark.parametrize("data, model", [(8, 1), (4, 2), (2, 4)])
def test_sharded_forward_equals_single_device(data, model):
  rng = np.random.default_rng(0)
  ids = rng.integers(1, TINY.vocab_size, (16, 24)).astype(np.int32)
  mask = (np.arange(24)[None] < rng.integers(5, 25, (16, 1))).astype(np.int32)
  params = nn.meta.unbox(BertEncoder(TINY).init(jax.random.key(0), ids, mask)["params"])
  expected_seq, expected_pooled = BertEncoder(TINY).apply({"params": params}, ids, mask)

  mesh = partitioning.make_mesh(data, model)
  abstract = jax.eval_shape(lambda: BertEncoder(TINY).init(jax.random.key(0), ids, mask))
  param_shardings = partitioning.logical_sharding(abstract["params"], mesh)
  sharded_params = jax.device_put(params, param_shardings)
  batch = partitioning.shard_batch({"ids": ids, "mask": mask}, mesh)

  @jax.jit
  def forward(p, b):
    with nn.logical_axis_rules(partitioning.LOGICAL_AXIS_RULES):
      return BertEncoder(TINY).apply({"params": p}, b["ids"], b["mask"])

  with jax.set_mesh(mesh):
    seq, pooled = forward(sharded_params, batch)
  assert seq.sharding.spec[0] == "data"
  np.testing.assert_allclose(seq, expected_seq, atol=2e-5)
  np.testing.assert_allclose(pooled, expected_pooled, atol=2e-5)
