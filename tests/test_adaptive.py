"""Adaptive m: FLOPs accounting against hand sums, the passes against `gen.generate`, the
cascade's ends, and the predictor on toy problems."""
import dataclasses
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from mqt import adaptive
from mqt import budget
from mqt import flops as flops_lib
from mqt import generate as gen
from mqt.decoder import LlamaConfig
from mqt.model import MQTLLaVA, ModelConfig
from mqt.query_transformer import QueryConfig
from mqt.vision import VisionConfig

T, BEFORE, N = 12, 8, 6  # Prompt tokens, text before the image, max new tokens.


def _cfg(variant="official", latent_attention="prefix"):
  return ModelConfig(
      vision=VisionConfig(image_size=16, patch_size=4, width=32, depth=2, heads=4, mlp_dim=64),
      query=QueryConfig(variant=variant, num_queries=9, width=32, heads=4, out_dim=48, depth=1,
                        mlp_dim=64, latent_attention=latent_attention),
      llm=LlamaConfig(vocab_size=53, width=48, depth=2, heads=4, kv_heads=2, head_dim=12,
                      mlp_dim=96))


def _new_latents_official(cfg, k):
  """Hand count of k more official latents: q_proj, attention over the P = 16 patches,
  out_proj and proj to the LLM width."""
  w, out, p = cfg.query.width, cfg.query.out_dim, 16
  return 2 * k * w * w + 2 * 2 * k * p * w + 2 * k * w * w + 2 * k * w * out


def test_one_pass_is_sample_flops_less_the_tokens_not_decoded():
  cfg = _cfg()
  f = flops_lib.flops_per_m(cfg, T, 4, N)
  assert adaptive.single_pass_flops(cfg, 4, T, N, N) == budget.sample_flops(cfg, 4, T, N)
  want = f["prefill"] + 2 * f["llm_decode_per_token"]
  assert adaptive.single_pass_flops(cfg, 4, T, N, 2) == want
  assert adaptive.passes_flops(cfg, [4], [2], T, BEFORE, N) == want


def test_an_escalation_costs_the_tower_once_and_two_passes():
  cfg = _cfg()
  f1, f9 = (flops_lib.flops_per_m(cfg, T, m, N) for m in (1, 9))
  assert f9["query"] - f1["query"] == _new_latents_official(cfg, 8)  # The hand count.
  pass1 = f1["query"] + f1["llm_prefill"] + 3 * f1["llm_decode_per_token"]
  pass2 = _new_latents_official(cfg, 8) + f9["llm_prefill"] + 2 * f9["llm_decode_per_token"]
  got = adaptive.passes_flops(cfg, [1, 9], [3, 2], T, BEFORE, N)
  assert got == f1["vision"] + pass1 + pass2
  # Two fixed-m generations would pay the tower twice and all 9 latents.
  assert budget.sample_flops(cfg, 1, T, N) + budget.sample_flops(cfg, 9, T, N) - got > (
      f1["vision"])


def test_latents_are_reused_only_where_they_do_not_change_with_m():
  ms, toks = [2, 5], [1, 1]
  for variant, la, reused in (("official", "prefix", True), ("perceiver", "causal", True),
                              ("perceiver", "prefix", False)):
    cfg = _cfg(variant, la)
    f2, f5 = (flops_lib.flops_per_m(cfg, T, m, N) for m in ms)
    llm = sum(f["llm_prefill"] + f["llm_decode_per_token"] for f in (f2, f5))
    query = f2["query"] + (f5["query"] - f2["query"] if reused else f5["query"])
    assert adaptive.reuses_latents(cfg.query) is reused
    assert adaptive.passes_flops(cfg, ms, toks, T, BEFORE, N) == f2["vision"] + query + llm


def test_kept_cache_prefills_only_the_new_visual_tokens_and_the_text_after():
  cfg = _cfg()
  c = cfg.llm
  cache = T + 9 - 1 + N
  f1, f9 = (flops_lib.flops_per_m(cfg, T, m, N) for m in (1, 9))
  rows2 = 8 + (T - 1 - BEFORE)  # New latents 1..8 and the 3 text tokens after the image.
  want = (f1["vision"] + f1["query"] + flops_lib.llm_prefill_flops(c, T, cache)
          + (f9["query"] - f1["query"]) + flops_lib.llm_prefill_flops(c, rows2, cache)
          + 5 * flops_lib.llm_decode_flops(c, cache))
  got = adaptive.passes_flops(cfg, [1, 9], [2, 3], T, BEFORE, N, keep_cache=True)
  assert got == want
  assert got < adaptive.passes_flops(cfg, [1, 9], [2, 3], T, BEFORE, N)


@pytest.mark.parametrize("ms,toks", [([4, 2], [1, 1]), ([1, 4], [1]), ([1], [0]), ([1], [N + 1])])
def test_bad_passes_are_named(ms, toks):
  with pytest.raises(ValueError, match="pass"):
    adaptive.passes_flops(_cfg(), ms, toks, T, BEFORE, N)


