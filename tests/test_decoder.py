"""The LLaMA decoder equals HF LlamaForCausalLM; scan, remat and the KV cache agree."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mqt import convert
from mqt.decoder import LlamaDecoder
from mqt.model import attention_mask
from tests import torch_reference as ref

ATOL = 1e-4  # float32 logits of magnitude ~10.


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  model, cfg = ref.tiny_llama(seed=2)
  path = ref.save_safetensors(model.state_dict(), str(tmp_path_factory.mktemp("llama")), shards=2)
  return model, cfg, path


def _batch(vocab):
  """Two right-padded prompts of lengths 9 and 5."""
  rng = np.random.default_rng(0)
  ids = rng.integers(0, vocab, size=(2, 9))
  valid = np.arange(9)[None] < np.array([[9], [5]])
  return ids, valid


def _run(lcfg, params, ids, valid):
  dec = LlamaDecoder(lcfg)
  def f(p, ids, valid):
    emb = dec.apply({"params": p}, ids, method=LlamaDecoder.embed)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    return dec.apply({"params": p}, emb, pos, attention_mask(valid))[0]
  return np.asarray(jax.jit(f)(params, ids, valid))


@pytest.mark.parametrize("scan,remat", [(False, "none"), (True, "none"), (True, "full"),
                                        (False, "dots")])
def test_logits_match_hf(llama, scan, remat):
  model, cfg, path = llama
  lcfg = convert.llama_config_from_hf(cfg.to_dict(), scan_layers=scan, remat_policy=remat)
  params = convert.import_llama(path, lcfg)
  if scan:
    assert params["layers"]["q_proj"]["kernel"].shape[0] == cfg.num_hidden_layers
  ids, valid = _batch(cfg.vocab_size)
  with torch.no_grad():
    want = ref.to_np(model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(valid.astype(np.int64))).logits)
  got = _run(lcfg, params, ids, valid)
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(got[valid], want[valid], atol=ATOL, rtol=0)


def test_gradients_agree_with_and_without_scan_and_remat(llama):
  _, cfg, path = llama
  ids, valid = _batch(cfg.vocab_size)
  grads = []
  for scan, remat in [(False, "none"), (True, "full")]:
    lcfg = convert.llama_config_from_hf(cfg.to_dict(), scan_layers=scan, remat_policy=remat)
    params = convert.import_llama(path, lcfg)
    dec = LlamaDecoder(lcfg)
    def loss(p):
      emb = dec.apply({"params": p}, ids, method=LlamaDecoder.embed)
      pos = jnp.broadcast_to(jnp.arange(9), ids.shape)
      return jnp.mean(dec.apply({"params": p}, emb, pos, attention_mask(valid))[0] ** 2)
    g = jax.grad(loss)(params)
    grads.append(g["layers_1"]["q_proj"]["kernel"] if not scan else g["layers"]["q_proj"]["kernel"][1])
  np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_kv_cache_decoding_equals_full_forward(llama):
  _, cfg, path = llama
  for scan in (False, True):
    lcfg = convert.llama_config_from_hf(cfg.to_dict(), scan_layers=scan)
    params = convert.import_llama(path, lcfg)
    dec = LlamaDecoder(lcfg)
    ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 8))
    full = _run(lcfg, params, ids, np.ones_like(ids, bool))
    cache = dec.init_cache(2, 8)
    # Prefill 5 tokens, then decode 3 one at a time, each step against the cache.
    steps = [(0, 5), (5, 6), (6, 7), (7, 8)]
    for start, end in steps:
      emb = dec.apply({"params": params}, ids[:, start:end], method=LlamaDecoder.embed)
      pos = jnp.broadcast_to(jnp.arange(start, end), (2, end - start))
      mask = jnp.arange(8)[None, None, :] <= pos[:, :, None]
      logits, cache = dec.apply({"params": params}, emb, pos, mask, cache, start)
      np.testing.assert_allclose(np.asarray(logits), full[:, start:end], atol=ATOL, rtol=0)
