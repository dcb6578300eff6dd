"""Per-image adaptive m: policies that choose how many visual tokens each question gets,
their FLOPs accounting, and the passes they run.

Policies (bench/adaptive.py evaluates them against the fixed-m curve):
  cascade    answer at the smallest m of a ladder (e.g. 1 -> 4 -> M); while the answer's
             confidence (`confidence`: the min, mean or first probability of the generated
             tokens) is below a threshold, answer again at the next m.
  predictor  a multinomial logistic regression (`fit_predictor`) on cheap features (the
             tower's pooled output, the question's tokens, optionally the m = 1 pass's
             confidence) predicting the smallest ladder m whose answer is right; it takes
             the smallest m whose predicted probability of sufficing reaches a threshold.

Passes (`Passes`): the tower runs once per image (`features`); every pass reads its
output. `full` runs the query transformer and the LLM's whole prompt again at m (the
answers of `gen.generate` at that m: the tower's call is replaced by the cached features,
nothing else changes). `extend` keeps the LLM's cache between passes: the text before
the image is computed once, and where the first latents do not change with m (the
official query transformer, whose latents never see each other, and the `causal`
perceiver) so are the KV entries of the visual tokens an earlier pass already wrote, so a
later pass prefills only the new visual tokens and the text after the image.

FLOPs (`passes_flops`, per sample, the conventions of mqt/flops.py): the tower once, then
per pass the query transformer (the new latents only where the earlier ones are
reusable: query(m) - query(m_prev), the parts that do not depend on m counted once), the
LLM prompt (all of it; with the cache kept, the rows that pass writes) and one decode
step per generated token (as `budget.sample_flops`, which counts max_new_tokens of
them). The query transformer here recomputes the earlier latents from the cached
features (they come out the same); the count is that of a pass keeping them, a
difference of at most query(M) per pass.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from mqt import budget
from mqt import flops as flops_lib
from mqt import generate as gen
from mqt import matryoshka
from mqt.decoder import LlamaDecoder
from mqt.model import ModelConfig
from mqt.vision import VisionTower

CONFIDENCE = ("min", "mean", "first")


# ---------------------------------------------------------------------------
# FLOPs accounting.

def reuses_latents(query_cfg) -> bool:
  """Whether the first latents' outputs stay the same when m grows (official: latents
  never see each other; perceiver with causal latent attention)."""
  return query_cfg.variant == "official" or (
      query_cfg.variant == "perceiver" and query_cfg.latent_attention == "causal")


def single_pass_flops(model_cfg, m: int, text_len: int, max_new_tokens: int,
                      new_tokens: int) -> int:
  """One generation at m (tower included) that produced new_tokens tokens:
  `budget.sample_flops` less the decode steps it did not run."""
  _check_tokens(new_tokens, max_new_tokens)
  per = flops_lib.flops_per_m(model_cfg, text_len, m, max_new_tokens)["llm_decode_per_token"]
  return (budget.sample_flops(model_cfg, m, text_len, max_new_tokens)
          - (max_new_tokens - new_tokens) * per)


def passes_flops(model_cfg, ms, new_tokens, text_len: int, before: int, max_new_tokens: int,
                 keep_cache: bool = False, top_m: int | None = None) -> int:
  """FLOPs of one sample answered by passes at ms (increasing), the tower run once.

  text_len: prompt tokens T (placeholder included); before: text tokens before the
  placeholder. keep_cache: the passes of `Passes.extend`, whose cache holds T + top_m - 1
  + max_new_tokens slots (top_m: the ladder's largest m)."""
  ms, new_tokens = [int(m) for m in ms], [int(n) for n in new_tokens]
  if not ms or len(ms) != len(new_tokens) or any(b <= a for a, b in zip(ms, ms[1:])):
    raise ValueError(f"passes need increasing m with one token count each; got m={ms}, "
                     f"new tokens={new_tokens}")
  if not 0 <= before < text_len:
    raise ValueError(f"{before} text tokens before the image do not fit a {text_len}-token "
                     f"prompt")
  cfg = model_cfg if isinstance(model_cfg, ModelConfig) else ModelConfig.from_config(model_cfg)
  c, reuse = cfg.llm, reuses_latents(cfg.query)
  per_m = lambda m: flops_lib.flops_per_m(cfg, text_len, m, max_new_tokens)
  if keep_cache:
    top_m = top_m or ms[-1]
    if top_m < ms[-1]:
      raise ValueError(f"top_m={top_m} is below the largest pass m={ms[-1]}")
    cache = text_len + top_m - 1 + max_new_tokens
  total = per_m(ms[0])["vision"]
  for i, (m, n) in enumerate(zip(ms, new_tokens)):
    _check_tokens(n, max_new_tokens)
    f = per_m(m)
    total += f["query"] - (per_m(ms[i - 1])["query"] if i and reuse else 0)
    if not keep_cache:
      total += f["llm_prefill"] + n * f["llm_decode_per_token"]
      continue
    if i == 0:
      rows = text_len + m - 1
    else:
      rows = (m - ms[i - 1] if reuse else m) + text_len - 1 - before
    total += (flops_lib.llm_prefill_flops(c, rows, cache)
              + n * flops_lib.llm_decode_flops(c, cache))
  return int(total)


def _check_tokens(n: int, max_new_tokens: int) -> None:
  if not 1 <= n <= max_new_tokens:
    raise ValueError(f"a pass generates 1..{max_new_tokens} tokens, not {n}")


# ---------------------------------------------------------------------------
# Confidence of a generated answer.

def confidence(probs: np.ndarray, num_tokens: np.ndarray, kind: str = "min") -> np.ndarray:
  """probs [rows, N] (each generated token's probability), num_tokens [rows] -> [rows]:
  the min, mean or first of the probabilities of the tokens generated (EOS included)."""
  if kind not in CONFIDENCE:
    raise ValueError(f"unknown confidence {kind!r}; choose one of {CONFIDENCE}")
  probs = np.asarray(probs, np.float64)
  valid = np.arange(probs.shape[1])[None] < np.asarray(num_tokens)[:, None]
  if kind == "first":
    return probs[:, 0]
  if kind == "min":
    return np.where(valid, probs, np.inf).min(axis=1)
  return np.where(valid, probs, 0).sum(axis=1) / valid.sum(axis=1)


# ---------------------------------------------------------------------------
# Passes.

def _features_are(feats):
  """An interceptor that answers the vision tower's call with `feats`."""
  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, VisionTower) and context.method_name == "__call__":
      return feats
    return next_fun(*args, **kwargs)
  return nn.intercept_methods(interceptor)