def test_confidence_kinds():
  probs = np.array([[0.9, 0.5, 0.8, 0.0], [0.7, 0.0, 0.0, 0.0]])
  n = np.array([3, 1])
  np.testing.assert_allclose(adaptive.confidence(probs, n, "min"), [0.5, 0.7])
  np.testing.assert_allclose(adaptive.confidence(probs, n, "mean"), [2.2 / 3, 0.7])
  np.testing.assert_allclose(adaptive.confidence(probs, n, "first"), [0.9, 0.7])
  with pytest.raises(ValueError, match="unknown confidence"):
    adaptive.confidence(probs, n, "max")


def test_cascade_stop_ends():
  conf = np.array([[0.2, 0.9, 0.1], [0.95, 0.1, 0.1], [0.1, 0.2, 0.3]])
  assert adaptive.cascade_stop(conf, 0.0).tolist() == [0, 0, 0]
  assert adaptive.cascade_stop(conf, 1.01).tolist() == [2, 2, 2]
  assert adaptive.cascade_stop(conf, 0.5).tolist() == [1, 0, 2]


# ---------------------------------------------------------------------------
# Passes on a tiny random model (greedy).

B, TL, LADDER = 4, 10, (1, 9)


@pytest.fixture(scope="module")
def tiny():
  cfg = _cfg()
  model = MQTLLaVA(cfg)
  images = np.asarray(jax.random.normal(jax.random.key(1), (B, 16, 16, 3)))
  rng = np.random.default_rng(2)
  ids = rng.integers(3, 53, size=(B, TL)).astype(np.int32)
  lens, place = np.array([10, 5, 7, 9]), np.array([7, 1, 4, 8])
  ids[np.arange(B), place] = cfg.image_token_id
  mask = np.arange(TL)[None] < lens[:, None]
  params = model.init(jax.random.key(0), images, ids, mask, 9)["params"]
  params = jax.tree.map(lambda x: x * 3.0, params)  # Sharper logits: no near-ties.
  sampling = gen.SamplingConfig(max_new_tokens=5, eos_id=2, pad_id=0)
  passes = adaptive.Passes(model, params, sampling, after_len=int(max(lens - 1 - place)),
                           top_m=9)
  feats = passes.features(images)
  std = {m: passes.standard(images, ids, mask, m) for m in LADDER}
  return passes, images, ids, mask, feats, std


def test_passes_from_the_cached_tower_equal_generate(tiny):
  """Tokens equal; token probabilities within 1e-4 (the kept cache sums attention in
  other chunks)."""
  passes, _, ids, mask, feats, std = tiny
  cache, prev = None, 0
  for m in LADDER:
    full = passes.full(feats, ids, mask, m)
    kept, cache = passes.extend(feats, ids, mask, cache, m=m, prev=prev)
    prev = m
    for out in (full, kept):
      np.testing.assert_array_equal(out["tokens"], std[m]["tokens"])
      np.testing.assert_array_equal(out["num_tokens"], std[m]["num_tokens"])
      np.testing.assert_allclose(out["probs"], std[m]["probs"], atol=1e-4)
  with pytest.raises(ValueError, match="above the previous"):
    passes.extend(feats, ids, mask, cache, m=4, prev=9)
  with pytest.raises(ValueError, match="more than after_len"):
    adaptive.Passes(passes.model, passes.params, passes.sampling, after_len=1).extend(
        feats, ids, mask, None, m=1)
  no_image = np.where(ids == passes.model.cfg.image_token_id, 5, ids)
  with pytest.raises(ValueError, match=r"rows \[0, 1, 2, 3\] have no image"):
    passes.extend(feats, no_image, mask, None, m=1)


@pytest.mark.parametrize("keep_cache", [False, True])
def test_cascade_ends(tiny, keep_cache):
  """Threshold 0: one pass at the ladder's first m; above 1: every pass, the answer of
  fixed M. Three questions in a batch of four."""
  passes, _, ids, mask, feats, std = tiny
  eos = passes.sampling.eos_id
  want = {m: adaptive.records(std[m], 3, m, eos) for m in LADDER}
  low = adaptive.run_cascade(passes, feats, ids, mask, 3, LADDER, 0.0, keep_cache=keep_cache)
  assert [[r.m for r in q] for q in low] == [[1]] * 3
  assert [q[-1].tokens for q in low] == [r.tokens for r in want[1]]
  high = adaptive.run_cascade(passes, feats, ids, mask, 3, LADDER, 1.5, keep_cache=keep_cache)
  assert [[r.m for r in q] for q in high] == [[1, 9]] * 3
  assert [q[-1].tokens for q in high] == [r.tokens for r in want[9]]
  assert [q[-1].new_tokens for q in high] == [r.new_tokens for r in want[9]]


# ---------------------------------------------------------------------------
# The predictor.

def _blobs(n, seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 3, n)
  centres = np.array([[3.0, 0, 0], [0, 3.0, 0], [0, 0, 3.0]])
  x = np.concatenate([centres[y] + rng.normal(size=(n, 3)), rng.normal(size=(n, 4))], 1)
  return x, y


