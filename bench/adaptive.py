r"""Per-image adaptive m against fixed m: accuracy against average FLOPs per sample.

  python -m bench.adaptive --config=configs/tiny.py --workdir=/tmp/mqt_tiny \
      --out=/tmp/adaptive_builtin
  python -m bench.adaptive --plot_results=/tmp/adaptive_builtin/adaptive.json,\
/tmp/adaptive_ud/adaptive.json --plot=docs/adaptive_m.png

Questions: config.eval.data's JSON when its json_path is set (records with "type" and
"answer", as the built-in eval.json), else the built-in held-out questions; answers are
generated greedily and scored by the `synthetic` benchmark's scorer. Every question
gets, once: the fixed-m answers (`gen.generate` at each m of --ms), the passes of
`adaptive.Passes.full` at those m (the tower run once), and per ladder of --ladders the
cascade's passes with the LLM cache kept (`Passes.extend`). The policies' points are
read from these passes (greedy passes do not depend on the threshold); one cascade per
kind is also run as such, escalating only the unsure questions, and must give the same
answers and passes (reported as `checked`).

Policies: fixed m; cascade (min-probability confidence, LLM prompt recomputed per
pass, or its cache kept); predictor (one pass at the m it picks from the tower's
pooled output and the question's tokens), predictor+m1 (also the m = 1 pass's
confidence; that pass is counted and its answer kept when m = 1 is picked), fitted
on one half of the images and scored on the other, both ways (2-fold); oracle (the
smallest right m, not a policy: the room there is). Each adaptive point is compared
with the fixed-m accuracy linearly interpolated at its FLOPs, which is what mixing
the two neighbouring fixed m over the questions gives.
"""
import json
import math
import os
import time

import numpy as np
from absl import flags

from mqt import adaptive
from mqt import cli
from mqt import config_lib
from mqt import inference
from mqt import matryoshka
from mqt import run_inputs
from mqt.benchmarks import synthetic
from mqt.benchmarks.table import Column, Row, format_table

_CONFIG, _WORKDIR, _CHECKPOINT = cli.define_model_flags()
_OUT = flags.DEFINE_string("out", "", "Folder for adaptive.json and adaptive_m.png.")
_NAME = flags.DEFINE_string("name", "", "The dataset's name in tables and plots (default: "
                            "'built-in' or the question file's name).")
_MS = flags.DEFINE_list("ms", [], "Fixed m to evaluate (default: every m when M <= 16, else "
                        "the powers of 2 and M).")
_LADDERS = flags.DEFINE_list("ladders", ["1-4-M", "1-M"], "Cascade ladders, m joined by '-' "
                             "(M: the model's M). The first is the predictor's classes.")
_CONF = flags.DEFINE_enum("confidence", "min", list(adaptive.CONFIDENCE),
                          "Cascade confidence: min / mean / first generated token probability.")
_LIMIT = flags.DEFINE_integer("limit", 0, "At most this many questions (0: all).")
_PLOT_RESULTS = flags.DEFINE_list("plot_results", [], "adaptive.json files: only draw them, "
                                  "one panel each, into --plot.")
_PLOT = flags.DEFINE_string("plot", "", "Plot path (default: <out>/adaptive_m.png).")
INF = float("inf")


def load_questions(config, workdir: str):
  """-> (questions, name): the JSON of config.eval.data, else the built-in held-out set."""
  data = config.eval.data
  if data.get("json_path"):
    qs = synthetic.load_synthetic(data.json_path, data.image_folder)
    return qs, os.path.splitext(os.path.basename(data.json_path))[0]
  base = run_inputs.prepare_builtin_benchmarks(config, workdir)
  return synthetic.load_synthetic(os.path.join(base, "eval.json"), base), "built-in"


def correct(q, text: str) -> bool:
  return synthetic.score_synthetic([q], {q.qid: text})["accuracy"] == 1.0


