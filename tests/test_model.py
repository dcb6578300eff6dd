"""Whole-model parity with a PyTorch MQT-LLaVA, masked == sliced, one compile for all m."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn

from configs import tiny
from mqt import convert
from bench.common import count_compiles
from mqt.model import IGNORE, MQTLLaVA, ModelConfig, next_token_loss, text_slots
from mqt.query_transformer import QueryConfig
from tests import torch_reference as ref

IMG = ref.IMAGE
M = 16
ATOL = 1e-4  # float32 logits of magnitude ~10 after three stacked models.


def _prompts(vocab, rng):
  """Three prompts of different lengths, the placeholder at different places."""
  specs = [(1, 6), (3, 9), (2, 4)]  # (placeholder index, length)
  ids, labels = [], []
  for p, n in specs:
    x = rng.integers(1, vocab, size=n)
    x[p] = IMG
    y = x.copy()
    y[: p + 2] = IGNORE  # Prompt unlabelled, the rest is the "answer".
    ids.append(x)
    labels.append(y)
  return ids, labels


def _pad(rows, t, fill):
  out = np.full((len(rows), t), fill, np.int64)
  for b, r in enumerate(rows):
    out[b, :len(r)] = r
  return out


@pytest.fixture(scope="module")
def tiny_mqt_llava(tmp_path_factory):
  clip, clip_cfg = ref.tiny_clip(seed=4)
  llm, llm_cfg = ref.tiny_llama(seed=5)
  torch.manual_seed(6)
  query = ref.randomize_(ref.RefQueryTransformer(clip_cfg.hidden_size, 4, llm_cfg.hidden_size, M),
                         seed=6)
  model = ref.RefMQTLLaVA(clip, query, llm).eval()
  state = ref.released_state(clip, query, llm)
  path = ref.save_safetensors(state, str(tmp_path_factory.mktemp("mqt_llava")), shards=3)
  cfg = ModelConfig(
      vision=convert.vision_config_from_hf(clip_cfg.to_dict()),
      query=QueryConfig(variant="official", num_queries=M, width=clip_cfg.hidden_size, heads=4,
                        out_dim=llm_cfg.hidden_size),
      llm=convert.llama_config_from_hf(llm_cfg.to_dict()))
  return model, cfg, path


def test_whole_model_matches_pytorch(tiny_mqt_llava):
  torch_model, cfg, path = tiny_mqt_llava
  params = convert.import_mqt_llava(path, cfg)
  rng = np.random.default_rng(0)
  ids, labels = _prompts(cfg.llm.vocab_size, rng)
  t = max(len(x) for x in ids)
  ids_np, labels_np = _pad(ids, t, 0), _pad(labels, t, IGNORE)
  mask_np = _pad([np.ones(len(x)) for x in ids], t, 0).astype(bool)
  size = cfg.vision.image_size
  pixels = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
  model = MQTLLaVA(cfg)

  @jax.jit
  def run(params, m):
    logits, layout = model.apply({"params": params}, pixels.permute(0, 2, 3, 1).numpy(),
                                 ids_np, mask_np, m)
    return logits, next_token_loss(logits, layout, labels_np)[0]

  for m in (1, 5, M):
    with torch.no_grad():
      want, want_loss, offsets = torch_model(pixels, [torch.tensor(x) for x in ids],
                                             [torch.tensor(y) for y in labels], m)
    logits, loss = run(params, jnp.int32(m))
    slots = np.asarray(text_slots(ids_np, mask_np, m, cfg.image_token_id))
    compared = 0
    for b in range(3):
      for i, off in enumerate(offsets[b]):
        assert (off is None) == (slots[b, i] < 0)
        if off is not None:
          assert slots[b, i] == off
          np.testing.assert_allclose(np.asarray(logits[b, off]), ref.to_np(want[b, off]),
                                     atol=ATOL, rtol=0, err_msg=f"m={m} b={b} t={i}")
          compared += 1
    assert compared == sum(len(x) - 1 for x in ids)
    np.testing.assert_allclose(float(loss), float(want_loss), atol=1e-5, rtol=1e-5)
    assert np.abs(ref.to_np(want)).max() > 1.0


def test_missing_vision_tower_needs_clip_path(tiny_mqt_llava, tmp_path):
  _, cfg, path = tiny_mqt_llava
  from mqt.checkpoint_io import CheckpointError, TensorSource
  src = TensorSource(path)
  keep = {k: torch.from_numpy(np.array(src.get(k))) for k in src.keys()
          if not k.startswith("model.vision_tower.")}
  ref.save_safetensors(keep, str(tmp_path / "no_clip"))
  with pytest.raises(CheckpointError, match="holds no vision tower"):
    convert.import_mqt_llava(str(tmp_path / "no_clip"), cfg)
  clip = {k[len("model.vision_tower.vision_tower."):]: torch.from_numpy(np.array(src.get(k)))
          for k in src.keys() if k.startswith("model.vision_tower.")}
  ref.save_safetensors(clip, str(tmp_path / "clip"))
  a = convert.import_mqt_llava(path, cfg)
  b = convert.import_mqt_llava(str(tmp_path / "no_clip"), cfg, clip_path=str(tmp_path / "clip"))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


# ---------------------------------------------------------------------------
# Masked equals sliced, for every variant.

def _variant_cfg(variant, latent_attention="prefix"):
  cfg = ModelConfig.from_config(tiny.get_config(f"variant={variant}").model)
  return dataclasses.replace(cfg, query=dataclasses.replace(cfg.query,
                                                            latent_attention=latent_attention))


def _batch(cfg, rng):
  t = 10
  ids = rng.integers(1, cfg.llm.vocab_size, size=(3, t)).astype(np.int32)
  ids[0, 0] = ids[1, 4] = cfg.image_token_id  # Row 2 is text-only.
  mask = np.arange(t)[None] < np.array([[7], [10], [6]])
  size = cfg.vision.image_size
  images = rng.normal(size=(3, size, size, 3)).astype(np.float32)
  return images, ids, mask


@pytest.mark.parametrize("variant,latent_attention", [("official", "prefix"),
                                                      ("perceiver", "prefix"),
                                                      ("perceiver", "causal")])
def test_masked_equals_sliced(variant, latent_attention):
  cfg = _variant_cfg(variant, latent_attention)
  big_m = cfg.query.num_queries
  rng = np.random.default_rng(0)
  images, ids, mask = _batch(cfg, rng)
  model = MQTLLaVA(cfg)
  params = nn.unbox(model.init(jax.random.key(0), images, ids, mask, big_m))["params"]
  masked = jax.jit(lambda p, m: model.apply({"params": p}, images, ids, mask, m)[0])
  with count_compiles() as first:
    masked(params, jnp.int32(1)).block_until_ready()
  assert first() >= 1
  ms = (1, 3, big_m - 1, big_m)
  with count_compiles() as compiles:
    outs = {m: np.asarray(masked(params, jnp.int32(m))) for m in ms}
  assert compiles() == 0  # Every m reused the first compilation.
  for m in ms:
    sliced = np.asarray(model.apply({"params": params}, images, ids, mask, m, num_latents=m)[0])
    # Only m visual slots precede the text in the sliced run, so each text
    # token sits in the same slot in both runs.
    slots = np.asarray(text_slots(ids, mask, m, cfg.image_token_id))
    for b in range(3):
      for i in np.nonzero(slots[b] >= 0)[0]:
        np.testing.assert_allclose(outs[m][b, slots[b, i]], sliced[b, slots[b, i]],
                                   atol=2e-5, rtol=0, err_msg=f"m={m} b={b} t={i}")


def test_text_only_row_equals_plain_llm():
  cfg = _variant_cfg("official")
  rng = np.random.default_rng(1)
  images, ids, mask = _batch(cfg, rng)
  model = MQTLLaVA(cfg)
  params = nn.unbox(model.init(jax.random.key(0), images, ids, mask, 4))["params"]
  logits, layout = model.apply({"params": params}, images, ids, mask, 4)
  from mqt.decoder import LlamaDecoder
  from mqt.model import attention_mask
  dec = LlamaDecoder(cfg.llm)
  emb = dec.apply({"params": params["llm"]}, ids[2:], method=LlamaDecoder.embed)
  pos = jnp.arange(ids.shape[1])[None]
  plain, _ = dec.apply({"params": params["llm"]}, emb, pos, attention_mask(jnp.asarray(mask[2:])))
  n = mask[2].sum()
  np.testing.assert_allclose(logits[2, :n], plain[0, :n], atol=1e-5, rtol=0)
  assert int(layout.valid[2].sum()) == n


def test_per_example_m_matches_single_runs():
  cfg = _variant_cfg("perceiver")
  rng = np.random.default_rng(2)
  images, ids, mask = _batch(cfg, rng)
  model = MQTLLaVA(cfg)
  params = nn.unbox(model.init(jax.random.key(0), images, ids, mask, 4))["params"]
  ms = jnp.array([2, 9, 5])
  logits, layout = model.apply({"params": params}, images, ids, mask, ms)
  for b in range(3):
    single, lay = model.apply({"params": params}, images[b:b + 1], ids[b:b + 1], mask[b:b + 1],
                              int(ms[b]))
    n = int(lay.valid[0].sum())
    np.testing.assert_allclose(logits[b, :n], single[0, :n], atol=2e-5, rtol=0)
