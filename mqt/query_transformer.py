"""Matryoshka query transformer: M latents -> any prefix m <= M of visual tokens.

The module always computes all M latents (one static shape for jit) and
returns a validity mask whose first m entries are True; m may be a Python
int, a traced int32 scalar, or one value per example [B]. In every variant
the first m outputs never depend on latents >= m, so masking equals slicing.

Variants (config `variant`):
  official   The released MQT-LLaVA resampler: one cross-attention layer,
             position-only keys ln_k(pos24), values ln_v(features), queries
             ln_q(query + pos16), bias-free `proj` into the LLM width.
             Latents never see each other.
  perceiver  Ours: keys from image content plus position, L pre-LN blocks of
             cross-attention, self-attention among latents, and an MLP, with
             residuals and a final LayerNorm. Latent self-attention is
             masked by `latent_attention`: `prefix` (latent i sees latents
             j < m) or `causal` (latent i sees j <= i, so outputs do not depend
             on m at all).

Shapes: features [B, P, Dv] with P = h*w a square patch grid; outputs
tokens [B, M, D] (zeros past m) and mask [B, M].
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mqt import layers


@dataclasses.dataclass(frozen=True)
class QueryConfig(layers.StackConfig):
  """The query transformer; it gives `layers.StackConfig`'s fields defaults."""
  variant: str = "official"  # official | perceiver
  num_queries: int = 256  # M; a square number (sin-cos grid).
  width: int = 1024  # Latent width = attention width (official: vision width).
  heads: int = 16
  out_dim: int = 4096  # LLM width.
  ln_eps: float = 1e-6
  # perceiver only:
  depth: int = 2
  mlp_dim: int = 4096
  latent_attention: str = "prefix"  # prefix | causal
  # official only: q_proj and k_proj start from the same random matrix, so at
  # initialization q.k is the similarity of a latent's sin-cos position and a
  # patch's: each latent starts by pooling its own region of the image instead
  # of a near-uniform average (the official code's random init). Matters when
  # training from scratch; an imported checkpoint overwrites both.
  spatial_init: bool = False
  # official only, with spatial_init, when M equals the patch count: q_proj and
  # k_proj instead start as the linear map that sends every latent's and every
  # patch's LayerNormed sin-cos position to one-hot codes of its row and column
  # (in each head), scaled so that a patch in the latent's row (column) gains
  # this many attention logits: latent j starts as patch j's features, not a
  # blur (`grid_position_kernel`). The random shared init gives a latent ~0.2 of
  # its own patch on a 3x3 grid (uniform: 0.11), and training does not sharpen
  # it. 0: the random shared init.
  spatial_init_gap: float = 0.0

  @property
  def grid(self) -> int:
    g = math.isqrt(self.num_queries)
    if g * g != self.num_queries:
      raise ValueError(f"num_queries={self.num_queries} is not a square number")
    return g


# --------------------------------------------------------------------------
# Fixed tables.