def collect(config, workdir, checkpoint, questions, ms, ladders, confidence_kind):
  """Runs every pass once; -> a dict of per-question records and shapes."""
  loaded = inference.load(config, workdir, checkpoint)
  tok, cfg = loaded.tokenizer, loaded.model_cfg
  sampling = inference.sampling_config(config.eval.generation, tok)
  prompts = [inference.encode_prompt(q.prompt, tok, True, loaded.template) for q in questions]
  max_text = config_lib.max_text_len(config, config.eval.data, "config.eval.data")
  text_len = min(int(math.ceil(max(map(len, prompts)) / 8) * 8), max_text)
  before = [p.index(cfg.image_token_id) for p in prompts]
  after = [len(p) - 1 - b for p, b in zip(prompts, before)]
  passes = adaptive.Passes(loaded.model, loaded.params, sampling, after_len=max(after),
                           top_m=max(l[-1] for l in ladders), context=loaded.context)
  ids, mask = inference.pad_prompts(prompts, text_len, sampling.pad_id)
  bsz, n = int(config.eval.generation.batch_size), len(questions)
  table_ms = sorted(set(ms) | {m for l in ladders for m in l})
  got = {"fixed": {m: [] for m in ms}, "full": [], "kept": {l: [] for l in ladders},
         "pooled": [], "checked": {}}
  direct = []
  t0 = time.perf_counter()
  for start in range(0, n, bsz):
    sel = list(range(start, min(start + bsz, n)))
    pad = sel + [sel[-1]] * (bsz - len(sel))
    images = inference.load_images([questions[i].image for i in pad], cfg.vision.image_size)
    feats = passes.features(images)
    got["pooled"] += list(feats[:len(sel)].mean(axis=1))
    for m in ms:
      got["fixed"][m] += adaptive.records(passes.standard(images, ids[pad], mask[pad], m),
                                          len(sel), m, sampling.eos_id)
    got["full"] += adaptive.run_cascade(passes, feats, ids[pad], mask[pad], len(sel), table_ms,
                                        INF)
    for l in ladders:
      got["kept"][l] += adaptive.run_cascade(passes, feats, ids[pad], mask[pad], len(sel), l,
                                             INF, keep_cache=True)
    direct.append((feats, pad, len(sel)))
    print(f"[adaptive] {sel[-1] + 1}/{n} questions ({time.perf_counter() - t0:.0f}s)",
          flush=True)
  # One cascade per kind run as such (only unsure questions escalate), at the median
  # first-pass confidence: its answers and passes must be the table's.
  ladder = ladders[0]
  for kept in (False, True):
    first = [r[0] for r in got["kept"][ladder]] if kept else [
        r[table_ms.index(ladder[0])] for r in got["full"]]
    tau = float(np.median([adaptive.record_confidence(r, confidence_kind) for r in first]))
    runs = []
    for feats, pad, rows in direct:
      runs += adaptive.run_cascade(passes, feats, ids[pad], mask[pad], rows, ladder, tau,
                                   confidence_kind, keep_cache=kept)
    same = 0
    for i, run in enumerate(runs):
      table = got["kept"][ladder][i] if kept else [got["full"][i][table_ms.index(m)]
                                                   for m in ladder]
      stop = adaptive.cascade_stop(np.array([[adaptive.record_confidence(r, confidence_kind)
                                              for r in table]]), tau)[0]
      same += [(r.m, r.tokens, r.new_tokens) for r in run] == [
          (r.m, r.tokens, r.new_tokens) for r in table[:stop + 1]]
    got["checked"]["kept" if kept else "full"] = {"threshold": tau, "same": same, "n": n}
  got["checked"]["full_vs_generate"] = {"same": sum(
      got["fixed"][m][i].tokens == got["full"][i][table_ms.index(m)].tokens
      for m in ms for i in range(n)), "n": n * len(ms)}
  got.update(loaded=loaded, tok=tok, prompts=prompts, before=before, text_len=text_len,
             table_ms=table_ms, sampling=sampling, seconds=time.perf_counter() - t0)
  return got


def _point(name, setting, flops, right, extra=None):
  acc = float(np.mean(right))
  return {"policy": name, "setting": setting, "gflops": float(np.mean(flops)) / 1e9,
          "accuracy": acc, "se": math.sqrt(acc * (1 - acc) / len(right)),
          "right": [int(r) for r in right], **(extra or {})}


def _by_type(qs, chosen_ms) -> dict:
  """Mean m of the final pass per question type."""
  out = {}
  for q, m in zip(qs, chosen_ms):
    out.setdefault(str(q.meta.get("type")), []).append(m)
  return {k: float(np.mean(v)) for k, v in sorted(out.items())}


def _mix(chosen_ms) -> str:
  vals, counts = np.unique(chosen_ms, return_counts=True)
  return " ".join(f"{v}:{c / len(chosen_ms):.0%}" for v, c in zip(vals, counts))


def _grid(scores) -> list[float]:
  """Thresholds: 0, quantiles of the scores, and one above every score."""
  qs = np.quantile(np.asarray(scores, np.float64), (0.1, 0.25, 0.5, 0.75, 0.9))
  return [0.0] + sorted(set(float(x) for x in qs)) + [INF]


