"""What each visual token draws on: gradient maps over the vision tower's patches.

For an image and a number m of visual tokens, `latent_maps` gives one map per
token over the patch grid, Grad-CAM style: the token's output norm is
differentiated with respect to the patch features the query transformer reads
(the vision tower's selected layer), the gradient is averaged over patches per
channel, and the map is the ReLU of those channel weights times each patch's
features. A map is the patches that raise that token's output; it does not need
the query transformer's attention to depend on the image (with the released
position-only keys it does not).

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
  validate_m(m, cfg.query.num_queries)
  sub = {k: params[k] for k in ("vision", "query")}
  return np.asarray(_maps(cfg, sub, jnp.asarray(images), m))


@functools.partial(jax.jit, static_argnums=(0, 3))
def _maps(cfg: ModelConfig, params, images, m: int):
  model = MQTLLaVA(cfg)
  variables = {"params": params}
  feats = model.apply(variables, images, method=lambda mdl, x: mdl.vision(x))
  keep_cls = cfg.vision.keep_cls
  patches = feats[:, 1:] if keep_cls else feats
  grid = patch_grid(patches.shape[1])

  def norms(p):  # [B, P, Dv] -> [m, B]: each token's output norm.
    f = jnp.concatenate([feats[:, :1], p], axis=1) if keep_cls else p
    tokens, _ = model.apply(variables, f, m, m, method=lambda mdl, x, mm, n: mdl.query(
        x, mm, num_latents=n))
    return jnp.linalg.norm(tokens, axis=-1).T

  grads = jax.jacrev(lambda p: norms(p).sum(axis=1))(patches)  # [m, B, P, Dv]
  weights = grads.mean(axis=2, keepdims=True)  # Per token and channel.
  cam = jax.nn.relu(jnp.sum(weights * patches[None], axis=-1))  # [m, B, P]
  cam = cam / jnp.maximum(cam.max(axis=-1, keepdims=True), 1e-12)
  return cam.transpose(1, 0, 2).reshape(images.shape[0], m, grid, grid)


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
