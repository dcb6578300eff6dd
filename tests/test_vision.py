"""The CLIP vision tower equals HF CLIPVisionModel (float32, CPU)."""
import jax
import numpy as np
import pytest
import torch

from mqt import convert
from mqt.vision import VisionConfig, VisionTower
from tests import torch_reference as ref

ATOL = 2e-5  # float32; activations are O(1).


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
  model, cfg = ref.tiny_clip(seed=1)
  path = str(tmp_path_factory.mktemp("clip"))
  # Real CLIP checkpoints keep the `vision_model.` prefix; transformers 5 drops it.
  ref.save_safetensors({f"vision_model.{k}": v for k, v in model.state_dict().items()}, path)
  return model, cfg, path


def _ours(cfg, path, **overrides):
  vcfg = convert.vision_config_from_hf(cfg.to_dict(), **overrides)
  return VisionTower(vcfg), convert.import_clip_vision(path, vcfg)


@pytest.mark.parametrize("select_layer,keep_cls", [(-2, False), (-1, True), (1, False)])
def test_hidden_states_match_hf(clip, select_layer, keep_cls):
  model, cfg, path = clip
  tower, params = _ours(cfg, path, select_layer=select_layer, keep_cls=keep_cls)
  pixels = torch.randn(2, 3, cfg.image_size, cfg.image_size, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    want = model(pixels, output_hidden_states=True).hidden_states[select_layer]
  want = ref.to_np(want if keep_cls else want[:, 1:])
  got = jax.jit(tower.apply)({"params": params}, pixels.permute(0, 2, 3, 1).numpy())
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=ATOL, rtol=0)
  assert np.abs(want).max() > 0.1  # The comparison is not between near-zero values.


def test_unprefixed_checkpoint_imports(clip, tmp_path):
  model, cfg, path = clip
  ref.save_safetensors(model.state_dict(), str(tmp_path))  # transformers-5 key names
  vcfg = convert.vision_config_from_hf(cfg.to_dict())
  a = convert.import_clip_vision(path, vcfg)
  b = convert.import_clip_vision(str(tmp_path), vcfg)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


def test_unused_blocks_are_parameters_but_not_run(clip):
  model, cfg, path = clip
  tower, params = _ours(cfg, path, select_layer=-2)
  assert f"layers_{cfg.num_hidden_layers - 1}" in params and "post_layernorm" in params
  # Poisoning the unused last block leaves the selected hidden state unchanged.
  poisoned = jax.tree.map(lambda x: x, params)
  poisoned[f"layers_{cfg.num_hidden_layers - 1}"]["fc1"]["kernel"] = np.full_like(
      params[f"layers_{cfg.num_hidden_layers - 1}"]["fc1"]["kernel"], np.nan)
  x = np.random.default_rng(0).normal(size=(1, cfg.image_size, cfg.image_size, 3)).astype(np.float32)
  assert np.isfinite(np.asarray(tower.apply({"params": poisoned}, x))).all()


def test_position_embeddings_start_as_clips_and_other_starts_are_errors():
  cfg = VisionConfig(image_size=12, patch_size=4, width=8, depth=1, heads=2, mlp_dim=16)
  images = np.zeros((1, 12, 12, 3), np.float32)
  pos = VisionTower(cfg).init(jax.random.key(0), images)["params"]["position_embedding"]
  pos = np.asarray(jax.tree.leaves(pos)[0])
  assert pos.shape == (10, 8) and 0 < np.abs(pos).max() < 0.2  # CLIP's std 0.02.
  # A 2-D sine / cosine start is bench/latent_probe.py's (--posemb=sincos2d), not the tower's.
  for name in ("sincos2d", "learned"):
    with pytest.raises(ValueError, match=f"unknown posemb_init '{name}'; known: 'normal'"):
      VisionConfig(**{**cfg.__dict__, "posemb_init": name})