def policies(got, questions, ms, ladders, kind):
  """Every policy's points (accuracy and mean FLOPs per sample over the questions)."""
  cfg, n_max = got["loaded"].model_cfg, got["sampling"].max_new_tokens
  tok, qs, n = got["tok"], questions, len(questions)
  lens, before = [len(p) for p in got["prompts"]], got["before"]
  text = lambda rec: tok.decode(rec.tokens).strip()
  right = lambda rec, i: correct(qs[i], text(rec))
  fixed_ok = {m: np.array([right(r, i) for i, r in enumerate(got["fixed"][m])]) for m in ms}
  fixed_cost = {m: np.array([adaptive.single_pass_flops(cfg, m, lens[i], n_max, r.new_tokens)
                             for i, r in enumerate(got["fixed"][m])]) for m in ms}
  points = [_point("fixed", f"m={m}", fixed_cost[m], fixed_ok[m], {"m": m}) for m in ms]
  full = lambda i, m: got["full"][i][got["table_ms"].index(m)]
  cost = lambda recs, i, kept=False, top=None: adaptive.passes_flops(
      cfg, [r.m for r in recs], [r.new_tokens for r in recs], lens[i], before[i], n_max,
      keep_cache=kept, top_m=top)
  for ladder in ladders:
    name = "-".join(map(str, ladder))
    for kept in (False, True):
      recs = [got["kept"][ladder][i] if kept else [full(i, m) for m in ladder] for i in range(n)]
      conf = np.array([[adaptive.record_confidence(r, kind) for r in row] for row in recs])
      for tau in _grid(conf[:, 0]):
        stop = adaptive.cascade_stop(conf, tau)
        path = [recs[i][:stop[i] + 1] for i in range(n)]
        points.append(_point(f"cascade {name}" + (", LLM cache kept" if kept else ""),
                             f"tau={tau:.4g} ({_mix([ladder[s] for s in stop])})",
                             [cost(p, i, kept, ladder[-1]) for i, p in enumerate(path)],
                             [right(p[-1], i) for i, p in enumerate(path)],
                             {"threshold": tau,
                              "mean_m_by_type": _by_type(qs, [p[-1].m for p in path])}))
  points += predictor_points(got, qs, ladders[0], fixed_ok, fixed_cost, right, full, cost)
  oracle_m = [next((m for m in ms if fixed_ok[m][i]), ms[0]) for i in range(n)]
  points.append(_point("oracle", f"smallest right m (m>1: {np.mean(np.array(oracle_m) > 1):.0%})",
                       [fixed_cost[m][i] for i, m in enumerate(oracle_m)],
                       [fixed_ok[m][i] for i, m in enumerate(oracle_m)]))
  return points


def predictor_points(got, qs, ladder, fixed_ok, fixed_cost, right, full, cost):
  """The predictor's points, fitted on one fold of images and scored on the other."""
  n, vocab = len(qs), got["loaded"].model_cfg.llm.vocab_size
  base = np.concatenate([np.array(got["pooled"]), adaptive.token_bag(got["prompts"], vocab)], 1)
  m1 = [full(i, ladder[0]) for i in range(n)]
  conf = np.array([[adaptive.record_confidence(r, k) for k in adaptive.CONFIDENCE] for r in m1])
  fold = adaptive.folds([q.image for q in qs])
  out = []
  for with_m1 in (False, True):
    x = np.concatenate([base, conf], 1) if with_m1 else base
    ok = (np.array([[right(full(i, m), i) for m in ladder] for i in range(n)]) if with_m1
          else np.stack([fixed_ok[m] for m in ladder], 1))
    y = adaptive.smallest_sufficient(ok)
    proba = np.zeros((n, len(ladder)))
    for f in (0, 1):
      model = adaptive.fit_predictor(x[fold != f], y[fold != f], len(ladder))
      proba[fold == f] = adaptive.predict_proba(model, x[fold == f])
    extra = adaptive.predictor_flops(model)
    for tau in _grid(proba[:, 0]):
      k = adaptive.choose_rung(proba, tau)
      if with_m1:
        path = [[m1[i]] + ([full(i, ladder[k[i]])] if k[i] else []) for i in range(n)]
        flops = [cost(p, i) + extra for i, p in enumerate(path)]
        ok_i = [right(p[-1], i) for i, p in enumerate(path)]
      else:
        flops = [fixed_cost[ladder[k[i]]][i] + extra for i in range(n)]
        ok_i = [fixed_ok[ladder[k[i]]][i] for i in range(n)]
      out.append(_point("predictor+m1" if with_m1 else "predictor",
                        f"tau={tau:.4g} ({_mix([ladder[j] for j in k])})", flops, ok_i,
                        {"threshold": tau,
                         "mean_m_by_type": _by_type(qs, [ladder[j] for j in k]),
                         "fold_sizes": [int((fold == f).sum()) for f in (0, 1)],
                         "label_mix": _mix([ladder[j] for j in y])}))
  return out


