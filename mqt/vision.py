"""CLIP vision tower (HF `CLIPVisionModel` semantics) in Flax.

Pre-LN transformer: patch conv without bias, a class token, learned position
embeddings, `pre_layrnorm`, L blocks of (LN, MHA, LN, quick_gelu MLP), and a
`post_layernorm` that only the pooled class token goes through. LLaVA reads a
hidden state from the middle of the stack (default the penultimate,
`hidden_states[-2]`), so blocks after the selected one are never run.

Shapes: images [B, H, W, C] in NHWC (already CLIP-normalized), features
[B, P, D] with P = (H/p)*(W/p) patches (+1 when the class token is kept).
"""
import dataclasses

import jax
import jax.numpy as jnp
from flax import linen as nn

from mqt import layers


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int = 336
  patch_size: int = 14
  width: int = 1024
  depth: int = 24
  heads: int = 16
  mlp_dim: int = 4096
  ln_eps: float = 1e-5
  channels: int = 3
  select_layer: int = -2  # Index into HF `hidden_states` (0 = embeddings).
  keep_cls: bool = False  # LLaVA's "patch" feature drops the class token.
  # How `position_embedding` starts (it is learnt either way, and imported
  # weights replace it): "normal" (CLIP's std 0.02) or "sincos2d" (MAE's 2-D
  # sine / cosine table of the patch's row and column at unit scale,
  # `layers.sincos_2d`; the class token's row zero), for a tower trained from
  # scratch whose features must say where each patch is (configs/tiny.py).
  posemb_init: str = "normal"
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def layers_used(self) -> int:
    """Number of blocks run to reach `hidden_states[select_layer]`."""
    idx = self.select_layer if self.select_layer >= 0 else self.depth + 1 + self.select_layer
    if not 0 <= idx <= self.depth:
      raise ValueError(f"select_layer={self.select_layer} is outside a "
                       f"{self.depth}-block tower")
    return idx


def _posemb_init(c: "VisionConfig"):
  if c.posemb_init == "normal":
    return nn.initializers.normal(0.02)
  if c.posemb_init == "sincos2d":
    def init(key, shape, dtype=jnp.float32):
      del key, shape  # [1 + grid * grid, width]: the class token's row, then the patches'.
      table = layers.sincos_2d(c.width, c.grid)
      return jnp.concatenate([jnp.zeros((1, c.width)), jnp.asarray(table)]).astype(dtype)
    return init
  raise ValueError(f"unknown posemb_init {c.posemb_init!r}; known: 'normal', 'sincos2d'")


class VisionBlock(nn.Module):
  cfg: VisionConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, P, D] -> [B, P, D]."""
    c = self.cfg
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    hd = c.width // c.heads
    x = layers.constrain(x)
    h = layers.layer_norm(c.ln_eps, name="layer_norm1", **kw)(x)
    q, k, v = (layers.dense(c.width, ("embed", "heads"), use_bias=True, name=n, **kw)(h)
               for n in ("q_proj", "k_proj", "v_proj"))
    split = lambda t: t.reshape(*t.shape[:-1], c.heads, hd)
    o = layers.attention(split(q), split(k), split(v), mask=None)
    o = o.reshape(*o.shape[:-2], c.width)
    x = x + layers.dense(c.width, ("heads", "embed"), use_bias=True, name="out_proj", **kw)(o)
    h = layers.layer_norm(c.ln_eps, name="layer_norm2", **kw)(x)
    h = layers.dense(c.mlp_dim, ("embed", "mlp"), use_bias=True, name="fc1", **kw)(h)
    h = layers.dense(c.width, ("mlp", "embed"), use_bias=True, name="fc2", **kw)(
        layers.quick_gelu(h))
    return layers.constrain(x + h)


class VisionTower(nn.Module):
  cfg: VisionConfig

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] -> features [B, P, D] (hidden_states[select_layer])."""
    c = self.cfg
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
    x = nn.Conv(c.width, (c.patch_size, c.patch_size), strides=c.patch_size,
                padding="VALID", use_bias=False,
                kernel_init=layers.logical(nn.initializers.lecun_normal(),
                                           (None, None, None, "embed")),
                name="patch_embedding", **kw)(images.astype(c.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, c.width)
    cls = self.param("class_embedding", layers.logical(nn.initializers.normal(0.02), ("embed",)),
                     (c.width,), c.param_dtype)
    pos = self.param("position_embedding", layers.logical(_posemb_init(c), (None, "embed")),
                     (x.shape[1] + 1, c.width), c.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(c.dtype), (b, 1, c.width)), x], axis=1)
    x = x + pos.astype(c.dtype)[None]
    x = layers.layer_norm(c.ln_eps, name="pre_layrnorm", **kw)(x)
    # Blocks past the selected hidden state are parameters (they are in every
    # checkpoint and in the parameter count) but are never run after init.
    run = c.depth if self.is_initializing() else c.layers_used
    feats = x
    for i in range(run):
      x = VisionBlock(c, name=f"layers_{i}")(x)
      if i + 1 == c.layers_used:
        feats = x
    if self.is_initializing():
      layers.layer_norm(c.ln_eps, name="post_layernorm", **kw)(x[:, 0])
    return feats if c.keep_cls else feats[:, 1:]
