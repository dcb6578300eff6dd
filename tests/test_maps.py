"""Gradient maps of what each visual token draws on (mqt/maps.py)."""
import jax
import numpy as np
import pytest
from flax import linen as nn
from PIL import Image

from configs import tiny
from mqt import maps
from mqt.model import MQTLLaVA, ModelConfig, dummy_inputs


@pytest.mark.parametrize("variant", ["official", "perceiver"])
def test_maps_have_one_finite_map_per_token_and_follow_the_image(variant, tmp_path):
  cfg = ModelConfig.from_config(tiny.get_config(f"variant={variant}").model)
  images, ids, mask = dummy_inputs(cfg)
  params = jax.jit(lambda: nn.unbox(MQTLLaVA(cfg).init(
      jax.random.key(0), images, ids, mask, cfg.query.num_queries))["params"])()
  params = {k: params[k] for k in ("vision", "query")}  # Nothing of the LLM is needed.
  s = cfg.vision.image_size
  rng = np.random.default_rng(0)
  two = rng.normal(size=(2, s, s, 3)).astype(np.float32)
  grid = s // cfg.vision.patch_size
  out = {}
  for m in (1, 3):
    got = maps.latent_maps(cfg, params, two, m)
    assert got.shape == (2, m, grid, grid)
    assert np.all(np.isfinite(got)) and got.min() >= 0 and np.allclose(got.max(axis=(2, 3)), 1)
    out[m] = got
  assert np.abs(out[3][0] - out[3][1]).max() > 0.1  # Two images, two sets of maps.
  if variant == "official":  # Latents do not see each other: token 0's map whatever m.
    np.testing.assert_allclose(out[1][:, 0], out[3][:, 0], atol=1e-5)
  with pytest.raises(ValueError, match=r"m=10 is out of range: 1 <= m <= M=9"):
    maps.latent_maps(cfg, params, two, 10)
  path = tmp_path / "maps.png"
  image = (two[0] - two[0].min()) / np.ptp(two[0])
  maps.save_grid(str(path), image, {m: out[m][0] for m in out})
  with Image.open(path) as png:
    assert png.format == "PNG" and png.size[0] > png.size[1] > 0


@pytest.mark.parametrize("variant", ["official", "perceiver"])
def test_attention_maps_depend_on_the_image_only_with_content_keys(variant):
  cfg = ModelConfig.from_config(tiny.get_config(f"variant={variant}").model)
  images, ids, mask = dummy_inputs(cfg)
  params = jax.jit(lambda: nn.unbox(MQTLLaVA(cfg).init(
      jax.random.key(1), images, ids, mask, cfg.query.num_queries))["params"])()
  params = {k: params[k] for k in ("vision", "query")}
  s = cfg.vision.image_size
  two = np.random.default_rng(1).normal(size=(2, s, s, 3)).astype(np.float32)
  grid = s // cfg.vision.patch_size
  got = maps.attention_maps(cfg, params, two, 4)
  assert got.shape == (2, 4, grid, grid) and np.all(np.isfinite(got))
  np.testing.assert_allclose(got.max(axis=(2, 3)), 1, rtol=1e-6)
  gap = np.abs(got[0] - got[1]).max()
  if variant == "official":  # Position-only keys: one pattern per token for every image.
    assert gap < 1e-6
  else:
    assert gap > 1e-3
  # The prefix does not change with m for the official variant (latents are independent).
  if variant == "official":
    np.testing.assert_allclose(maps.attention_maps(cfg, params, two, 2), got[:, :2], atol=1e-6)
