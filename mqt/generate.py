"""Batched generation: one prefill, then a KV-cache decode loop, in one jit.

Rows of a batch may have prompts of different lengths. Prompts are right
padded (as the model's spliced sequence already is: a contiguous valid
prefix per row), so row b's prompt fills cache slots 0 .. len_b - 1 and its
t-th new token is written at slot len_b + t - 1 (`cache_index` is one slot per
row). No left padding, no position shift: every row sees exactly what it
would see alone. Cache length = padded prompt length + max_new_tokens.

Sampling per step: greedy (temperature 0), or temperature with optional
nucleus (top-p) truncation. A row stops at its first EOS (kept in the output);
later slots hold `pad_id`. The loop ends when every row has stopped or after
`max_new_tokens`.

Entry points:
  generate_from_embeds(llm_cfg, llm_params, embeds, lengths, rng, sampling)
      the decoder alone (text-only LLM generation, parity with HF `generate`).
  generate(model, params, images, input_ids, text_mask, m, rng, sampling,
           num_latents=None)
      MQT-LLaVA: image -> m visual tokens spliced into the prompt -> decode.
  prefill(...)  the prompt pass alone (for latency measurements).
  decode_from_cache(...)  the decode loop from a filled cache (adaptive passes).
With `num_latents=m` (a Python int) the query transformer runs only m latents
and the prompt is m - 1 slots longer than the text: the compiled program, its
FLOPs and its latency shrink with m (one compile per distinct m). Without it,
all M latents run and m is data (one compile for every m, cost of M).
"""
import dataclasses

import jax
import jax.numpy as jnp

