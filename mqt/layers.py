"""Building blocks shared by the vision tower, query transformer and decoder.

Einsum letters used across the package:
  B batch, T query length, S key length, N query heads, K key/value heads,
  H head dim, D model width, F feed-forward width, V vocabulary, M latents.

Every parameter carries logical axis names (`embed`, `mlp`, `heads`, `kv`,
`vocab`, `layers`, ...); one rule table (config `sharding.logical_axis_rules`)
maps them to mesh axes.
"""
import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Dtype = Any


# Logical names of a [B, T, D] activation at block boundaries: the batch on the
# data axes (rule `batch`), positions and width whole (`length` and `act_embed`
# map to no mesh axis; parameters' `embed` is on fsdp, which the batch holds).
ACTIVATION = ("batch", "length", "act_embed")


@dataclasses.dataclass(frozen=True, kw_only=True)
class StackConfig:
  """What every model part's config has: a stack of `depth` blocks of width `width`,
  `heads` attention heads and an MLP of width `mlp_dim`, computed in `dtype` with
  parameters stored in `param_dtype`. Keyword-only; a subclass may give defaults."""
  width: int
  depth: int
  heads: int
  mlp_dim: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def kw(self) -> dict:
    """The dtypes as the layers take them: `dense(..., **cfg.kw)`."""
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)


def logical(init, names: Sequence[str | None]):
  return nn.with_logical_partitioning(init, tuple(names))


def constrain(x: jax.Array, names: Sequence[str | None] = ACTIVATION) -> jax.Array:
  """A sharding constraint by logical names; a no-op outside `nn.logical_axis_rules`
  and a mesh (`jax.set_mesh`)."""
  return nn.with_logical_constraint(x, tuple(names))


def dense(features: int, names: Sequence[str | None], *, use_bias: bool,
          dtype: Dtype, param_dtype: Dtype, name: str,
          kernel_init=nn.initializers.lecun_normal()) -> nn.Dense:
  """A Dense layer whose kernel [in, out] and bias [out] carry logical names."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
      kernel_init=logical(kernel_init, names),
      bias_init=logical(nn.initializers.zeros_init(), (names[-1],)),
      name=name)


def layer_norm(eps: float, *, dtype: Dtype, param_dtype: Dtype, name: str,
               axis_name: str = "embed") -> nn.LayerNorm:
  """LayerNorm with torch's two-pass variance (exact against nn.LayerNorm)."""
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype,
      use_fast_variance=False,
      scale_init=logical(nn.initializers.ones_init(), (axis_name,)),
      bias_init=logical(nn.initializers.zeros_init(), (axis_name,)),
      name=name)


class RMSNorm(nn.Module):
  """LLaMA RMSNorm: statistics in float32, scale applied in the input dtype."""
  eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", logical(nn.initializers.ones_init(), ("embed",)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * x32.astype(self.dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
  return x * jax.nn.sigmoid(1.702 * x)


def attention(q: jax.Array, k: jax.Array, v: jax.Array,
              mask: jax.Array | None) -> jax.Array:
  """Scaled dot-product attention through `jax.nn.dot_product_attention`.

  Args:
    q: [B, T, N, H]; k, v: [B, S, K, H] with N a multiple of K (grouped-query).
    mask: boolean, broadcastable to [B, N, T, S]; True = may attend.
  Returns:
    [B, T, N, H].

  The same arithmetic as `jax.nn.dot_product_attention`'s XLA path (float32 logits
  scaled by H^-1/2, masked to the dtype's minimum, float32 softmax), laid out for
  the CPU and TPU matmul units: heads leading, each key/value head's G query heads
  stacked along the query axis ([B, K, G*T, H] against [B, K, S, H]), so both
  products are plain batched matmuls over B*K and the G query heads share one
  key/value block without a copy per head. On the CPU this layout takes 20-40% less
  time than `jax.nn.dot_product_attention`'s, forward and backward (docs/).
  """
  b, t, n, h = q.shape
  s, kh = k.shape[1], k.shape[2]
  g = n // kh
  qg = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
  logits = jnp.einsum("bkqh,bksh->bkqs", qg, kt, preferred_element_type=jnp.float32)
  logits = (logits * np.float32(h ** -0.5)).reshape(b, kh, g, t, s)
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    if mask.ndim != 4:
      raise ValueError(f"attention mask must be 4-D [B|1, N|1, T, S], got {mask.shape}")
    mb, mn = mask.shape[:2]
    mask = (mask.reshape(mb, 1, 1, *mask.shape[2:]) if mn == 1
            else mask.reshape(mb, kh, g, *mask.shape[2:]))
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, kh, g * t, s)
  out = jnp.einsum("bkqs,bksh->bkqh", probs, vt)
  return out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def attention_weights(q: jax.Array, k: jax.Array) -> jax.Array:
  """Unmasked softmax(q k^T / sqrt(H)) of `attention`, as [B, N, T, S] float32: for
  pictures of what a query attends to (query transformer maps), not for training."""
  b, t, n, h = q.shape
  k = jnp.repeat(k, n // k.shape[2], axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k, preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits * np.float32(h ** -0.5), axis=-1)


def remat_policy(name: str):
  """Named rematerialization policies for `nn.remat` (config `remat_policy`)."""
  policies = {
      "full": None,  # Save nothing, recompute the whole block.
      "dots": jax.checkpoint_policies.dots_saveable,
      "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
      "nothing": jax.checkpoint_policies.nothing_saveable,
  }
  if name not in policies:
    raise ValueError(f"unknown remat_policy {name!r}; choose one of "
                     f"{['none', *policies]}")
  return policies[name]


def sincos_2d(dim: int, grid: int) -> np.ndarray:
  """MAE 2-D sin-cos table [grid*grid, dim], raster order (row*grid + col).

  Channels: [sin(col w), cos(col w), sin(row w), cos(row w)] with
  w_k = 10000^(-k / (dim/4)). Rounded through float16 as the official code
  creates it.
  """
  if dim % 4:
    raise ValueError(f"sin-cos width {dim} must be divisible by 4")
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  rows, cols = np.meshgrid(np.arange(grid), np.arange(grid), indexing="ij")
  def half(p):
    ang = p.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(ang), np.cos(ang)], axis=1)
  table = np.concatenate([half(cols), half(rows)], axis=1)
  return table.astype(np.float16).astype(np.float32)
