"""The Matryoshka query transformer: official parity and the prefix property."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import linen as nn

from mqt import convert
from mqt import layers
from mqt import query_transformer as qt
from tests import torch_reference as ref

M, WIDTH, HEADS, OUT = 64, 32, 4, 48  # 8x8 query grid.
ATOL = 1e-5


@pytest.mark.parametrize("n_in,n_out", [(8, 6), (8, 11), (16, 24), (4, 4)])
def test_bicubic_matrix_equals_torch(n_in, n_out):
  x = torch.randn(1, 3, n_in, n_in, generator=torch.Generator().manual_seed(n_out))
  want = F.interpolate(x, size=(n_out, n_out), mode="bicubic", align_corners=False)
  got = qt.resize_table(jnp.asarray(x[0].permute(1, 2, 0).reshape(n_in * n_in, 3).numpy()),
                        n_in, n_out, n_out)
  want = want[0].permute(1, 2, 0).reshape(-1, 3).numpy()
  # float32 summation order differs from torch's by ~1e-6; the a=-0.5 kernel of
  # jax.image.resize would be off by ~1e-2.
  np.testing.assert_allclose(np.asarray(got), want, atol=5e-6, rtol=0)


def test_sincos_layout():
  """Channels [sin(col w), cos(col w), sin(row w), cos(row w)], raster index row*g+col."""
  dim, g = 16, 5
  table = layers.sincos_2d(dim, g)
  w = 10000.0 ** (-np.arange(dim // 4) / (dim // 4))
  for row, col in [(0, 0), (1, 3), (4, 2)]:
    want = np.concatenate([np.sin(col * w), np.cos(col * w), np.sin(row * w), np.cos(row * w)])
    np.testing.assert_allclose(table[row * g + col], want, atol=1e-3)  # Rounded via fp16.
  assert table.dtype == np.float32


@pytest.fixture(scope="module")
def official(tmp_path_factory):
  torch.manual_seed(0)
  module = ref.randomize_(ref.RefQueryTransformer(WIDTH, HEADS, OUT, M), seed=3).eval()
  path = str(tmp_path_factory.mktemp("qt"))
  ref.save_safetensors({f"model.query_abstractor.{k}": v for k, v in module.state_dict().items()},
                       path)
  return module, path


@pytest.mark.parametrize("side", [6, 10])  # Patch grids other than the 8x8 query grid.
def test_official_matches_pytorch(official, side):
  module, path = official
  cfg = qt.QueryConfig(variant="official", num_queries=M, width=WIDTH, heads=HEADS, out_dim=OUT)
  params = convert.import_official_query(path, cfg, side * side)
  feats = torch.randn(3, side * side, WIDTH, generator=torch.Generator().manual_seed(side))
  apply = jax.jit(qt.make_query_transformer(cfg).apply)
  for m in (1, 2, 36, M - 1, M):
    with torch.no_grad():
      want = ref.to_np(module(feats, m))
    tokens, mask = apply({"params": params}, feats.numpy(), jnp.int32(m))
    assert tokens.shape == (3, M, OUT) and mask.shape == (3, M)
    np.testing.assert_array_equal(np.asarray(mask), np.arange(M)[None].repeat(3, 0) < m)
    np.testing.assert_allclose(np.asarray(tokens)[:, :m], want, atol=ATOL, rtol=0)
    assert not np.asarray(tokens)[:, m:].any()  # Slots past m are zero.
    assert np.abs(want).max() > 0.1


def _init(cfg, side=5, seed=0):
  mod = qt.make_query_transformer(cfg)
  feats = jax.random.normal(jax.random.key(seed), (2, side * side, cfg.width))
  params = nn.unbox(mod.init(jax.random.key(seed), feats, cfg.num_queries))["params"]
  return mod, params, feats


VARIANTS = [
    qt.QueryConfig(variant="official", num_queries=16, width=16, heads=2, out_dim=24),
    qt.QueryConfig(variant="perceiver", num_queries=16, width=16, heads=2, out_dim=24,
                   depth=2, mlp_dim=32, latent_attention="prefix"),
    qt.QueryConfig(variant="perceiver", num_queries=16, width=16, heads=2, out_dim=24,
                   depth=2, mlp_dim=32, latent_attention="causal"),
]


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: f"{c.variant}-{c.latent_attention}")
def test_prefix_outputs_ignore_later_latents(cfg):
  """Outputs < m do not change when the latents >= m change, and equal a run with m latents."""
  mod, params, feats = _init(cfg)
  for m in (1, 3, 15, 16):
    out, _ = mod.apply({"params": params}, feats, m)
    poked = jax.tree.map(lambda x: x, params)
    poked["latents"]["query"] = params["latents"]["query"].at[m:].add(3.0)
    out2, _ = mod.apply({"params": poked}, feats, m)
    sliced, smask = mod.apply({"params": params}, feats, m, num_latents=m)
    np.testing.assert_allclose(out2[:, :m], out[:, :m], atol=1e-6, rtol=0)
    np.testing.assert_allclose(sliced, out[:, :m], atol=1e-5, rtol=0)
    assert smask.all()


def test_per_example_m():
  cfg = VARIANTS[1]
  mod, params, feats = _init(cfg)
  out, mask = mod.apply({"params": params}, feats, jnp.array([2, 7]))
  np.testing.assert_array_equal(mask.sum(1), [2, 7])
  for b, m in enumerate((2, 7)):
    single, _ = mod.apply({"params": params}, feats[b:b + 1], m)
    np.testing.assert_allclose(out[b], single[0], atol=1e-5, rtol=0)


def test_causal_latents_do_not_depend_on_m():
  cfg = VARIANTS[2]
  mod, params, feats = _init(cfg)
  full, _ = mod.apply({"params": params}, feats, 16)
  part, _ = mod.apply({"params": params}, feats, 4)
  np.testing.assert_allclose(part[:, :4], full[:, :4], atol=1e-6, rtol=0)


def test_non_square_patch_grid_is_a_clear_error():
  cfg = VARIANTS[0]
  mod = qt.make_query_transformer(cfg)
  with pytest.raises(ValueError, match="square patch grid; got 26"):
    mod.init(jax.random.key(0), jnp.zeros((1, 26, cfg.width)), 1)


def _official_attention(cfg, side, seed):
  """Head-averaged cross-attention weights [M, P] of an initialized official module."""
  mod, params, feats = _init(cfg, side=side, seed=seed)
  _, state = mod.apply({"params": params}, feats, cfg.num_queries, capture_intermediates=True)
  q = state["intermediates"]["q_proj"]["__call__"][0]
  k = state["intermediates"]["k_proj"]["__call__"][0]
  d = cfg.width // cfg.heads
  logits = jnp.einsum("nhd,phd->hnp", q.reshape(len(q), cfg.heads, d),
                      k.reshape(len(k), cfg.heads, d)) / np.sqrt(d)
  return params, np.asarray(jax.nn.softmax(logits, -1).mean(0))


def test_spatial_init_starts_each_latent_on_its_region():
  """spatial_init: q_proj and k_proj start equal (per seed), so latents of the top
  (left) of the 4x4 latent grid weigh the top row (left column) of a 3x3 patch
  grid more than the bottom (right) latents do (2.3-2.8x measured); without it,