@functools.lru_cache(maxsize=None)
def torch_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] matrix equal to torch `F.interpolate(mode="bicubic",
  align_corners=False)` along one axis (Keys kernel a=-0.75, clamped borders).
  """
  a = -0.75
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  scale = in_size / out_size
  mat = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = scale * (i + 0.5) - 0.5
    i0 = math.floor(src)
    t = src - i0
    for k, w in enumerate((far(t + 1), near(t), near(1 - t), far(2 - t))):
      mat[i, min(max(i0 - 1 + k, 0), in_size - 1)] += w
  return mat.astype(np.float32)


def resize_table(table: jax.Array, grid: int, out_h: int, out_w: int) -> jax.Array:
  """Bicubic-resize a raster table [grid*grid, C] to [out_h*out_w, C]."""
  c = table.shape[-1]
  t = table.astype(jnp.float32).reshape(grid, grid, c)
  wh = jnp.asarray(torch_bicubic_matrix(grid, out_h))
  ww = jnp.asarray(torch_bicubic_matrix(grid, out_w))
  t = jnp.einsum("yi,ijc,xj->yxc", wh, t, ww, precision=jax.lax.Precision.HIGHEST)
  return t.reshape(out_h * out_w, c).astype(table.dtype)


def patch_grid(num_patches: int) -> int:
  side = math.isqrt(num_patches)
  if side * side != num_patches:
    raise ValueError(f"the query transformer needs a square patch grid; got "
                     f"{num_patches} features (is the class token kept?)")
  return side


def grid_position_kernel(pos: np.ndarray, heads: int, gap: float, eps: float) -> np.ndarray:
  """[D, D] kernel K with LN(pos[j]) @ K = s * (one-hot row ++ one-hot column of j), in
  each head's first 2g dims (g x g grid; pos [g*g, D] the sin-cos table).

  A sin-cos position is a sum of a row part and a column part, so no linear map
  gives one-hot cells; one-hot rows and columns it does give. Then q.k / sqrt(d)
  is gap * ([same row] + [same column]): softmax over patches factorizes into a
  row softmax times a column softmax, each `gap` logits sharper on the latent's
  own row / column (gap 5: ~0.97 of its weight on its own patch on a 3x3 grid).
  """
  n, width = pos.shape
  g = math.isqrt(n)
  d = width // heads
  if d < 2 * g:
    raise ValueError(f"spatial_init_gap: head width {d} < {2 * g} (row and column codes)")
  x = pos.astype(np.float64) - pos.mean(-1, keepdims=True)
  x = x / np.sqrt(x.var(-1, keepdims=True) + eps)
  scale = math.sqrt(gap * math.sqrt(d))
  rows, cols = np.divmod(np.arange(n), g)
  target = np.zeros((n, width))
  for h in range(heads):  # Centred codes: their products differ from one-hot's by a constant.
    target[:, h * d:h * d + 2 * g] = -scale / g
    target[np.arange(n), h * d + rows] += scale
    target[np.arange(n), h * d + g + cols] += scale
  kernel = np.linalg.lstsq(x, target, rcond=1e-6)[0]
  if not np.allclose(x @ kernel, target, atol=0.05 * scale):  # float16-rounded table: ~0.02.
    raise ValueError("spatial_init_gap: the sin-cos positions do not separate rows and columns")
  return kernel.astype(np.float32)


def prefix_mask(m, batch: int, n: int) -> jax.Array:
  """[B, n] boolean, True for latent index < m (m: int, scalar or [B])."""
  m = jnp.broadcast_to(jnp.asarray(m, jnp.int32), (batch,))
  return jnp.arange(n)[None, :] < m[:, None]


# --------------------------------------------------------------------------

class _Latents(nn.Module):
  """Learned queries and their sin-cos positions, sliced to `n` latents."""
  cfg: QueryConfig

  @nn.compact
  def __call__(self, n: int):
    c = self.cfg
    query = self.param("query", layers.logical(nn.initializers.truncated_normal(0.02),
                                               ("latents", "embed")),
                       (c.num_queries, c.width), c.param_dtype)
    table = layers.sincos_2d(c.width, c.grid)
    pos = self.param("pos_embed", layers.logical(lambda *_: jnp.asarray(table),
                                                 ("latents", "embed")),
                     (c.num_queries, c.width), c.param_dtype)
    return query[:n], pos


def _heads(x, h):
  return x.reshape(*x.shape[:-1], h, x.shape[-1] // h)


class _QueryTransformer(nn.Module):
  """What the variants share: the latents, their positions resized to the patch grid,
  and the prefix mask; `_tokens` (a variant's) maps them to the visual tokens."""
  cfg: QueryConfig

  @nn.compact
  def __call__(self, features: jax.Array, m, num_latents: int | None = None):
    """features [B, P, Dv], m -> (tokens [B, n, D], mask [B, n]); n = num_latents or M."""
    c = self.cfg
    n = num_latents or c.num_queries
    b, p, _ = features.shape
    side = patch_grid(p)
    query, pos16 = _Latents(c, name="latents")(n)
    pos_kv = resize_table(pos16, c.grid, side, side)  # [P, Dq]
    out = self._tokens(features, m, query + pos16[:n], pos_kv)
    mask = prefix_mask(m, b, n)
    return jnp.where(mask[..., None], out, 0), mask

  def _tokens(self, features, m, latents, pos_kv) -> jax.Array:
    """features [B, P, Dv], latents (queries plus positions) [n, Dq], the patches'
    positions pos_kv [P, Dq] -> tokens [B, n, D] (before masking)."""
    raise NotImplementedError


class OfficialQueryTransformer(_QueryTransformer):

  def _tokens(self, features, m, latents, pos_kv):
    del m  # Latents never see each other: the first m outputs are the same for any m.
    c, kw = self.cfg, self.cfg.kw
    (b, p, _), n = features.shape, latents.shape[0]
    q = layers.layer_norm(c.ln_eps, name="ln_q", **kw)(latents)
    k = layers.layer_norm(c.ln_eps, name="ln_k", **kw)(pos_kv)
    v = layers.layer_norm(c.ln_eps, name="ln_v", **kw)(features)
    init = nn.initializers.lecun_normal()
    if c.spatial_init and c.spatial_init_gap and self.is_initializing():
      if n != c.num_queries or c.num_queries != p:
        raise ValueError(f"spatial_init_gap needs as many latents as patches; got M="
                         f"{c.num_queries} latents (n={n}) and {p} patches")
      kernel = grid_position_kernel(layers.sincos_2d(c.width, c.grid), c.heads,
                                    c.spatial_init_gap, c.ln_eps)  # pos16's init value.
      init = lambda _, shape, dtype: jnp.asarray(kernel, dtype)
    elif c.spatial_init and self.is_initializing():
      shared = self.make_rng("params")
      init = lambda _, shape, dtype: nn.initializers.lecun_normal()(shared, shape, dtype)
    q = layers.dense(c.width, ("embed", "heads"), use_bias=True, name="q_proj",
                     kernel_init=init, **kw)(q)
    k = layers.dense(c.width, ("embed", "heads"), use_bias=True, name="k_proj",
                     kernel_init=init, **kw)(k)
    v = layers.dense(c.width, ("embed", "heads"), use_bias=True, name="v_proj", **kw)(v)
    q = jnp.broadcast_to(_heads(q, c.heads)[None], (b, n, c.heads, c.width // c.heads))
    k = jnp.broadcast_to(_heads(k, c.heads)[None], (b, p, c.heads, c.width // c.heads))
    if self.is_mutable_collection("intermediates"):  # Asked for by mqt/maps.py only.
      self.sow("intermediates", "cross_attention", layers.attention_weights(q, k))
    o = layers.attention(q, k, _heads(v, c.heads), mask=None).reshape(b, n, c.width)
    o = layers.dense(c.width, ("heads", "embed"), use_bias=True, name="out_proj", **kw)(o)
    proj = self.param("proj", layers.logical(nn.initializers.normal(c.out_dim ** -0.5),
                                             ("embed", "llm_embed")),
                      (c.width, c.out_dim), c.param_dtype)
    return o @ proj.astype(o.dtype)


class _PerceiverBlock(nn.Module):
  cfg: QueryConfig

  @nn.compact
  def __call__(self, x, kv_k, kv_v, self_mask):
    """x [B, n, Dq]; kv_k, kv_v [B, P, Dq]; self_mask [B, 1, n, n]."""
    c = self.cfg
    kw = c.kw
    proj = lambda name, names=("embed", "heads"): layers.dense(
        c.width, names, use_bias=True, name=name, **kw)
    h = layers.layer_norm(c.ln_eps, name="ln_cross", **kw)(x)
    q, k = _heads(proj("cross_q")(h), c.heads), _heads(proj("cross_k")(kv_k), c.heads)
    if self.is_mutable_collection("intermediates"):  # Asked for by mqt/maps.py only.
      self.sow("intermediates", "cross_attention", layers.attention_weights(q, k))
    o = layers.attention(q, k, _heads(proj("cross_v")(kv_v), c.heads), mask=None)
    x = x + proj("cross_out", ("heads", "embed"))(o.reshape(x.shape))
    h = layers.layer_norm(c.ln_eps, name="ln_self", **kw)(x)
    o = layers.attention(_heads(proj("self_q")(h), c.heads), _heads(proj("self_k")(h), c.heads),
                         _heads(proj("self_v")(h), c.heads), mask=self_mask)
    x = x + proj("self_out", ("heads", "embed"))(o.reshape(x.shape))
    h = layers.layer_norm(c.ln_eps, name="ln_mlp", **kw)(x)
    h = layers.dense(c.mlp_dim, ("embed", "mlp"), use_bias=True, name="fc1", **kw)(h)
    h = layers.dense(c.width, ("mlp", "embed"), use_bias=True, name="fc2", **kw)(nn.gelu(h))
    return x + h


class PerceiverQueryTransformer(_QueryTransformer):

  def _tokens(self, features, m, latents, pos_kv):
    c, kw = self.cfg, self.cfg.kw
    b, n = features.shape[0], latents.shape[0]
    feats = layers.dense(c.width, ("vis_embed", "embed"), use_bias=True, name="in_proj", **kw)(
        features)
    kv_k = layers.layer_norm(c.ln_eps, name="ln_k", **kw)(feats + pos_kv.astype(feats.dtype)[None])
    kv_v = layers.layer_norm(c.ln_eps, name="ln_v", **kw)(feats)
    if c.latent_attention == "prefix":
      # Latent i sees latents j < m. m is clamped to >= 1 so that rows of an
      # image-less sample (m = 0) never see an empty key set.
      self_mask = prefix_mask(jnp.maximum(jnp.asarray(m), 1), b, n)[:, None, None, :]
    elif c.latent_attention == "causal":
      self_mask = jnp.tril(jnp.ones((n, n), bool))[None, None]
    else:
      raise ValueError(f"unknown latent_attention {c.latent_attention!r} (prefix | causal)")
    x = jnp.broadcast_to(latents.astype(feats.dtype)[None], (b, n, c.width))
    for i in range(c.depth):
      x = _PerceiverBlock(c, name=f"blocks_{i}")(x, kv_k, kv_v, self_mask)
    x = layers.layer_norm(c.ln_eps, name="ln_out", **kw)(x)
    return layers.dense(c.out_dim, ("embed", "llm_embed"), use_bias=False, name="proj", **kw)(x)


def make_query_transformer(cfg: QueryConfig, name: str = "query") -> nn.Module:
  variants = {"official": OfficialQueryTransformer, "perceiver": PerceiverQueryTransformer}
  if cfg.variant not in variants:
    raise ValueError(f"unknown query transformer variant {cfg.variant!r}; "
                     f"choose one of {sorted(variants)}")
  if cfg.spatial_init and cfg.variant != "official":
    raise ValueError(f"config.model.query.spatial_init is for the official variant only; "
                     f"the {cfg.variant!r} variant would ignore it")
  return variants[cfg.variant](cfg, name=name)