def _with_probs(out: dict) -> dict:
  """Generation outputs -> tokens, num_tokens and each token's probability [B, N]."""
  logp = jax.nn.log_softmax(out["logits"], axis=-1)
  p = jnp.exp(jnp.take_along_axis(logp, out["tokens"][..., None], axis=-1)[..., 0])
  return {"tokens": out["tokens"], "num_tokens": out["num_tokens"], "probs": p}


class Passes:
  """Generation passes of one model at fixed batch shapes (greedy sampling only).

  after_len: the most text tokens after the placeholder in any prompt (`extend`'s
  chunks hold the new visual tokens and that many text slots); top_m: the largest m an
  `extend` ladder reaches (its cache size)."""

  def __init__(self, model, params, sampling: gen.SamplingConfig, after_len: int = 0,
               top_m: int | None = None, context=None):
    if sampling.temperature != 0:
      raise ValueError(f"adaptive passes compare greedy answers; got temperature "
                       f"{sampling.temperature}")
    self.model, self.params, self.sampling = model, params, sampling
    self.after_len = int(after_len)
    self.top_m = top_m or model.cfg.query.num_queries
    self.reuse = reuses_latents(model.cfg.query)
    self.context = context
    self._features = jax.jit(lambda p, x: model.apply(
        {"params": p}, x, method=lambda mod, x: mod.vision(x)))
    self._standard = jax.jit(self._standard_fn, static_argnames="m")
    self._full = jax.jit(self._full_fn, static_argnames="m")
    self._extend = jax.jit(self._extend_fn, static_argnames=("m", "prev"))

  def _run(self, fn, *args, **kwargs):
    if self.context is None:
      return jax.device_get(fn(self.params, *args, **kwargs))
    with self.context():
      return jax.device_get(fn(self.params, *args, **kwargs))

  def features(self, images) -> np.ndarray:
    """images [B, H, W, C] -> the tower's output [B, P, Dv]."""
    return self._run(self._features, images)

  def standard(self, images, ids, mask, m: int) -> dict:
    """`gen.generate` at m (num_latents=m), with token probabilities."""
    return self._run(self._standard, images, ids, mask, m=m)

  def full(self, feats, ids, mask, m: int) -> dict:
    """A pass at m from the cached tower output: the query transformer and the whole
    LLM prompt run again."""
    return self._run(self._full, feats, ids, mask, m=m)

  def extend(self, feats, ids, mask, cache, m: int, prev: int = 0):
    """A pass at m keeping the LLM cache of the pass at `prev` (0: the first pass, cache
    None) -> (outputs, the cache after this pass's prompt)."""
    if m > self.top_m or m <= prev:
      raise ValueError(f"extend: m={m} must be above the previous pass's {prev} and at most "
                       f"top_m={self.top_m}")
    ids, mask = np.asarray(ids), np.asarray(mask, bool)
    is_img = (ids == self.model.cfg.image_token_id) & mask
    if not is_img.any(axis=1).all():
      raise ValueError(f"extend: prompt rows {np.flatnonzero(~is_img.any(axis=1)).tolist()} "
                       f"have no image placeholder")
    after = int((mask.sum(axis=1) - 1 - np.argmax(is_img, axis=1)).max())
    if after > self.after_len:
      raise ValueError(f"extend: a prompt has {after} text tokens after the image, more than "
                       f"after_len={self.after_len}")
    return self._run(self._extend, feats, ids, mask, cache, m=m, prev=prev)

  def _standard_fn(self, params, images, ids, mask, m):
    return _with_probs(gen.generate(self.model, params, images, ids, mask, m, jax.random.key(0),
                                    self.sampling, num_latents=m, return_logits=True))

  def _full_fn(self, params, feats, ids, mask, m):
    with _features_are(feats):
      return self._standard_fn(params, feats, ids, mask, m)

  def _extend_fn(self, params, feats, ids, mask, cache, m, prev):
    cfg, n_new = self.model.cfg, self.sampling.max_new_tokens
    with _features_are(feats):
      emb, lengths = gen.prompt_embeds(self.model, params, feats, ids, mask, m, num_latents=m)
    b, s = emb.shape[:2]
    size = ids.shape[1] + self.top_m - 1 + n_new
    if prev == 0:
      start, rows = jnp.zeros((b,), jnp.int32), s
      cache = LlamaDecoder(cfg.llm).init_cache(b, size)
    else:
      is_img = (ids == cfg.image_token_id) & mask.astype(bool)
      before = jnp.argmax(is_img, axis=1).astype(jnp.int32)
      start = before + (prev if self.reuse else 0)
      rows = (m - prev if self.reuse else m) + self.after_len
    slot = start[:, None] + jnp.arange(rows)[None]
    chunk = jnp.take_along_axis(emb, jnp.minimum(slot, s - 1)[..., None], axis=1)
    attend = jnp.arange(size)[None, None, :] <= slot[:, :, None]
    logits, cache = LlamaDecoder(cfg.llm).apply(
        {"params": params["llm"]}, chunk, slot, attend, cache, start,
        logits_at=lengths - 1 - start)
    out = gen.decode_from_cache(
        cfg.llm, params["llm"], logits[:, 0], cache, lengths, jax.random.key(0), self.sampling,
        True)
    return _with_probs(out), cache


