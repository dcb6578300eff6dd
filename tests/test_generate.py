"""Batched KV-cache generation equals HF `generate` and full forwards; sampling rules."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mqt import convert
from mqt import generate as gen
from mqt.decoder import LlamaDecoder
from mqt.model import MQTLLaVA, ModelConfig, attention_mask
from mqt.query_transformer import QueryConfig
from mqt.decoder import LlamaConfig
from mqt.vision import VisionConfig
from tests import torch_reference as ref

ATOL = 1e-4  # float32 logits of magnitude ~10.
LENGTHS = (7, 3, 10)  # Prompts of different lengths in one batch.
NEW = 12


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  model, cfg = ref.tiny_llama(seed=3, vocab=61)
  model.generation_config.eos_token_id = None
  path = ref.save_safetensors(model.state_dict(), str(tmp_path_factory.mktemp("llama")))
  lcfg = convert.llama_config_from_hf(cfg.to_dict())
  return model, cfg, lcfg, convert.import_llama(path, lcfg)


def _prompts(vocab):
  rng = np.random.default_rng(5)
  rows = [rng.integers(3, vocab, size=n) for n in LENGTHS]
  ids = np.zeros((len(rows), max(LENGTHS)), np.int64)
  for i, r in enumerate(rows):
    ids[i, :len(r)] = r
  return rows, ids


def _hf_greedy(model, rows, eos):
  """HF greedy search per row (no padding at all), and batched with left padding."""
  alone = []
  for r in rows:
    with torch.no_grad():
      out = model.generate(input_ids=torch.tensor(r)[None], attention_mask=torch.ones(1, len(r),
                           dtype=torch.long), max_new_tokens=NEW, do_sample=False,
                           eos_token_id=eos, pad_token_id=0)
    alone.append(out[0, len(r):].numpy())
  width = max(len(r) for r in rows)
  left = np.zeros((len(rows), width), np.int64)
  mask = np.zeros_like(left)
  for i, r in enumerate(rows):
    left[i, width - len(r):], mask[i, width - len(r):] = r, 1
  with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(left), attention_mask=torch.tensor(mask),
                         max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=0)
  return alone, out[:, width:].numpy()


def _ours(lcfg, params, ids, eos, return_logits=False):
  sampling = gen.SamplingConfig(max_new_tokens=NEW, eos_id=eos, pad_id=0)
  fn = jax.jit(lambda p, ids, n: gen.generate_text(lcfg, p, ids, n, jax.random.key(0), sampling,
                                                   return_logits))
  return jax.tree.map(np.asarray, fn(params, ids, np.array(LENGTHS)))


def _pad_hf(tokens, eos):
  """HF output of one row -> our [NEW] layout (pad 0 after the first EOS)."""
  out = np.zeros(NEW, np.int64)
  out[:len(tokens)] = tokens
  hit = np.flatnonzero(out == eos) if eos is not None else []
  if len(hit):
    out[hit[0] + 1:] = 0
  return out


def test_greedy_equals_hf_generate_without_eos(llama):
  model, cfg, lcfg, params = llama
  rows, ids = _prompts(cfg.vocab_size)
  alone, batched = _hf_greedy(model, rows, eos=None)
  ours = _ours(lcfg, params, ids, eos=-1)  # -1: never produced.
  assert len({tuple(a) for a in alone}) == len(rows)  # The rows really differ.
  for b in range(len(rows)):
    np.testing.assert_array_equal(ours["tokens"][b], alone[b])
    np.testing.assert_array_equal(ours["tokens"][b], batched[b])
  np.testing.assert_array_equal(ours["num_tokens"], [NEW] * len(rows))


def test_greedy_stops_at_eos_like_hf(llama):
  model, cfg, lcfg, params = llama
  rows, ids = _prompts(cfg.vocab_size)
  free, _ = _hf_greedy(model, rows, eos=None)
  eos = int(free[1][3])  # Row 1 emits it at step 3: it must stop there, others may later.
  alone, batched = _hf_greedy(model, rows, eos=eos)
  ours = _ours(lcfg, params, ids, eos=eos)
  first = [int(np.flatnonzero(np.r_[f, eos] == eos)[0]) for f in free]
  assert first[1] == 3
  for b in range(len(rows)):
    np.testing.assert_array_equal(ours["tokens"][b], _pad_hf(alone[b], eos))
    np.testing.assert_array_equal(ours["tokens"][b][:len(batched[b])],
                                  _pad_hf(batched[b], eos)[:len(batched[b])])
    assert ours["num_tokens"][b] == min(first[b] + 1, NEW)


def test_cached_logits_equal_full_forward_each_step(llama):
  model, cfg, lcfg, params = llama
  rows, ids = _prompts(cfg.vocab_size)
  ours = _ours(lcfg, params, ids, eos=-1, return_logits=True)
  dec = LlamaDecoder(lcfg)
  full_fn = jax.jit(lambda p, ids, valid: dec.apply(
      {"params": p}, dec.apply({"params": p}, ids, method=LlamaDecoder.embed),
      jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape), attention_mask(valid))[0])
  for b, r in enumerate(rows):
    seq = np.concatenate([r, ours["tokens"][b]])[None]
    full = np.asarray(full_fn(params, seq, np.ones_like(seq, bool)))[0]
    with torch.no_grad():
      hf = ref.to_np(model(input_ids=torch.tensor(seq)).logits)[0]
    for t in range(NEW):  # Logits for new token t come from position len(r) - 1 + t.
      np.testing.assert_allclose(ours["logits"][b, t], full[len(r) - 1 + t], atol=ATOL, rtol=0)
      np.testing.assert_allclose(ours["logits"][b, t], hf[len(r) - 1 + t], atol=ATOL, rtol=0)


def test_scan_layers_generate_the_same(llama):
  model, cfg, lcfg, params = llama
  _, ids = _prompts(cfg.vocab_size)
  scan_cfg = convert.llama_config_from_hf(cfg.to_dict(), scan_layers=True)
  stacked = {**{k: v for k, v in params.items() if not k.startswith("layers_")},
             "layers": jax.tree.map(lambda *a: jnp.stack(a),
                                    *[params[f"layers_{i}"] for i in range(lcfg.depth)])}
  np.testing.assert_array_equal(_ours(scan_cfg, stacked, ids, eos=-1)["tokens"],
                                _ours(lcfg, params, ids, eos=-1)["tokens"])


def test_sampling_frequencies_follow_temperature_and_top_p():
  probs = np.array([0.4, 0.3, 0.2, 0.1])
  logits = jnp.asarray(np.log(probs), jnp.float32)[None].repeat(20000, axis=0)
  key = jax.random.key(7)
  def freq(**kw):
    tok = gen.sample_token(logits, key, gen.SamplingConfig(**kw))
    return np.bincount(np.asarray(tok), minlength=4) / logits.shape[0]
  # Temperature 1: the softmax itself (3 sigma of a 20k-sample frequency < 0.011).
  np.testing.assert_allclose(freq(temperature=1.0), probs, atol=0.011)
  # Temperature 0.5 squares and renormalizes the probabilities.
  np.testing.assert_allclose(freq(temperature=0.5), probs ** 2 / (probs ** 2).sum(), atol=0.011)
  # top-p 0.5: tokens whose higher-ranked mass is < 0.5 survive: {0 (0.0), 1 (0.4)}.
  np.testing.assert_allclose(freq(temperature=1.0, top_p=0.5), [4 / 7, 3 / 7, 0, 0], atol=0.011)
  # A tiny top-p keeps the top token only: greedy.
  np.testing.assert_array_equal(freq(temperature=1.0, top_p=1e-6), [1, 0, 0, 0])
  np.testing.assert_array_equal(freq(temperature=0.0), [1, 0, 0, 0])


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0),
                                 dict(top_p=0.0), dict(top_p=1.5)])
def test_sampling_config_rejects_bad_values(bad):
  with pytest.raises(ValueError, match=next(iter(bad))):
    gen.SamplingConfig(**bad)


def _tiny_mqt(variant):
  cfg = ModelConfig(
      vision=VisionConfig(image_size=16, patch_size=4, width=32, depth=2, heads=4, mlp_dim=64),
      query=QueryConfig(variant=variant, num_queries=9, width=32, heads=4, out_dim=48, depth=1,
                        mlp_dim=64),
      llm=LlamaConfig(vocab_size=53, width=48, depth=2, heads=4, kv_heads=2, head_dim=12,
                      mlp_dim=96))
  model = MQTLLaVA(cfg)
  images = jax.random.normal(jax.random.key(1), (3, 16, 16, 3))
  rng = np.random.default_rng(2)
  ids = rng.integers(3, 53, size=(3, 8)).astype(np.int32)
  ids[:, 1] = cfg.image_token_id
  text_mask = np.arange(8)[None] < np.array([[8], [4], [6]])
  params = model.init(jax.random.key(0), images, ids, text_mask, 9)["params"]
  params = jax.tree.map(lambda x: x * 3.0, params)  # Sharper logits: no near-ties.
  return model, params, images, ids, text_mask


@pytest.mark.parametrize("variant", ["official", "perceiver"])
def test_mqt_generation_masked_equals_sliced_and_full_forward(variant):
  model, params, images, ids, text_mask = _tiny_mqt(variant)
  sampling = gen.SamplingConfig(max_new_tokens=6, eos_id=-1)
  run = jax.jit(lambda p, m, n: gen.generate(model, p, images, ids, text_mask, m,
                                             jax.random.key(0), sampling, num_latents=n,
                                             return_logits=True), static_argnums=2)
  forward = jax.jit(lambda p, seq, mask, m: model.apply({"params": p}, images, seq, mask, m)[0])
  for m in (2, 9):  # A prefix and all M (each m compiles three programs).
    sliced, masked = run(params, m, m), run(params, m, None)
    np.testing.assert_array_equal(sliced["tokens"], masked["tokens"])
    scale = float(np.abs(masked["logits"]).max())  # ~25 with the x3 weights.
    tol = 1e-4 * scale  # float32 summation order differs between the three programs.
    np.testing.assert_allclose(sliced["logits"], masked["logits"], atol=tol, rtol=0)
    # Teacher-forced full forward over prompt + generated tokens gives the same logits.
    n = text_mask.sum(1)
    seq = np.zeros((3, 8 + 6), np.int32)
    full_mask = np.zeros_like(seq, bool)
    for b in range(3):
      seq[b, :n[b]] = ids[b, :n[b]]
      seq[b, n[b]:n[b] + 6] = np.asarray(sliced["tokens"][b])
      full_mask[b, :n[b] + 6] = True
    logits = forward(params, seq, full_mask, m)
    for b in range(3):
      start = n[b] - 1 + m - 1  # Last prompt slot in the spliced sequence.
      np.testing.assert_allclose(sliced["logits"][b], np.asarray(logits)[b, start:start + 6],
                                 atol=tol, rtol=0)
