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
class VisionConfig(layers.StackConfig):
  """The tower; `width`, `depth`, `heads` and `mlp_dim` are `layers.StackConfig`'s."""
  image_size: int = 336
  patch_size: int = 14
  ln_eps: float = 1e-5
  channels: int = 3
  select_layer: int = -2  # Index into HF `hidden_states` (0 = embeddings).
  keep_cls: bool = False  # LLaVA's "patch" feature drops the class token.
  # How `position_embedding` starts (it is learnt, and imported weights replace it):
  # "normal", CLIP's std 0.02. (`bench/latent_probe.py --posemb=sincos2d` overwrites
  # a fresh tower's with a 2-D sine / cosine table.)
  posemb_init: str = "normal"

  def __post_init__(self):
    if self.posemb_init != "normal":
      raise ValueError(f"unknown posemb_init {self.posemb_init!r}; known: 'normal'")

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


class VisionBlock(nn.Module):
  cfg: VisionConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, P, D] -> [B, P, D]."""
    c = self.cfg
    kw = c.kw
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

  def _embed(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] -> [B, 1 + P, D]: the class token, then the patches, plus
    their position embeddings (HF `CLIPVisionEmbeddings`)."""
    c = self.cfg
    x = nn.Conv(c.width, (c.patch_size, c.patch_size), strides=c.patch_size,
                padding="VALID", use_bias=False,
                kernel_init=layers.logical(nn.initializers.lecun_normal(),
                                           (None, None, None, "embed")),
                name="patch_embedding", **c.kw)(images.astype(c.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, c.width)
    cls = self.param("class_embedding", layers.logical(nn.initializers.normal(0.02), ("embed",)),
                     (c.width,), c.param_dtype)
    pos = self.param("position_embedding",
                     layers.logical(nn.initializers.normal(0.02), (None, "embed")),
                     (x.shape[1] + 1, c.width), c.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(c.dtype), (b, 1, c.width)), x], axis=1)
    return x + pos.astype(c.dtype)[None]

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    """images [B, H, W, C] -> features [B, P, D] (hidden_states[select_layer])."""
    c = self.cfg
    x = layers.layer_norm(c.ln_eps, name="pre_layrnorm", **c.kw)(self._embed(images))
    # Blocks past the selected hidden state are parameters (they are in every
    # checkpoint and in the parameter count) but are never run after init.
    run = c.depth if self.is_initializing() else c.layers_used
    feats = x
    for i in range(run):
      x = VisionBlock(c, name=f"layers_{i}")(x)
      if i + 1 == c.layers_used:
        feats = x
    if self.is_initializing():
      layers.layer_norm(c.ln_eps, name="post_layernorm", **c.kw)(x[:, 0])
    return feats if c.keep_cls else feats[:, 1:]