def summary(points) -> list[str]:
  """Per policy: at how many settings it is above the fixed-m curve (interpolated; by more
  than two paired standard errors; and above the best fixed m that fits its FLOPs);
  then the same for the best adaptive curve (each point more accurate than every cheaper
  adaptive point)."""
  def counts(pts):
    pts = [p for p in pts if p["diff"] is not None]
    above = sum(p["diff"] > 0 for p in pts)
    clear = sum(p["diff_se"] is not None and p["diff"] > 2 * p["diff_se"] for p in pts)
    best = sum(p["best_fixed"] is not None and p["accuracy"] > p["best_fixed"] for p in pts)
    return (f"above the fixed-m curve at {above} of {len(pts)} settings ({clear} by more than "
            f"2 paired se); above the best fixed m within its FLOPs at {best}")
  adaptive_pts = [p for p in points if p["policy"] not in ("fixed", "oracle")]
  lines = []
  for name in dict.fromkeys(p["policy"] for p in adaptive_pts):
    pts = [p for p in adaptive_pts if p["policy"] == name and p["diff"] is not None]
    best, worst = max(pts, key=lambda p: p["diff"]), min(pts, key=lambda p: p["diff"])
    lines.append(f"{name}: {counts(pts)}; largest {best['diff']:+.3f} ({best['setting']}), "
                 f"smallest {worst['diff']:+.3f} ({worst['setting']})")
  env, top = [], -1.0
  for p in sorted(adaptive_pts, key=lambda p: (p["gflops"], -p["accuracy"])):
    if p["accuracy"] > top:
      env.append(p)
      top = p["accuracy"]
  lines.append(f"best adaptive curve ({len(env)} points): {counts(env)}")
  return lines


def format_points(points, name: str, n: int) -> str:
  """A row per point: policy and setting, mean GFLOPs per sample, accuracy and its
  binomial standard error, the fixed-m accuracy at the same FLOPs and the difference."""
  cols = [Column("GFLOPs", 9, ".5f"), Column("acc", 7), Column("± se", 7),
          Column("fixed@F", 9), Column("diff", 8, "+.3f"), Column("± se", 7),
          Column("best≤F", 8)]
  rows = [Row(f"{p['policy']:<30}{p['setting']}", [
      p["gflops"], p["accuracy"], p["se"], p.get("fixed_at_flops"), p.get("diff"),
      p.get("diff_se"), p.get("best_fixed")]) for p in points]
  return (f"{name}: {n} questions; GFLOPs: mean per sample, every pass counted; fixed@F: "
          f"fixed m interpolated at the same FLOPs, diff: accuracy less that (± its paired "
          f"se); best≤F: the best fixed m within those FLOPs\n"
          + format_table(cols, rows, label=("policy / setting", 62)))


def _style(name: str) -> dict:
  """Line style of a policy: a colour per ladder or predictor, dashed with the cache kept."""
  colours = {"predictor": "C3", "predictor+m1": "C4"}
  base = name.split(",")[0]
  colour = colours.get(base) or f"C{sum(map(ord, base)) % 3}"
  return {"color": colour, "ls": "--" if "cache kept" in name else "-", "marker": ".",
          "lw": 1.2, "ms": 5}