from mqt.decoder import LlamaConfig, LlamaDecoder
from mqt.model import MQTLLaVA


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  max_new_tokens: int = 32
  temperature: float = 0.0  # 0: greedy.
  top_p: float = 1.0  # Nucleus sampling mass (1: off); used when temperature > 0.
  eos_id: int = 2
  pad_id: int = 0

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_token(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """logits [B, V] float32 -> token ids [B] int32."""
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_p < 1:
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # Mass of the tokens ranked above.
    keep_sorted = before < sampling.top_p  # The top token is always kept.
    keep = jnp.zeros_like(keep_sorted).at[
        jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _prefill_mask(lengths: jax.Array, s: int, cache_len: int) -> jax.Array:
  """[B, S, cache_len]: causal over each row's valid prefix; padded rows see themselves."""
  idx = jnp.arange(s)
  valid = idx[None, :] < lengths[:, None]
  mask = (idx[None, :, None] >= idx[None, None, :]) & (valid[:, None, :] | (idx[:, None] == idx)[None])
  return jnp.pad(mask, ((0, 0), (0, 0), (0, cache_len - s)))


def llm_prefill(llm_cfg: LlamaConfig, llm_params, embeds: jax.Array, lengths: jax.Array,
                cache_len: int):
  """embeds [B, S, D] (valid prefix of lengths[b]) -> (last logits [B, V], cache)."""
  decoder = LlamaDecoder(llm_cfg)
  b, s, _ = embeds.shape
  if cache_len < s:
    raise ValueError(f"cache length {cache_len} is shorter than the prompt ({s})")
  shape = (llm_cfg.depth, b, cache_len, llm_cfg.kv_heads, llm_cfg.head_dim)
  cache = {"k": jnp.zeros(shape, llm_cfg.dtype), "v": jnp.zeros(shape, llm_cfg.dtype)}
  positions = jnp.broadcast_to(jnp.arange(s), (b, s))
  logits, cache = decoder.apply({"params": llm_params}, embeds, positions,
                                _prefill_mask(lengths, s, cache_len), cache, 0,
                                logits_at=lengths - 1)
  return logits[:, 0], cache


def decode_from_cache(llm_cfg: LlamaConfig, llm_params, first_logits, cache, lengths, rng,
                      sampling: SamplingConfig, return_logits: bool):
  """The decode loop after a prompt pass: first_logits [B, V] (at each row's last prompt
  slot), the cache it filled and the prompt lengths [B] -> `generate_from_embeds`' dict."""
  decoder = LlamaDecoder(llm_cfg)
  b = lengths.shape[0]
  n = sampling.max_new_tokens
  cache_len = cache["k"].shape[2]
  rng, key = jax.random.split(rng)
  tok = sample_token(first_logits, key, sampling)
  tokens = jnp.full((b, n), sampling.pad_id, jnp.int32).at[:, 0].set(tok)
  done = tok == sampling.eos_id
  all_logits = None
  if return_logits:
    all_logits = jnp.zeros((b, n, first_logits.shape[-1]), jnp.float32).at[:, 0].set(first_logits)

  def cond(carry):
    t, _, _, done, _, _ = carry
    return (t < n) & ~jnp.all(done)

  def body(carry):
    t, tokens, cache, done, rng, all_logits = carry
    prev = tokens[:, t - 1]
    slot = lengths + t - 1  # Where the previous token sits.
    emb = decoder.apply({"params": llm_params}, prev[:, None], method=LlamaDecoder.embed)
    mask = (jnp.arange(cache_len)[None, None, :] <= slot[:, None, None])
    logits, cache = decoder.apply({"params": llm_params}, emb, slot[:, None], mask, cache, slot)
    logits = logits[:, 0]
    rng, key = jax.random.split(rng)
    tok = sample_token(logits, key, sampling)
    tok = jnp.where(done, sampling.pad_id, tok)
    tokens = tokens.at[:, t].set(tok)
    if all_logits is not None:
      all_logits = all_logits.at[:, t].set(logits)
    return t + 1, tokens, cache, done | (tok == sampling.eos_id), rng, all_logits

  _, tokens, _, _, _, all_logits = jax.lax.while_loop(
      cond, body, (jnp.int32(1), tokens, cache, done, rng, all_logits))
  is_eos = tokens == sampling.eos_id
  first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, n)
  out = {"tokens": tokens, "num_tokens": first_eos.astype(jnp.int32)}
  if return_logits:
    out["logits"] = all_logits
  return out


def generate_from_embeds(llm_cfg: LlamaConfig, llm_params, embeds: jax.Array,
                         lengths: jax.Array, rng: jax.Array, sampling: SamplingConfig,
                         return_logits: bool = False) -> dict:
  """Prompt embeddings [B, S, D] (right padded, lengths [B] >= 1) -> new tokens.

  Returns {"tokens": [B, N] int32 (pad after EOS), "num_tokens": [B] (EOS counted),
  "logits": [B, N, V] when return_logits (rows past their EOS: unspecified)}.
  """
  lengths = jnp.asarray(lengths, jnp.int32)
  cache_len = embeds.shape[1] + sampling.max_new_tokens
  first, cache = llm_prefill(llm_cfg, llm_params, embeds, lengths, cache_len)
  return decode_from_cache(llm_cfg, llm_params, first, cache, lengths, rng, sampling,
                           return_logits)


def generate_text(llm_cfg: LlamaConfig, llm_params, input_ids: jax.Array, lengths: jax.Array,
                  rng: jax.Array, sampling: SamplingConfig, return_logits: bool = False) -> dict:
  """Text-only generation from right-padded prompt ids [B, T]."""
  emb = LlamaDecoder(llm_cfg).apply({"params": llm_params}, jnp.asarray(input_ids, jnp.int32),
                                    method=LlamaDecoder.embed)
  return generate_from_embeds(llm_cfg, llm_params, emb, lengths, rng, sampling, return_logits)


def prompt_embeds(model: MQTLLaVA, params, images, input_ids, text_mask, m,
                  num_latents: int | None = None):
  """-> (embeds [B, S, D], lengths [B]): the spliced image + prompt sequence."""
  emb, _, layout = model.apply({"params": params}, images, input_ids, text_mask, m, num_latents,
                               method=MQTLLaVA.embed_image_and_text)
  return emb, layout.valid.sum(axis=1).astype(jnp.int32)


def prefill(model: MQTLLaVA, params, images, input_ids, text_mask, m, max_new_tokens: int,
            num_latents: int | None = None):
  """The prompt pass of `generate`: -> (last logits [B, V], cache, lengths [B])."""
  emb, lengths = prompt_embeds(model, params, images, input_ids, text_mask, m, num_latents)
  first, cache = llm_prefill(model.cfg.llm, params["llm"], emb, lengths,
                             emb.shape[1] + max_new_tokens)
  return first, cache, lengths


def generate(model: MQTLLaVA, params, images, input_ids, text_mask, m, rng,
             sampling: SamplingConfig, num_latents: int | None = None,
             return_logits: bool = False) -> dict:
  """Images + right-padded prompts (one `<image>` placeholder each) -> new tokens.

  m: visual tokens per image (int, traced scalar or [B]); validate it with
  `matryoshka.validate_m` before calling (out-of-range m is clipped by the splice).
  """
  first, cache, lengths = prefill(model, params, images, input_ids, text_mask, m,
                                  sampling.max_new_tokens, num_latents)
  return decode_from_cache(model.cfg.llm, params["llm"], first, cache, lengths, rng, sampling,
                           return_logits)
