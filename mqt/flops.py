r"""Analytic FLOPs of the prefill (and of one decoded token) against m.

  python -m mqt.flops --config=configs/mqt_llava.py
  python -m mqt.flops --config=configs/tiny.py --ms=1,4,16 --text_len=64

What is counted: matrix products only, a multiply-add as 2 FLOPs (the patch
convolution, every dense projection, attention scores QK^T and values AV,
the LLM head, and the bicubic resize of the latents' position table that the
query transformer runs on every call). Not counted: elementwise work
(norms, softmax, activations, RoPE, masks, residual adds), gathers and the
splice. XLA's cost analysis counts those too (one FLOP per element and op),
so its total is higher: by 3-4% on configs/tiny.py and by 0.5-1.3% on
configs/mqt_llava.py (compiled on CPU with the LLM layers unrolled), while the
dot and convolution FLOPs of the compiled HLO equal these counts exactly
(tests/test_flops.py). XLA counts the body of a while loop once, so a model
with `scan_layers=True` (configs/mqt_llava.py) reports one LLM layer's FLOPs
instead of `depth`: use these counts there, not the cost analysis.

Counts follow the compiled program of `mqt.generate.prefill` with
`num_latents=m` (a Python int: the sliced program, one compile per m):

  vision   patch conv over P patches, then `layers_used` pre-LN blocks over
           P + 1 tokens (the class token is in the sequence even when the
           features drop it).
  query    official: q_proj over the m latents and k_proj over the P
           position-only keys run once per call (they do not depend on the
           image, and the program does not broadcast them before projecting);
           v_proj over the P features, attention m x P, out_proj and `proj`
           to the LLM width run per image.
           perceiver: in_proj over P, then per block cross-attention (q over
           m, k/v over P, m x P scores), latent self-attention m x m (all m x m
           scores are computed, the prefix mask only hides some), an MLP, and
           the final `proj`. All per image.
  llm      the decoder over S = T + m - 1 prompt slots. The cache is written
           before attention, so each prompt slot attends over the whole cache
           of S + max_new_tokens slots (masked, but computed); lm_head runs at
           one position per row (`logits_at`).
  decode   one decoded token: projections and MLP for one position, attention
           over the full cache (the compiled loop does not shrink it with the
           context), and lm_head.

Grouped-query attention is counted with the real query heads (each of the N
query heads meets its shared key/value head: 2*N*H FLOPs per score).
"""
import math
from typing import Sequence

import ml_collections
from absl import app
from absl import flags
from ml_collections import config_flags

from mqt import cli
from mqt.decoder import LlamaConfig
from mqt.matryoshka import validate_m
from mqt.model import ModelConfig
from mqt.query_transformer import QueryConfig
from mqt.vision import VisionConfig

PAPER_MS = (36, 64, 144)  # The paper's sweep, beside the powers of 2.


def _dense(rows: int, d_in: int, d_out: int) -> int:
  return 2 * rows * d_in * d_out


def _attention(q_len: int, k_len: int, heads: int, head_dim: int) -> int:
  """QK^T and AV for one example: 2 products of 2*T*S*N*H each."""
  return 2 * 2 * q_len * k_len * heads * head_dim


def num_patches(v: VisionConfig) -> int:
  return v.grid * v.grid


