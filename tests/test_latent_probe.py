"""bench/latent_probe.py: the ridge probe reads what is there, and the tower's
position-embedding init decides whether a token says its cell."""
import jax
import numpy as np
import pytest

from bench import latent_probe
from configs import tiny
from mqt import layers
from mqt import sharding
from mqt.model import ModelConfig


def test_ridge_probe_finds_separable_classes_and_not_random_labels():
  rng = np.random.default_rng(0)
  y = rng.integers(3, size=900)
  centres = rng.normal(size=(3, 16)) * 3
  x = centres[y] + rng.normal(size=(900, 16))
  fit = np.arange(900) < 600
  assert latent_probe.probe_accuracy(x, y, fit, 3) > 0.95
  shuffled = rng.permutation(y)
  assert latent_probe.probe_accuracy(x, shuffled, fit, 3) < 0.5  # Chance: 1/3.


def test_scene_labels_put_each_object_in_its_cell():
  scenes = [latent_probe.synthetic.make_scene(0, latent_probe.PROBE_SPLIT, i, 72, kind="caption")
            for i in range(5)]
  labels = latent_probe.scene_labels(scenes, 3)
  assert list(labels["column"][0]) == [0, 1, 2] * 3 and list(labels["row"][0][::3]) == [0, 1, 2]
  for i, sc in enumerate(scenes):
    assert (labels["colour"][i] >= 0).sum() == len(sc.objects)
    for o in sc.objects:
      assert labels["shape"][i, o.row * 3 + o.col] == latent_probe.synthetic.SHAPES.index(o.shape)


def _fresh(posemb):
  config = tiny.get_config()
  # Latent j pools patch j, so that a visual token is a cell's token (the probe's labels).
  config.model.query.spatial_init, config.model.query.spatial_init_gap = True, 6.0
  cfg = ModelConfig.from_config(config.model)
  return cfg, latent_probe.init_params(config, cfg, sharding.make_mesh(config.sharding.mesh),
                                       posemb)


def test_sincos_position_embedding_is_the_2d_table_after_the_class_token():
  cfg, params = _fresh("sincos2d")
  pos = np.asarray(params["vision"]["position_embedding"])
  grid, width = cfg.vision.grid, cfg.vision.width
  assert pos.shape == (1 + grid * grid, width) and pos.dtype == np.float32
  np.testing.assert_array_equal(pos[0], 0)  # The class token's row.
  np.testing.assert_array_equal(pos[1:], layers.sincos_2d(width, grid))
  assert len({tuple(row) for row in pos[1:]}) == grid * grid  # Every patch its own code.
  _, normal = _fresh("normal")
  assert np.abs(np.asarray(normal["vision"]["position_embedding"])).max() < 0.2  # std 0.02.
  normal["vision"]["position_embedding"] = params["vision"]["position_embedding"]
  for a, b in zip(jax.tree.leaves(normal), jax.tree.leaves(params)):  # Nothing else differs.
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="unknown posemb 'learned'; known: 'normal', 'sincos2d'"):
    latent_probe.init_params(tiny.get_config(), cfg, None, "learned")


def test_sincos_position_init_puts_the_column_into_occupied_cells_tokens():
  # A random tower with CLIP's std-0.02 position embeddings: an object's token does not
  # say its column (the patch content swamps the position); sincos2d at unit scale does.
  got = {}
  for init in ("normal", "sincos2d"):
    cfg, params = _fresh(init)
    got[init] = latent_probe.probe(cfg, params, n=200)
  for feats in ("patch features", "visual tokens"):
    normal = got["normal"][feats]["column"]["occupied"]
    sincos = got["sincos2d"][feats]["column"]["occupied"]
    assert normal < 0.6 and sincos > 0.75, (feats, normal, sincos)
    assert got["normal"][feats]["shape"]["occupied"] > 0.8  # Content is readable either way.
  assert "column" in latent_probe.format_table(got["sincos2d"])


def test_probe_needs_one_latent_per_patch():
  config = tiny.get_config()
  config.model.query.num_queries = 4
  with pytest.raises(ValueError, match="M = the tower's 3x3 patches, got M = 4"):
    latent_probe.probe(ModelConfig.from_config(config.model), None, n=8)