0.8-1.1x."""
  base = dict(variant="official", num_queries=16, width=64, heads=4, out_dim=32)
  for seed in (0, 1):
    params, attn = _official_attention(qt.QueryConfig(**base, spatial_init=True), 3, seed)
    np.testing.assert_array_equal(params["q_proj"]["kernel"], params["k_proj"]["kernel"])
    lat = attn.reshape(4, 4, 3, 3)  # [latent row, latent col, patch row, patch col]
    top, bottom = lat[0, :, 0].sum(-1).mean(), lat[3, :, 0].sum(-1).mean()
    left, right = lat[:, 0, :, 0].sum(-1).mean(), lat[:, 3, :, 0].sum(-1).mean()
    assert top > 1.5 * bottom and left > 1.5 * right, (top, bottom, left, right)
  other = _official_attention(qt.QueryConfig(**base, spatial_init=True), 3, 2)[0]
  assert not np.array_equal(other["q_proj"]["kernel"], params["q_proj"]["kernel"])
  for seed in (0, 1):  # The official init has no such bias.
    params, attn = _official_attention(qt.QueryConfig(**base), 3, seed)
    assert not np.array_equal(params["q_proj"]["kernel"], params["k_proj"]["kernel"])
    lat = attn.reshape(4, 4, 3, 3)
    assert lat[0, :, 0].sum(-1).mean() < 1.3 * lat[3, :, 0].sum(-1).mean()


def test_spatial_init_on_another_variant_is_refused():
  with pytest.raises(ValueError, match="spatial_init is for the official variant only"):
    qt.make_query_transformer(qt.QueryConfig(variant="perceiver", spatial_init=True))


@pytest.mark.parametrize("gap, least", [(6.0, 0.97), (4.0, 0.85)])
def test_spatial_init_gap_starts_each_latent_on_its_own_patch(gap, least):
  """spatial_init_gap on a 3x3 latent grid over 3x3 patches: every head puts at least
  `least` of a latent's weight on its own patch (measured 0.99 at gap 6, 0.91-0.95
  at gap 4); the random shared init gives ~0.2. Each patch's features then reach
  mainly its own latent."""
  base = dict(variant="official", num_queries=9, width=64, heads=4, out_dim=32,
              spatial_init=True)
  for seed in (0, 1):
    _, attn = _official_attention(qt.QueryConfig(**base, spatial_init_gap=gap), 3, seed)
    assert np.diag(attn).min() >= least, np.diag(attn)
  _, attn = _official_attention(qt.QueryConfig(**base), 3, 0)
  assert np.diag(attn).max() < 0.5
  cfg = qt.QueryConfig(**base, spatial_init_gap=gap)
  mod, params, feats = _init(cfg, side=3)
  out, _ = mod.apply({"params": params}, feats, 9)
  moved, _ = mod.apply({"params": params}, feats.at[:, 4].set(-feats[:, 4]), 9)
  change = np.linalg.norm(np.asarray(moved - out), axis=-1)  # [B, 9]
  assert (change[:, 4] > 5 * np.delete(change, 4, axis=1).max(1)).all(), change


def test_spatial_init_gap_needs_one_latent_per_patch():
  cfg = qt.QueryConfig(variant="official", num_queries=16, width=64, heads=4, out_dim=32,
                       spatial_init=True, spatial_init_gap=6.0)
  mod = qt.make_query_transformer(cfg)
  with pytest.raises(ValueError, match="as many latents as patches; got M=16"):
    mod.init(jax.random.key(0), jnp.zeros((1, 9, cfg.width)), 16)
