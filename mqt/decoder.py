"""LLaMA decoder (HF `LlamaForCausalLM` semantics) with a functional KV cache.

RMSNorm, rotate_half RoPE, SwiGLU, grouped-query attention, untied head.
Attention runs through `jax.nn.dot_product_attention`. Layers are either
unrolled (`layers_0`, ...) or one `nn.scan` stack (`layers`, with a leading
`layers` axis on every parameter), optionally under `nn.remat` with a named
policy.

Shapes: embeds [B, T, D]; positions [B, T] int32; mask [B, T, S] boolean
(True = may attend), S = T without a cache or the cache length with one.
Cache: {"k": [L, B, S, K, H], "v": [L, B, S, K, H]} written at `cache_index`:
a scalar (every row at the same slot) or [B] int32, one start slot per row
(batched decoding of prompts of different lengths, see mqt/generate.py).
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from mqt import layers


@dataclasses.dataclass(frozen=True)
class LlamaConfig(layers.StackConfig):
  """The LLM; `width`, `depth`, `heads` and `mlp_dim` are `layers.StackConfig`'s."""
  vocab_size: int = 32000
  kv_heads: int = 32
  head_dim: int = 128
  rms_eps: float = 1e-5
  rope_theta: float = 10000.0
  scan_layers: bool = False
  remat_policy: str = "none"  # none | full | dots | dots_no_batch | nothing


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """HF rotate_half rotary embedding. x [B, T, N, H], positions [B, T]."""
  h = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)
  ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
  ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(ang).astype(x.dtype), jnp.sin(ang).astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def write_cache(cache: jax.Array, new: jax.Array, index) -> jax.Array:
  """Writes new [B, T, K, H] into cache [B, S, K, H] at slot `index` (scalar) or at
  slots index[b] .. index[b] + T - 1 of each row b (index [B])."""
  index = jnp.asarray(index, jnp.int32)
  new = new.astype(cache.dtype)
  if index.ndim == 0:
    return jax.lax.dynamic_update_slice_in_dim(cache, new, index, 1)
  b, t = new.shape[:2]
  rows = jnp.arange(b)[:, None]
  return cache.at[rows, index[:, None] + jnp.arange(t)[None]].set(new, mode="drop")


class LlamaBlock(nn.Module):
  cfg: LlamaConfig

  @nn.compact
  def __call__(self, x, positions, mask, cache, cache_index):
    """x [B, T, D] -> (x [B, T, D], new cache {"k","v": [B, S, K, H]} or None)."""
    c = self.cfg
    kw = c.kw
    b, t, d = x.shape
    x = layers.constrain(x)
    # Dense layers and norms see rows [B*T, D]: on the CPU, a weight gradient of a
    # [B, T, D] product made XLA transpose the activation through a slow 3-D copy (the
    # MLP's backward ran at half the speed of the same layers on flat rows).
    x = x.reshape(b * t, d)
    h = layers.RMSNorm(c.rms_eps, name="input_layernorm", **kw)(x)
    proj = lambda heads, names, name: layers.dense(
        heads * c.head_dim, names, use_bias=False, name=name, **kw)(h)
    q = proj(c.heads, ("embed", "heads"), "q_proj")
    k = proj(c.kv_heads, ("embed", "kv"), "k_proj")
    v = proj(c.kv_heads, ("embed", "kv"), "v_proj")
    q = rope(q.reshape(b, t, c.heads, c.head_dim), positions, c.rope_theta)
    k = rope(k.reshape(b, t, c.kv_heads, c.head_dim), positions, c.rope_theta)
    v = v.reshape(b, t, c.kv_heads, c.head_dim)
    new_cache = None
    if cache is not None:
      k, v = write_cache(cache["k"], k, cache_index), write_cache(cache["v"], v, cache_index)
      new_cache = {"k": k, "v": v}
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    o = layers.attention(q, k, v, mask=mask[:, None]).reshape(b * t, c.heads * c.head_dim)
    x = x + layers.dense(c.width, ("heads", "embed"), use_bias=False, name="o_proj", **kw)(o)
    h = layers.RMSNorm(c.rms_eps, name="post_attention_layernorm", **kw)(x)
    gate = layers.dense(c.mlp_dim, ("embed", "mlp"), use_bias=False, name="gate_proj", **kw)(h)
    up = layers.dense(c.mlp_dim, ("embed", "mlp"), use_bias=False, name="up_proj", **kw)(h)
    x = x + layers.dense(c.width, ("mlp", "embed"), use_bias=False, name="down_proj", **kw)(
        nn.silu(gate) * up)
    return layers.constrain(x.reshape(b, t, d)), new_cache


class LlamaDecoder(nn.Module):
  cfg: LlamaConfig

  def setup(self):
    c = self.cfg
    kw = c.kw
    self.embed_tokens = nn.Embed(
        c.vocab_size, c.width, embedding_init=layers.logical(
            nn.initializers.normal(0.02), ("vocab", "embed")), name="embed_tokens", **kw)
    block = LlamaBlock
    if c.remat_policy != "none":
      block = nn.remat(block, policy=layers.remat_policy(c.remat_policy),
                       prevent_cse=not c.scan_layers)
    if c.scan_layers:
      self.layers = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=c.depth,
          metadata_params={nn.PARTITION_NAME: "layers"})(c, name="layers")
    else:
      self.layers = [block(c, name=f"layers_{i}") for i in range(c.depth)]
    self.norm = layers.RMSNorm(c.rms_eps, name="norm", **kw)
    self.lm_head = layers.dense(c.vocab_size, ("embed", "vocab"), use_bias=False,
                                name="lm_head", **kw)

  def embed(self, ids: jax.Array) -> jax.Array:
    """ids [B, T] -> [B, T, D]."""
    return layers.constrain(self.embed_tokens(ids))

  def head(self, x: jax.Array) -> jax.Array:
    """Hidden states [..., D] (before the final norm) -> logits [..., V] float32."""
    return self.lm_head(self.norm(x)).astype(jnp.float32)

  def __call__(self, embeds, positions, mask, cache=None, cache_index=0, logits_at=None,
               return_hidden: bool = False):
    """-> (logits [B, T, V] float32, new cache or None).

    logits_at [B] int32: only the logits at that position of each row ([B, 1, V]),
    so a prefill does not materialize [B, T, V]. return_hidden: the hidden states
    [B, T, D] before the final norm instead of logits (`head` maps them to logits;
    the train step does so a chunk of positions at a time).
    """
    if self.is_initializing():  # Create the embedding table when init runs __call__ alone.
      self.embed_tokens(jnp.zeros((1, 1), jnp.int32))
    x = layers.constrain(embeds.astype(self.cfg.dtype))
    if self.cfg.scan_layers:
      x, new_cache = self.layers(x, positions, mask, cache, cache_index)
    else:
      new = []
      for i, layer in enumerate(self.layers):
        layer_cache = None if cache is None else jax.tree.map(lambda a: a[i], cache)
        x, nc = layer(x, positions, mask, layer_cache, cache_index)
        new.append(nc)
      new_cache = None if cache is None else jax.tree.map(lambda *a: jnp.stack(a), *new)
    if logits_at is not None:
      x = jnp.take_along_axis(x, jnp.asarray(logits_at, jnp.int32)[:, None, None], axis=1)
    if return_hidden:
      return x, new_cache
    return self.head(x), new_cache

  def init_cache(self, batch: int, length: int, dtype=None):
    c = self.cfg
    shape = (c.depth, batch, length, c.kv_heads, c.head_dim)
    dtype = dtype or c.dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
