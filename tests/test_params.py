"""Parameter counts from abstract shapes, and the parameter tree's metadata."""
import time

import jax
import numpy as np
import pytest
from flax import linen as nn

from configs import mqt_llava, tiny
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
