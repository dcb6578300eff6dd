r"""Does a visual token say where it is? Linear probes of the tiny model's tokens.

  python -m bench.latent_probe --checkpoint=/tmp/mqt_tiny/stage1/checkpoints
  python -m bench.latent_probe --init_only --posemb=sincos2d

Renders --n fresh built-in scenes (their own stream, never trained on), runs the
tower and the query transformer at m = M, and fits ridge-regression classifiers
(one-hot targets, closed form) on three quarters of the images, scored on the
rest. Features: the M visual tokens as the LLM gets them (after the projector)
and the tower's patch features. Targets per token j: its cell's row, column
and cell (j in reading order; this needs M = the tower's patch count, as in
configs/tiny.py, and latents that pool their own patch: trained with
`--config.model.query.spatial_init=True --config.model.query.spatial_init_gap=6`,
as the earlier default was; the current default's tokens all pool the whole
image, so their row and column are not theirs to say), and for
tokens of occupied cells the object's colour and shape. Tokens of occupied and
empty cells are probed apart: an empty cell's token can say its place through
the background alone.

What it is for: a question about where things are ("Is the red circle to the
left or right of the blue square?", "Which column is the cross in?") needs the
place either in the token's content, which this measures, or in where the token
sits in the sequence, which the LLM's rotary positions can use only through its
attention pattern (the values it reads carry no position). The earlier default's
stage-1 checkpoint (latents on their cells; position embeddings drawn with
CLIP's std 0.02) gives
column 0.45 and cell 0.24 from the tokens of occupied cells (chance 0.33 and
0.11); the same run with the tower's position embeddings started as the 2-D sine /
cosine table that --posemb=sincos2d writes, 0.93 and 0.58
(docs/2026-12-06-tiny-default-history.md). Prints a table; --out writes it as JSON.

--posemb=sincos2d (with --init_only): the fresh tower's `position_embedding` is
overwritten with MAE's 2-D sine / cosine table of each patch's row and column at unit
scale (`sincos_position_embedding`; the class token's row zero) instead of CLIP's
std-0.02 draw, for a tower whose features must say where each patch is.
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags
from flax import linen as nn
from ml_collections import config_flags

from data import images as images_lib
from data import synthetic
from mqt import layers
from mqt import params as params_lib
from mqt import sharding
from mqt.model import ModelConfig, MQTLLaVA
from mqt.vision import VisionConfig

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py",
                                          "The model's config (get_config(arg)).",
                                          lock_config=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", "", "An orbax checkpoints folder of a run of "
                                  "--config, e.g. <workdir>/stage1/checkpoints.")
_INIT_ONLY = flags.DEFINE_bool("init_only", False, "Probe the freshly initialized model "
                               "instead of a checkpoint.")
_POSEMB = flags.DEFINE_enum("posemb", "normal", ["normal", "sincos2d"],
                            "With --init_only: the tower's position embeddings as drawn "
                            "(normal: CLIP's std 0.02) or overwritten with the 2-D sine / "
                            "cosine table (sincos2d).")
_N = flags.DEFINE_integer("n", 1200, "Scenes to render (three quarters fit, a quarter scored).")
_OUT = flags.DEFINE_string("out", "", "Write the results here as JSON.")

PROBE_SPLIT = "probe"  # A stream of its own: no training split draws from it.
TARGETS = ("row", "column", "cell", "colour", "shape")


def sincos_position_embedding(vision: VisionConfig) -> np.ndarray:
  """[1 + grid * grid, width] float32: zeros for the class token, then the patches'
  2-D sine / cosine table in raster order (`layers.sincos_2d`)."""
  table = layers.sincos_2d(vision.width, vision.grid)
  return np.concatenate([np.zeros((1, vision.width), np.float32), table])


def init_params(config, model_cfg: ModelConfig, mesh, posemb: str = "normal"):
  """Fresh parameters of `config` (created sharded on `mesh`); posemb="sincos2d": with
  the tower's `position_embedding` replaced by `sincos_position_embedding` (same
  dtype and sharding)."""
  if posemb not in ("normal", "sincos2d"):
    raise ValueError(f"unknown posemb {posemb!r}; known: 'normal', 'sincos2d'")
  shardings = params_lib.param_shardings(model_cfg, mesh, config.sharding.logical_axis_rules)
  params = params_lib.fresh_params(config, model_cfg, MQTLLaVA(model_cfg), shardings)
  if posemb == "normal":
    return params
  old = params["vision"]["position_embedding"]
  table = jnp.asarray(sincos_position_embedding(model_cfg.vision)).astype(old.dtype)
  vision = {**params["vision"], "position_embedding": jax.device_put(table, old.sharding)}
  return {**params, "vision": vision}


def ridge_fit(x: np.ndarray, y: np.ndarray, classes: int, reg: float = 1e-2):
  """Closed-form ridge regression of one-hot(y) on standardized x (plus a bias).
  -> predict(x) giving class indices."""
  mu, sd = x.mean(0), x.std(0) + 1e-6
  z = np.concatenate([(x - mu) / sd, np.ones((len(x), 1))], axis=1)
  w = np.linalg.solve(z.T @ z + reg * len(x) * np.eye(z.shape[1]), z.T @ np.eye(classes)[y])
  return lambda q: np.argmax(np.concatenate([(q - mu) / sd, np.ones((len(q), 1))], 1) @ w, 1)


def probe_accuracy(x: np.ndarray, y: np.ndarray, fit: np.ndarray, classes: int) -> float:
  """Held-out accuracy of a ridge classifier fit on rows where `fit`, scored on the rest."""
  predict = ridge_fit(x[fit], y[fit], classes)
  return float((predict(x[~fit]) == y[~fit]).mean())


def scene_labels(scenes, grid: int) -> dict:
  """Per scene and cell [n, grid * grid] int: row, column, cell, and for occupied cells
  colour and shape (-1 where empty)."""
  n, cells = len(scenes), grid * grid
  cell = np.tile(np.arange(cells), (n, 1))
  colour, shape = np.full((n, cells), -1), np.full((n, cells), -1)
  for i, sc in enumerate(scenes):
    for o in sc.objects:
      k = o.row * grid + o.col
      colour[i, k], shape[i, k] = synthetic.COLORS.index(o.color), synthetic.SHAPES.index(o.shape)
  return {"row": cell // grid, "column": cell % grid, "cell": cell, "colour": colour,
          "shape": shape}


def token_features(model_cfg: ModelConfig, params, scenes, batch: int = 250):
  """-> (visual tokens [n, M, D_llm], patch features [n, P, D_vision]) at m = M."""
  size, m = model_cfg.vision.image_size, model_cfg.query.num_queries
  def both(mod, images):  # embed_image's path, keeping the tower's output on the way.
    feats = mod.vision(images)
    return mod.query(feats, m)[0], feats
  model = MQTLLaVA(model_cfg)
  run = jax.jit(lambda p, x: model.apply({"params": p}, x, method=both))
  tokens, patches = [], []
  for start in range(0, len(scenes), batch):
    pixels = np.stack([images_lib.preprocess(synthetic.render(sc, size), size, "pad")
                       for sc in scenes[start:start + batch]])
    t, p = run(params, jnp.asarray(pixels))
    tokens.append(np.asarray(t, np.float32)[:, :m])
    patches.append(np.asarray(p, np.float32)[:, -m:])  # Without the class token, if kept.
  return np.concatenate(tokens), np.concatenate(patches)


def probe(model_cfg: ModelConfig, params, n: int, seed: int = 0) -> dict:
  """{features: {target: {"occupied"|"empty": accuracy}}} plus "chance" and "n"."""
  grid = model_cfg.vision.grid
  m = model_cfg.query.num_queries
  if m != grid * grid:
    raise ValueError(f"the probe labels latent j with cell j: it needs M = the tower's "
                     f"{grid}x{grid} patches, got M = {m}")
  size = model_cfg.vision.image_size
  scenes = [synthetic.make_scene(seed, PROBE_SPLIT, i, size, kind="caption") for i in range(n)]
  labels = scene_labels(scenes, grid)
  occupied = labels["colour"] >= 0
  fit = np.zeros((n, m), bool)
  fit[: (3 * n) // 4] = True
  classes = {"row": grid, "column": grid, "cell": m, "colour": len(synthetic.COLORS),
             "shape": len(synthetic.SHAPES)}
  tokens, patches = token_features(model_cfg, params, scenes)
  out = {"n": n, "chance": {t: 1.0 / classes[t] for t in TARGETS}}
  for name, feats in (("visual tokens", tokens), ("patch features", patches)):
    d = feats.shape[-1]
    rows = {}
    for target in TARGETS:
      rows[target] = {}
      for where, mask in (("occupied", occupied), ("empty", ~occupied)):
        if target in ("colour", "shape") and where == "empty":
          continue
        rows[target][where] = probe_accuracy(feats[mask].reshape(-1, d),
                                             labels[target][mask], fit[mask], classes[target])
    out[name] = rows
  return out


def format_table(result: dict) -> str:
  lines = [f"{'features':16s} {'target':8s} {'chance':>7s} {'occupied':>9s} {'empty':>7s}"]
  for name in ("visual tokens", "patch features"):
    for target in TARGETS:
      r = result[name][target]
      empty = f"{r['empty']:7.2f}" if "empty" in r else f"{'-':>7s}"
      lines.append(f"{name:16s} {target:8s} {result['chance'][target]:7.2f} "
                   f"{r['occupied']:9.2f} {empty}")
  return "\n".join(lines)


def main(argv):
  del argv
  config = _CONFIG.value
  if bool(_CHECKPOINT.value) == _INIT_ONLY.value:
    raise app.UsageError("give exactly one of --checkpoint and --init_only")
  if _CHECKPOINT.value and _POSEMB.value != "normal":
    raise app.UsageError("--posemb goes with --init_only (a checkpoint's position "
                         "embeddings are its own)")
  model_cfg = ModelConfig.from_config(config.model)
  mesh = sharding.make_mesh(config.sharding.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(config.sharding.logical_axis_rules)):
    if _INIT_ONLY.value:
      params = init_params(config, model_cfg, mesh, _POSEMB.value)
    else:
      params = params_lib.load_params(_CHECKPOINT.value, model_cfg, mesh, config)
    result = probe(model_cfg, params, _N.value, config.data.builtin_seed)
  print(f"held-out linear-probe accuracy ({_N.value // 4} images scored, "
        f"{model_cfg.query.num_queries} tokens each)")
  print(format_table(result))
  if _OUT.value:
    with open(_OUT.value, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  app.run(main)