def test_the_predictor_learns_a_separable_problem_and_not_shuffled_labels():
  x, y = _blobs(300, 0)
  xt, yt = _blobs(300, 1)
  model = adaptive.fit_predictor(x, y, 3)
  acc = np.mean(adaptive.predict_proba(model, xt).argmax(1) == yt)
  assert acc > 0.9, acc
  shuffled = adaptive.fit_predictor(x, np.random.default_rng(3).permutation(y), 3)
  control = np.mean(adaptive.predict_proba(shuffled, xt).argmax(1) == yt)
  assert control < 0.5, control  # Chance is 1/3.
  assert adaptive.predictor_flops(model) == 2 * 7 * 3


def test_rungs_labels_and_folds():
  proba = np.array([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]])
  assert adaptive.choose_rung(proba, 0.5).tolist() == [0, 2]
  assert adaptive.choose_rung(proba, 0.85).tolist() == [1, 2]
  assert adaptive.choose_rung(proba, 2.0).tolist() == [2, 2]
  right = np.array([[0, 1, 1], [1, 0, 1], [0, 0, 0]])
  assert adaptive.smallest_sufficient(right).tolist() == [1, 0, 0]
  groups = ["a", "a", "b", "c", "c", "d"]
  f = adaptive.folds(groups)
  assert f[0] == f[1] and f[3] == f[4] and set(f) == {0, 1}


def test_bench_ladders_and_the_fixed_curve_comparison():
  assert adaptive.parse_ladders(["1-4-M", "2-9"], 9) == [(1, 4, 9), (2, 9)]
  for bad in ("4-1", "1", "1-x", "1-10"):
    with pytest.raises(ValueError):
      adaptive.parse_ladders([bad], 9)
  pt = lambda policy, g, a: {"policy": policy, "gflops": g, "accuracy": a}
  points = adaptive.compare_to_fixed([pt("fixed", 1.0, 0.5), pt("fixed", 2.0, 0.7),
                                      pt("x", 1.5, 0.65), pt("x", 0.5, 0.9), pt("x", 3.0, 0.6)])
  got = [(p["fixed_at_flops"], p["diff"], p["best_fixed"]) for p in points[2:]]
  assert got[0] == pytest.approx((0.6, 0.05, 0.5)) and got[1] == (None, None, None)
  assert got[2] == pytest.approx((0.7, -0.1, 0.7))
  # Paired: per question, the policy's 0/1 less the fixed mixture's expected 0/1.
  right = lambda policy, g, r: {**pt(policy, g, float(np.mean(r))), "right": r}
  a, b, x = [1, 0, 0, 1], [1, 1, 0, 1], [1, 1, 1, 0]
  p = adaptive.compare_to_fixed([right("fixed", 1.0, a), right("fixed", 3.0, b),
                                 right("x", 1.5, x)])[2]
  d = np.array(x) - 0.75 * np.array(a) - 0.25 * np.array(b)
  assert p["diff"] == pytest.approx(d.mean())
  assert p["diff_se"] == pytest.approx(d.std(ddof=1) / 2)


def test_passes_need_greedy_sampling():
  cfg = _cfg()
  hot = dataclasses.replace(gen.SamplingConfig(), temperature=0.7)
  with pytest.raises(ValueError, match="greedy"):
    adaptive.Passes(MQTLLaVA(cfg), None, hot)


def test_the_bench_draws_and_tables_saved_results(tmp_path):
  """--plot_results: a panel per results file and their tables, no model run."""
  pt = lambda policy, setting, g, a, **kw: {"policy": policy, "setting": setting,
                                            "gflops": g, "accuracy": a, "se": 0.05, **kw}
  points = adaptive.compare_to_fixed([
      pt("fixed", "m=1", 0.01, 0.6, m=1), pt("fixed", "m=9", 0.02, 0.7, m=9),
      pt("cascade 1-9", "tau=0.5", 0.015, 0.68), pt("oracle", "smallest right m", 0.012, 0.8)])
  files = []
  for name in ("a", "b"):
    files.append(str(tmp_path / f"{name}.json"))
    with open(files[-1], "w") as f:
      json.dump({"name": name, "n": 10, "points": points}, f)
  png = str(tmp_path / "plot.png")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  run = lambda *args: subprocess.run([sys.executable, "-m", "bench.adaptive", *args], cwd=root,
                                     capture_output=True, text=True, timeout=120)
  out = run(f"--plot_results={','.join(files)}", f"--plot={png}")
  assert out.returncode == 0, out.stderr
  assert os.path.getsize(png) > 1000
  assert ("cascade 1-9: above the fixed-m curve at 1 of 1 settings (0 by more than 2 paired "
          "se); above the best fixed m within its FLOPs at 1; largest +0.030") in out.stdout
  bad = run(f"--plot_results={files[0]}")
  assert bad.returncode == 2 and "needs --plot" in bad.stderr
