"""What each visual token draws on: gradient maps over the vision tower's patches.

For an image and a number m of visual tokens, `latent_maps` gives one map per
token over the patch grid, Grad-CAM style: the token's output norm is
differentiated with respect to the patch features the query transformer reads
(the vision tower's selected layer), the gradient is averaged over patches per
channel, and the map is the ReLU of those channel weights times each patch's
features. A map is the patches that raise that token's output; it does not need
the query transformer's attention to depend on the image (with the released
position-only keys it does not).

`attention_maps` gives the query transformer's cross-attention weights instead
(mean over heads, and over blocks for the perceiver). They depend on the image
only where the keys carry content (the perceiver variant); with position-only
keys they are one fixed pattern per token, the same for every image.

Only the vision tower and the query transformer run; `params` needs only their
subtrees ("vision", "query").
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mqt.matryoshka import validate_m
from mqt.model import MQTLLaVA, ModelConfig
from mqt.query_transformer import patch_grid


def latent_maps(cfg: ModelConfig, params, images, m: int) -> np.ndarray:
  """images [B, H, W, C] (CLIP-normalized) -> maps [B, m, g, g] float32 in [0, 1]
  (each map scaled by its own maximum; g x g patches)."""
  return _run(_gradient, cfg, params, images, m)


def attention_maps(cfg: ModelConfig, params, images, m: int) -> np.ndarray:
  """images [B, H, W, C] -> the query transformer's attention over patches [B, m, g, g]
  float32, each map scaled by its own maximum."""
  return _run(_attention, cfg, params, images, m)


def _run(fn, cfg: ModelConfig, params, images, m: int) -> np.ndarray:
  validate_m(m, cfg.query.num_queries)
  sub = {k: params[k] for k in ("vision", "query")}
  return np.asarray(fn(cfg, sub, jnp.asarray(images), m))


def _query(model, variables, features, m: int, **kw):
  return model.apply(variables, features, m, m, method=lambda mdl, x, mm, n: mdl.query(
      x, mm, num_latents=n), **kw)


def _scaled(maps, batch: int, m: int):
  """[B, m, P] -> [B, m, g, g], each map divided by its maximum."""
  maps = maps / jnp.maximum(maps.max(axis=-1, keepdims=True), 1e-12)
  grid = patch_grid(maps.shape[-1])
  return maps.reshape(batch, m, grid, grid)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _gradient(cfg: ModelConfig, params, images, m: int):
  model = MQTLLaVA(cfg)
  variables = {"params": params}
  feats = model.apply(variables, images, method=lambda mdl, x: mdl.vision(x))
  keep_cls = cfg.vision.keep_cls
  patches = feats[:, 1:] if keep_cls else feats

  def norms(p):  # [B, P, Dv] -> [m, B]: each token's output norm.
    f = jnp.concatenate([feats[:, :1], p], axis=1) if keep_cls else p
    tokens, _ = _query(model, variables, f, m)
    return jnp.linalg.norm(tokens, axis=-1).T

  grads = jax.jacrev(lambda p: norms(p).sum(axis=1))(patches)  # [m, B, P, Dv]
  weights = grads.mean(axis=2, keepdims=True)  # Per token and channel.
  cam = jax.nn.relu(jnp.sum(weights * patches[None], axis=-1))  # [m, B, P]
  return _scaled(cam.transpose(1, 0, 2), images.shape[0], m)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _attention(cfg: ModelConfig, params, images, m: int):
  model = MQTLLaVA(cfg)
  variables = {"params": params}
  feats = model.apply(variables, images, method=lambda mdl, x: mdl.vision(x))
  _, state = _query(model, variables, feats, m, mutable=["intermediates"])
  weights = jax.tree.leaves(state["intermediates"])  # Each [B, heads, m, S].
  att = jnp.mean(jnp.stack([w.mean(axis=1) for w in weights]), axis=0)  # [B, m, S]
  if cfg.vision.keep_cls:
    att = att[..., 1:]  # The class token's column.
  return _scaled(att, images.shape[0], m)


def save_grid(path: str, image: np.ndarray, maps_by_m: dict) -> None:
  """A PNG: one row per m, the image then one heatmap per token over it.
  image [H, W, 3] in [0, 1]; maps_by_m {m: [m, g, g]}."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  rows = sorted(maps_by_m)
  cols = 1 + max(rows)
  fig, axes = plt.subplots(len(rows), cols, figsize=(1.4 * cols, 1.4 * len(rows)),
                           squeeze=False)
  size = image.shape[0]
  for r, m in enumerate(rows):
    axes[r, 0].imshow(image)
    axes[r, 0].set_ylabel(f"m={m}", fontsize=8)
    for j in range(cols - 1):
      ax = axes[r, j + 1]
      if j < m:
        ax.imshow(image)
        ax.imshow(maps_by_m[m][j], cmap="inferno", alpha=0.6, extent=(0, size, size, 0),
                  interpolation="nearest", vmin=0, vmax=1)
        if r == 0 or j >= rows[r - 1]:
          ax.set_title(f"token {j}", fontsize=7)
    for ax in axes[r]:
      ax.set_xticks([])
      ax.set_yticks([])
      if not ax.images:
        ax.axis("off")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
