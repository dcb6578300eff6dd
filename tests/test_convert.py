"""Bad checkpoints fail with errors that name the key and the file."""
import json
import os

import numpy as np
import pytest
import torch

from mqt import convert
from mqt.checkpoint_io import CheckpointError, TensorSource
from tests import torch_reference as ref


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  model, cfg = ref.tiny_llama(seed=7, layers=1)
  return model.state_dict(), cfg


def _lcfg(cfg):
  return convert.llama_config_from_hf(cfg.to_dict())


def test_missing_key_is_named(llama, tmp_path):
  state, cfg = llama
  state = dict(state)
  del state["model.layers.0.mlp.up_proj.weight"]
  ref.save_safetensors(state, str(tmp_path))
  with pytest.raises(CheckpointError, match=r"missing key model\.layers\.0\.mlp\.up_proj\.weight "
                                            r"\(for parameter layers_0/up_proj/kernel\)"):
    convert.import_llama(str(tmp_path), _lcfg(cfg))


def test_unexpected_key_is_named(llama, tmp_path):
  state, cfg = llama
  state = {**state, "model.mm_projector.weight": torch.zeros(3, 3)}
  ref.save_safetensors(state, str(tmp_path))
  with pytest.raises(CheckpointError, match=r"unexpected key\(s\) in .*model\.mm_projector\.weight"):
    convert.import_llama(str(tmp_path), _lcfg(cfg))


def test_known_buffers_are_ignored(llama, tmp_path):
  state, cfg = llama
  state = {**state, "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}
  ref.save_safetensors(state, str(tmp_path))
  convert.import_llama(str(tmp_path), _lcfg(cfg))


def test_checkpoint_of_another_model_names_the_shape(llama, tmp_path):
  state, cfg = llama
  ref.save_safetensors(state, str(tmp_path))
  other = convert.llama_config_from_hf({**cfg.to_dict(), "intermediate_size": 128})
  with pytest.raises(CheckpointError, match=r"key model\.layers\.0\.mlp\.gate_proj\.weight in .* "
                                            r"has shape \(96, 64\), which does not fit parameter "
                                            r"layers_0/gate_proj/kernel of shape \(64, 128\)"):
    convert.import_llama(str(tmp_path), other)


def test_sharded_index_with_a_missing_shard(llama, tmp_path):
  state, _ = llama
  ref.save_safetensors(state, str(tmp_path), shards=2)
  os.remove(tmp_path / "model-00002-of-00002.safetensors")
  with pytest.raises(CheckpointError, match="shard model-00002-of-00002.safetensors .* is missing"):
    TensorSource(str(tmp_path))


def test_truncated_file(llama, tmp_path):
  state, _ = llama
  ref.save_safetensors(state, str(tmp_path))
  f = tmp_path / "model.safetensors"
  f.write_bytes(f.read_bytes()[:-100])
  with pytest.raises(CheckpointError, match="runs past the end of the file"):
    TensorSource(str(f))


def test_corrupt_header(tmp_path):
  f = tmp_path / "bad.safetensors"
  f.write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}")
  with pytest.raises(CheckpointError, match="bad.safetensors: corrupt safetensors header"):
    TensorSource(str(f))


def test_empty_directory(tmp_path):
  with pytest.raises(CheckpointError, match="no checkpoint found"):
    TensorSource(str(tmp_path))


def test_bf16_and_torch_bin_read_the_same_values(llama, tmp_path):
  state, _ = llama
  w = state["model.norm.weight"]
  ref.save_safetensors({"w": w.to(torch.bfloat16)}, str(tmp_path / "st"))
  torch.save({"w": w.to(torch.bfloat16)}, tmp_path / "pytorch_model.bin")
  a = TensorSource(str(tmp_path / "st")).get("w").astype(np.float32)
  b = TensorSource(str(tmp_path / "pytorch_model.bin")).get("w").astype(np.float32)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a, w.numpy(), rtol=1e-2)


def test_hf_configs_with_unsupported_features_are_refused(llama):
  _, cfg = llama
  with pytest.raises(CheckpointError, match="rope_type 'llama3'"):
    convert.llama_config_from_hf({**cfg.to_dict(), "rope_parameters": {"rope_type": "llama3",
                                                                        "rope_theta": 5e5}})
  with pytest.raises(CheckpointError, match="hidden_act 'gelu'"):
    convert.vision_config_from_hf({"hidden_act": "gelu"})


def test_mqt_llava_import_needs_official_variant(tmp_path):
  from configs import tiny
  from mqt.model import ModelConfig
  cfg = ModelConfig.from_config(tiny.get_config("variant=perceiver").model)
  with pytest.raises(CheckpointError, match="variant 'perceiver'"):
    convert.import_mqt_llava(str(tmp_path), cfg)