def vision_flops(v: VisionConfig, batch: int = 1) -> int:
  """Patch conv + the `layers_used` blocks over P + 1 tokens."""
  p = num_patches(v)
  t = p + 1
  conv = _dense(p, v.patch_size * v.patch_size * v.channels, v.width)
  block = (4 * _dense(t, v.width, v.width) + _attention(t, t, v.heads, v.width // v.heads)
           + _dense(t, v.width, v.mlp_dim) + _dense(t, v.mlp_dim, v.width))
  return batch * (conv + v.layers_used * block)


def _resize_flops(q: QueryConfig, side: int) -> int:
  """The bicubic resize of the [M, D] position table to the P patch grid (an einsum over
  both axes, contracted one axis at a time)."""
  g = q.grid
  return 2 * side * g * g * q.width + 2 * side * side * g * q.width


def query_flops(q: QueryConfig, feature_dim: int, patches: int, n: int,
                batch: int = 1) -> int:
  """The query transformer running n latents (`num_latents=n`) over P patch features."""
  side = math.isqrt(patches)
  if side * side != patches:
    raise ValueError(f"the query transformer needs a square patch grid, got P={patches}")
  w, hd = q.width, q.width // q.heads
  shared = _resize_flops(q, side)
  if q.variant == "official":
    shared += _dense(n, w, w) + _dense(patches, w, w)  # q_proj, k_proj: once per call.
    per_image = (_dense(patches, feature_dim, w) + _attention(n, patches, q.heads, hd)
                 + _dense(n, w, w) + _dense(n, w, q.out_dim))
  elif q.variant == "perceiver":
    block = (2 * _dense(n, w, w) + 2 * _dense(patches, w, w)  # cross q/out; cross k/v.
             + _attention(n, patches, q.heads, hd)
             + 4 * _dense(n, w, w) + _attention(n, n, q.heads, hd)  # latent self-attention.
             + _dense(n, w, q.mlp_dim) + _dense(n, q.mlp_dim, w))
    per_image = (_dense(patches, feature_dim, w) + q.depth * block
                 + _dense(n, w, q.out_dim))
  else:
    raise ValueError(f"unknown query transformer variant {q.variant!r}")
  return shared + batch * per_image


def _llm_layers(c: LlamaConfig, rows: int, cache_len: int) -> int:
  qd, kvd = c.heads * c.head_dim, c.kv_heads * c.head_dim
  layer = (_dense(rows, c.width, qd) + 2 * _dense(rows, c.width, kvd)
           + _attention(rows, cache_len, c.heads, c.head_dim) + _dense(rows, qd, c.width)
           + 3 * _dense(rows, c.width, c.mlp_dim))
  return c.depth * layer


def llm_prefill_flops(c: LlamaConfig, seq_len: int, cache_len: int, batch: int = 1) -> int:
  """The prompt pass over S slots attending over a cache of `cache_len`, head at one row."""
  return batch * (_llm_layers(c, seq_len, cache_len) + _dense(1, c.width, c.vocab_size))


def llm_decode_flops(c: LlamaConfig, cache_len: int, batch: int = 1) -> int:
  """One decoded token per row, attending over the whole cache of `cache_len` slots."""
  return llm_prefill_flops(c, 1, cache_len, batch)


def _model_config(cfg) -> ModelConfig:
  if isinstance(cfg, ModelConfig):
    return cfg
  if isinstance(cfg, ml_collections.ConfigDict):
    return ModelConfig.from_config(cfg)
  raise TypeError(f"expected a ModelConfig or config.model, got {type(cfg).__name__}")


def flops_per_m(model_cfg, text_len: int, m: int, max_new_tokens: int = 32,
                batch: int = 1) -> dict:
  """Analytic FLOPs of `generate.prefill(..., num_latents=m)` and of one decoded token.

  model_cfg: a ModelConfig or a `config.model` ConfigDict. text_len: T, prompt
  tokens including the `<image>` placeholder. Returns ints: vision, query,
  llm_prefill, prefill (their sum), llm_decode_per_token; and the sizes used:
  seq_len (S = T + m - 1) and cache_len (S + max_new_tokens).
  """
  cfg = _model_config(model_cfg)
  m = validate_m(m, cfg.query.num_queries)
  if text_len < 1:
    raise ValueError(f"text_len must be >= 1 (the <image> placeholder), got {text_len}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  seq_len = text_len + m - 1
  cache_len = seq_len + max_new_tokens
  patches = num_patches(cfg.vision) + (1 if cfg.vision.keep_cls else 0)
  out = {
      "vision": vision_flops(cfg.vision, batch),
      "query": query_flops(cfg.query, cfg.vision.width, patches, m, batch),
      "llm_prefill": llm_prefill_flops(cfg.llm, seq_len, cache_len, batch),
  }
  out["prefill"] = out["vision"] + out["query"] + out["llm_prefill"]
  out["llm_decode_per_token"] = llm_decode_flops(cfg.llm, cache_len, batch)
  out["seq_len"], out["cache_len"] = seq_len, cache_len
  return out


def default_ms(num_queries: int) -> tuple[int, ...]:
  """Powers of 2 below M, the paper's 36/64/144 where they fit, and M."""
  ms = {1 << k for k in range(num_queries.bit_length()) if 1 << k <= num_queries}
  ms |= {m for m in PAPER_MS if m <= num_queries}
  ms.add(num_queries)
  return tuple(sorted(ms))


def flops_table(model_cfg, text_len: int, ms: Sequence[int] | None = None,
                max_new_tokens: int = 32) -> str:
  """A text table per m (one image, one prompt): vision, query, LLM prefill and total
  prefill, one decoded token, and total prefill over that at m = M. GFLOPs, or MFLOPs
  when the whole prefill at M is under 1 GFLOP."""
  cfg = _model_config(model_cfg)
  big_m = cfg.query.num_queries
  ms = tuple(ms) if ms else default_ms(big_m)
  rows = {m: flops_per_m(cfg, text_len, m, max_new_tokens) for m in ms}
  full = flops_per_m(cfg, text_len, big_m, max_new_tokens)["prefill"]
  unit, scale = ("GFLOPs", 1e9) if full >= 1e9 else ("MFLOPs", 1e6)
  lines = [f"{unit}; prefill/M = prefill(m) / prefill(M={big_m})",
           f"{'m':>5}{'S':>6}{'vision':>10}{'query':>9}{'llm pre':>10}{'prefill':>10}"
           f"{'decode/tok':>12}{'prefill/M':>11}"]
  for m, r in rows.items():
    g = lambda k: r[k] / scale
    lines.append(f"{m:>5}{r['seq_len']:>6}{g('vision'):>10.2f}{g('query'):>9.3f}"
                 f"{g('llm_prefill'):>10.2f}{g('prefill'):>10.2f}"
                 f"{g('llm_decode_per_token'):>12.3f}{r['prefill'] / full:>11.3f}")
  return "\n".join(lines)


def report(model_cfg, ms: Sequence[int] | None = None, text_len: int = 64,
           max_new_tokens: int = 32) -> str:
  """The CLI's output: a header naming the shapes, then `flops_table`."""
  cfg = _model_config(model_cfg)
  v, q, llm = cfg.vision, cfg.query, cfg.llm
  head = (f"vision {v.image_size}px/{v.patch_size} (P={num_patches(v)}, {v.layers_used} of "
          f"{v.depth} blocks, width {v.width}); query {q.variant} M={q.num_queries}; "
          f"llm width {llm.width} x {llm.depth} layers\n"
          f"FLOPs per image (matmuls only, multiply-add = 2), T={text_len} text tokens, "
          f"S = T + m - 1 prompt slots, cache = S + {max_new_tokens}")
  return head + "\n" + flops_table(cfg, text_len, ms, max_new_tokens)


def _define_flags():
  """CLI flags, defined only when this module is the program (importers keep theirs)."""
  config_flags.DEFINE_config_file("config", "configs/mqt_llava.py",
                                  "Config file (get_config(arg)).")
  flags.DEFINE_list("ms", [], "Values of m (default: powers of 2, 36, 64, 144 and M).")
  flags.DEFINE_integer("text_len", 64, "Prompt tokens T, <image> placeholder included.")
  flags.DEFINE_integer("max_new_tokens", 32, "Decode budget (sets the cache length).")


def main(argv):
  cli.start(argv)
  f = flags.FLAGS
  try:
    ms = [int(x) for x in f.ms]
  except ValueError:
    raise SystemExit(f"--ms must be integers, got {f.ms}") from None
  cfg = ModelConfig.from_config(f.config.model)
  try:
    for m in ms:
      validate_m(m, cfg.query.num_queries)
  except ValueError as e:
    raise SystemExit(f"--ms: {e}") from None
  print(report(cfg, ms or None, f.text_len, f.max_new_tokens))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