@dataclasses.dataclass
class PassRecord:
  """What one pass gave one question."""
  m: int
  tokens: list  # Generated ids (EOS dropped).
  new_tokens: int  # Generated tokens, EOS counted.
  probs: np.ndarray  # [new_tokens] each token's probability.


def records(out: dict, rows: int, m: int, eos_id: int) -> list[PassRecord]:
  """A pass's outputs -> one PassRecord per row (the first `rows`)."""
  got = []
  for r in range(rows):
    n = int(out["num_tokens"][r])
    toks = [int(t) for t in out["tokens"][r, :n] if int(t) != eos_id]
    got.append(PassRecord(m, toks, n, np.asarray(out["probs"][r, :n], np.float64)))
  return got


def record_confidence(rec: PassRecord, kind: str) -> float:
  """`confidence` of one pass's answer."""
  return float(confidence(rec.probs[None], np.array([rec.new_tokens]), kind)[0])


def run_cascade(passes: Passes, feats, ids, mask, rows: int, ladder, threshold: float,
                kind: str = "min", keep_cache: bool = False) -> list[list[PassRecord]]:
  """The cascade on one batch (arrays padded to the batch size; the first `rows` are
  questions): every question is answered at ladder[0]; those whose confidence is below
  `threshold` are answered again, gathered into a batch of their own, at the next m, and
  so on. -> per question its passes (the last one's answer is the cascade's)."""
  ladder = [int(m) for m in ladder]
  if not ladder or any(b <= a for a, b in zip(ladder, ladder[1:])):
    raise ValueError(f"a cascade ladder is increasing m; got {ladder}")
  bsz = len(ids)
  got = [[] for _ in range(rows)]
  active, cache, prev = np.arange(rows), None, 0
  for m in ladder:
    idx = np.concatenate([active, np.full(bsz - len(active), active[-1])])
    if keep_cache:
      sub = None if cache is None else jax.tree.map(lambda a: a[:, idx], cache)
      out, new_cache = passes.extend(feats[idx], ids[idx], mask[idx], sub, m=m, prev=prev)
      if cache is None:
        cache = new_cache
      else:
        for key in cache:
          cache[key] = cache[key].copy()
          cache[key][:, active] = new_cache[key][:, :len(active)]
    else:
      out = passes.full(feats[idx], ids[idx], mask[idx], m=m)
    recs = records(out, len(active), m, passes.sampling.eos_id)
    for r, rec in zip(active, recs):
      got[r].append(rec)
    if m == ladder[-1]:
      break
    active = np.array([r for r, rec in zip(active, recs)
                       if record_confidence(rec, kind) < threshold], np.int64)
    if not len(active):
      break
    prev = m
  return got


