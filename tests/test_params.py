"""Parameter counts from abstract shapes, the parameter tree's metadata, and the params
of a checkpoint read on their own (`checkpoint.restore_params`)."""
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from configs import mqt_llava, tiny
from mqt import checkpoint as ckpt_lib
from mqt.model import ModelConfig, abstract_params, param_counts


def test_mqt_llava_7b_counts_without_allocating():
  cfg = ModelConfig.from_config(mqt_llava.get_config().model)
  start = time.perf_counter()
  counts = param_counts(cfg)
  assert counts["total"] == 7_050_846_208
  assert counts["query"] == 8_923_136
  assert counts["vision"] == 303_507_456
  assert counts["llm"] == 6_738_415_616
  # 28 GB of float32 could not have been allocated on this machine this fast.
  assert time.perf_counter() - start < 60


def test_stage_knob_keeps_architecture():
  a = param_counts(ModelConfig.from_config(mqt_llava.get_config("stage=1").model))
  b = param_counts(ModelConfig.from_config(mqt_llava.get_config("stage=2").model))
  assert a == b


@pytest.mark.parametrize("variant", ["official", "perceiver"])
def test_every_parameter_has_logical_axes(variant):
  cfg = ModelConfig.from_config(tiny.get_config(f"variant={variant}").model)
  boxed = abstract_params(cfg)["params"]
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == leaf.value.ndim


def test_scanned_decoder_has_layers_axis():
  cfg = ModelConfig.from_config(mqt_llava.get_config().model)
  boxed = abstract_params(cfg)["params"]["llm"]["layers"]
  q = boxed["q_proj"]["kernel"]
  assert q.names == ("layers", "embed", "heads") and q.value.shape == (32, 4096, 4096)
  assert np.dtype(q.value.dtype) == np.float32  # f32 params under bf16 compute.


def test_restore_params_reads_the_leaves_asked_for(tmp_path):
  """The newest (or a given) step's params, only the target's leaves, placed with the
  target's sharding (or as host numpy arrays where it has none), cast on read."""
  params = {"vision": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
            "llm": {"b": np.ones(4, np.float32)}}
  folder = str(tmp_path / "ckpt")
  saver = ckpt_lib.Checkpointer(folder, every=1, keep=2, use_async=False)
  for step in (1, 2):
    saver.save(step, {"params": jax.tree.map(lambda x, s=step: x * s, params),
                      "opt_state": {"mu": params}, "step": np.int32(step)}, None, force=True)
  saver.close()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = {"vision": {"w": jax.ShapeDtypeStruct((2, 3), jnp.bfloat16, sharding=device)}}
  got = ckpt_lib.restore_params(folder, target)
  assert list(got) == ["vision"] and isinstance(got["vision"]["w"], jax.Array)
  assert got["vision"]["w"].dtype == jnp.bfloat16 and got["vision"]["w"].sharding == device
  np.testing.assert_array_equal(np.asarray(got["vision"]["w"], np.float32),
                                2 * params["vision"]["w"])
  host = ckpt_lib.restore_params(folder, {"llm": {"b": jax.ShapeDtypeStruct((4,), np.float32)}},
                                 step=1)
  assert isinstance(host["llm"]["b"], np.ndarray)
  np.testing.assert_array_equal(host["llm"]["b"], params["llm"]["b"])
  assert ckpt_lib.latest_step(folder) == 2
  assert ckpt_lib.latest_step(str(tmp_path / "absent")) is None
  meta = ckpt_lib.params_metadata(folder, 2)
  assert sorted(meta) == ["llm", "vision"] and tuple(meta["vision"]["w"].shape) == (2, 3)

  absent = str(tmp_path / "absent")
  with pytest.raises(ValueError, match=re.escape(
      f"init_from checkpoint directory {absent} does not exist")):
    ckpt_lib.restore_params(absent, target)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=re.escape(f"no checkpoint in {tmp_path / 'empty'}")):
    ckpt_lib.restore_params(str(tmp_path / "empty"), target)