def plot(results, path: str) -> None:
  """A panel per results dict: accuracy against mean FLOPs per sample, the fixed-m curve
  (labelled with m), each policy's curve over its thresholds, and the oracle."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, len(results), figsize=(6.2 * len(results), 4.8), squeeze=False)
  for ax, res in zip(axes[0], results):
    pts = res["points"]
    for name in dict.fromkeys(p["policy"] for p in pts):
      x, y = zip(*sorted((p["gflops"] * 1e3, p["accuracy"]) for p in pts
                         if p["policy"] == name))
      if name == "fixed":
        ax.plot(x, y, "k-o", lw=2.2, ms=4, label="fixed m", zorder=5)
        for k, p in enumerate(p for p in pts if p["policy"] == "fixed"):
          ax.annotate(str(p["m"]), (p["gflops"] * 1e3, p["accuracy"]), fontsize=7,
                      xytext=(-3, 6 if k % 2 else -11), textcoords="offset points")
      elif name == "oracle":
        ax.plot(x, y, "*", color="gold", ms=13, mec="k", label="oracle (smallest right m)")
      else:
        ax.plot(x, y, label=name, **_style(name))
    ax.set_title(f"{res['name']} ({res['n']} questions)", fontsize=10)
    ax.set_xlabel("mean MFLOPs per sample (every pass counted)")
    ax.set_ylabel("accuracy of the generated answers")
    ax.grid(alpha=0.3)
  handles, labels = axes[0][0].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
  fig.tight_layout(rect=(0, 0.13, 1, 1))
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main(argv):
  cli.start(argv)
  if _PLOT_RESULTS.value:
    if not _PLOT.value:
      raise cli.UserError("--plot_results needs --plot (where the figure goes)")
    results = [json.load(open(p)) for p in _PLOT_RESULTS.value]
    plot(results, _PLOT.value)
    for res in results:
      print(format_points(res["points"], res["name"], res["n"]) + "\n\n"
            + "\n".join(summary(res["points"])) + "\n")
    print(f"plot written to {_PLOT.value}")
    return
  found = cli.Problems()
  if _CONFIG.value is None or not _WORKDIR.value or not _OUT.value:
    raise cli.UserError("--config, --workdir and --out are required (or --plot_results)")
  config = cli.apply_param_dtype(_CONFIG.value)
  if float(config.eval.generation.temperature) != 0:
    found.add(f"config.eval.generation.temperature={config.eval.generation.temperature}: "
              f"the policies compare greedy answers (set it to 0)")
  big_m = int(config.model.query.num_queries)
  ms, bad = cli.int_list("ms", _MS.value) if _MS.value else (
      list(range(1, big_m + 1)) if big_m <= 16 else list(matryoshka.pow2_buckets(big_m)), [])
  found.add(bad)
  for m in ms:
    try:
      matryoshka.validate_m(m, big_m)
    except ValueError as e:
      found.add(f"--ms: {e}")
  ladders = found.check(adaptive.parse_ladders, _LADDERS.value, big_m) or []
  ms = sorted(set(ms) | {m for l in ladders for m in l})  # The policies' m are scored too.
  if _LIMIT.value < 0:
    found.add(f"--limit={_LIMIT.value} must be >= 0")
  inference.load_problems(found, config, _WORKDIR.value, _CHECKPOINT.value, ("eval.ms",))
  found.raise_if_any()
  questions, default_name = load_questions(config, _WORKDIR.value)
  questions = questions[:_LIMIT.value] if _LIMIT.value else questions
  got = collect(config, _WORKDIR.value, _CHECKPOINT.value, questions, ms, ladders, _CONF.value)
  points = adaptive.compare_to_fixed(policies(got, questions, ms, ladders, _CONF.value))
  for p in points:
    del p["right"]
  name = _NAME.value or default_name
  res = {"name": name, "n": len(questions), "confidence": _CONF.value,
         "ladders": [list(l) for l in ladders], "ms": ms,
         "text_len": got["text_len"], "max_new_tokens": got["sampling"].max_new_tokens,
         "checkpoint": got["loaded"].checkpoint, "checked": got["checked"],
         "seconds": got["seconds"], "points": points}
  os.makedirs(_OUT.value, exist_ok=True)
  with open(os.path.join(_OUT.value, "adaptive.json"), "w") as f:
    json.dump(res, f, indent=1)
  plot([res], _PLOT.value or os.path.join(_OUT.value, "adaptive_m.png"))
  print("\n" + format_points(points, name, len(questions)))
  print("\n" + "\n".join(summary(points)))
  for kind in ("full", "kept"):
    c = got["checked"][kind]
    print(f"cascade ({kind}) run as such at tau={c['threshold']:.3g}: {c['same']} of {c['n']} "
          f"questions got the table's answers and passes")
  c = got["checked"]["full_vs_generate"]
  print(f"passes from the cached tower output: {c['same']} of {c['n']} answers equal "
        f"gen.generate's at the same m")
  print(f"\nwritten: {_OUT.value}/adaptive.json and the plot ({got['seconds']:.0f}s of passes)")


if __name__ == "__main__":
  cli.run(main)