def cascade_stop(conf: np.ndarray, threshold: float) -> np.ndarray:
  """conf [rows, K] (each ladder pass's confidence) -> the pass each row stops at: the
  first whose confidence reaches `threshold`, else the last."""
  ok = np.asarray(conf) >= threshold
  ok[:, -1] = True
  return np.argmax(ok, axis=1)


# ---------------------------------------------------------------------------
# The predictor of the smallest sufficient m.

def smallest_sufficient(correct: np.ndarray) -> np.ndarray:
  """correct [rows, K] (right at each ladder m) -> the first right one per row; 0 where
  none is (no m helps, so the cheapest)."""
  correct = np.asarray(correct, bool)
  return np.where(correct.any(axis=1), np.argmax(correct, axis=1), 0)


def token_bag(prompts, vocab_size: int) -> np.ndarray:
  """Prompt ids -> [rows, vocab] token frequencies (negative ids, the placeholder, dropped)."""
  out = np.zeros((len(prompts), vocab_size), np.float32)
  for i, p in enumerate(prompts):
    ids = [t for t in p if 0 <= t < vocab_size]
    np.add.at(out[i], ids, 1.0 / max(len(ids), 1))
  return out


def fit_predictor(x: np.ndarray, y: np.ndarray, num_classes: int, steps: int = 300,
                  lr: float = 0.05, l2: float = 1e-2) -> dict:
  """Multinomial logistic regression (Adam on the mean cross-entropy plus l2 * |W|^2)
  on standardised features; -> its parameters, for `predict_proba`."""
  x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
  if len(x) != len(y) or not len(x):
    raise ValueError(f"the predictor needs features and labels per example; got {len(x)} and "
                     f"{len(y)}")
  if y.min() < 0 or y.max() >= num_classes:
    raise ValueError(f"labels must be in 0..{num_classes - 1}")
  mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
  xs = jnp.asarray((x - mean) / std)
  params = {"w": jnp.zeros((x.shape[1], num_classes)), "b": jnp.zeros((num_classes,))}
  opt = optax.adam(lr)

  def loss(p):
    logits = xs @ p["w"] + p["b"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()
    return ce + l2 * jnp.sum(p["w"] ** 2)

  @jax.jit
  def step(p, state):
    g = jax.grad(loss)(p)
    updates, state = opt.update(g, state)
    return optax.apply_updates(p, updates), state

  state = opt.init(params)
  for _ in range(steps):
    params, state = step(params, state)
  return {"w": np.asarray(params["w"]), "b": np.asarray(params["b"]), "mean": mean, "std": std}


def predict_proba(model: dict, x: np.ndarray) -> np.ndarray:
  """-> [rows, K] class probabilities."""
  logits = ((np.asarray(x, np.float32) - model["mean"]) / model["std"]) @ model["w"] + model["b"]
  logits = logits - logits.max(axis=1, keepdims=True)
  p = np.exp(logits)
  return p / p.sum(axis=1, keepdims=True)


def predictor_flops(model: dict) -> int:
  """The predictor's matmul FLOPs per sample (multiply-add = 2)."""
  return 2 * int(model["w"].size)


def choose_rung(proba: np.ndarray, threshold: float) -> np.ndarray:
  """The smallest ladder index whose predicted probability that it suffices (the
  cumulative probability of the classes up to it) reaches `threshold`; else the last."""
  ok = np.cumsum(proba, axis=1) >= threshold
  ok[:, -1] = True
  return np.argmax(ok, axis=1)


def folds(groups, k: int = 2, seed: int = 0) -> np.ndarray:
  """A fold in 0..k-1 per example; examples of one group (e.g. one image) share a fold."""
  names = sorted(set(groups))
  order = np.random.default_rng(seed).permutation(len(names))
  fold_of = {names[j]: i % k for i, j in enumerate(order)}
  return np.array([fold_of[g] for g in groups])


# ---------------------------------------------------------------------------
# Ladders and the comparison with fixed m.

def parse_ladders(values, big_m: int) -> list[tuple[int, ...]]:
  """["1-4-M", ...] -> [(1, 4, M), ...]: increasing m, each validated (M: big_m)."""
  out = []
  for v in values:
    try:
      ladder = tuple(big_m if x.strip() == "M" else int(x) for x in v.split("-"))
    except ValueError:
      raise ValueError(f"--ladders: {v!r} is not m values joined by '-' (e.g. 1-4-M)") from None
    for m in ladder:
      try:
        matryoshka.validate_m(m, big_m)
      except ValueError as e:
        raise ValueError(f"--ladders: {v!r}: {e}") from None
    if len(ladder) < 2 or any(b <= a for a, b in zip(ladder, ladder[1:])):
      raise ValueError(f"--ladders: {v!r} needs two or more increasing m")
    out.append(ladder)
  return out


def compare_to_fixed(points: list[dict]) -> list[dict]:
  """Points {"policy", "gflops", "accuracy", optionally "right": per-question 0/1} ("fixed"
  ones: the fixed-m curve) -> every other point gets:
    fixed_at_flops  the fixed-m accuracy at its FLOPs, linear between the two fixed m
                    around it (what mixing them over the questions achieves); None below
                    the cheapest fixed m, the dearest one's accuracy above it;
    diff            its accuracy less that; diff_se: the standard error of the mean of
                    the per-question differences (paired; None without "right");
    best_fixed      the best accuracy of a fixed m whose FLOPs are at most its own."""
  fixed = sorted((p for p in points if p["policy"] == "fixed"), key=lambda p: p["gflops"])
  xs = [p["gflops"] for p in fixed]
  for p in points:
    if p["policy"] == "fixed":
      continue
    x = p["gflops"]
    fits = [f["accuracy"] for f in fixed if f["gflops"] <= x]
    p["best_fixed"] = max(fits) if fits else None
    p["fixed_at_flops"] = p["diff"] = p["diff_se"] = None
    if x < xs[0]:
      continue
    j = min(int(np.searchsorted(xs, x, side="right")), len(xs) - 1)
    a, b = fixed[max(j - 1, 0)], fixed[j]
    w = 1.0 if x >= xs[-1] or b is a else (b["gflops"] - x) / (b["gflops"] - a["gflops"])
    if x >= xs[-1]:
      a = b = fixed[-1]
    p["fixed_at_flops"] = w * a["accuracy"] + (1 - w) * b["accuracy"]
    p["diff"] = p["accuracy"] - p["fixed_at_flops"]
    if all("right" in q for q in (p, a, b)):
      d = (np.asarray(p["right"], float) - w * np.asarray(a["right"], float)
           - (1 - w) * np.asarray(b["right"], float))
      p["diff_se"] = float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else None
  return points
