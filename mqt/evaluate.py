"""Evaluation sweeps over m: generate answers, score them, measure cost, plot.

  python evaluate.py --config=configs/tiny.py --workdir=/tmp/mqt_tiny --ms=1,2,4,8,16

For each m (validated, 1 <= m <= M) the generation program is compiled once
ahead of time with `num_latents=m` (the query transformer runs m latents and
the prompt is T + m - 1 slots), so the measured cost is the cost of m tokens,
not of M masked ones; every benchmark and batch of the sweep shares one prompt
length T and batch size, so there is exactly one compile per m (plus one of
the prefill alone, for its latency). Per m it records each benchmark's
metrics, the analytic FLOPs split by component (mqt/flops.py), the median
prefill latency of one batch and the decode throughput (generated tokens per
second of generation time after the prefill; "n/a" when generation is almost
all prefill and the difference would be noise, see `decode_rate`).

Benchmarks: `builtin` is the built-in synthetic set (the held-out `synthetic`
questions scored by exact match per type, and `pope`, `scienceqa`, `vqav2`,
`gqa` written in the published file formats under <data_dir>); a benchmark
named itself (pope, scienceqa, mme, gqa, vqav2, textvqa, vizwiz, mmbench) reads
the user's files at the paths in `config.eval.benchmarks.<name>`, and one
whose paths are not set is an error (every such benchmark named at once, before
anything is read). Scorers and baselines: mqt/scorers.py. Questions are loaded,
and their files checked, before any compute. Outputs under --out_dir:
results.json (with each benchmark's "sources" and chance / image-blind
"baselines"), results.csv, predictions/<benchmark>_m<m>.jsonl (qid, prediction
and the reference answer as JSON), accuracy_vs_m.png, accuracy_vs_flops.png
(baselines as dashed lines).
"""
import csv
import json
import math
import os
import shutil
import time

from data import prepare
from data import synthetic
from data import tokenizer as tokenizer_lib
from mqt import config_lib
from mqt import flops as flops_lib
from mqt import inference
from mqt import matryoshka
from mqt import scorers
from mqt import train
from mqt.jax_utils import count_compiles

BUILTIN = ("synthetic", "pope", "scienceqa", "vqav2", "gqa")
HEADLINE = scorers.HEADLINE


# ---------------------------------------------------------------------------
# The built-in held-out files.

def builtin_benchmark_dir(config, workdir: str) -> str:
  """The synthetic held-out splits in the published formats (written once, atomically)."""
  root = os.path.join(train.builtin_dir(config, workdir), "mqt_synthetic_benchmarks")
  wanted = {"seed": int(config.data.builtin_seed),
            "image_size": int(config.data.builtin_image_size),
            "n_eval_per_type": int(config.data.builtin_sizes.eval) // len(synthetic.IMAGE_TYPES),
            "version": synthetic.DATA_VERSION}
  stamp = os.path.join(root, "settings.json")
  if os.path.exists(stamp):
    prepare.check_settings(stamp, wanted, root, "the built-in benchmark files")
    return root
  tmp = root + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  print(f"writing the built-in benchmark files -> {root}", flush=True)
  synthetic.generate(tmp, seed=wanted["seed"], image_size=wanted["image_size"], n_caption=0,
                     n_instruct=0, n_eval_per_type=wanted["n_eval_per_type"])
  with open(os.path.join(tmp, "settings.json"), "w") as f:
    json.dump(wanted, f)
  os.replace(tmp, root)  # Only a complete folder ever has the final name.
  return root


# ---------------------------------------------------------------------------
# Loading benchmarks (all files checked before any compute).

# The fields of config.eval.benchmarks.<name> a benchmark reads (all must be set).
BENCHMARK_FIELDS = {
    "scienceqa": ("problems", "pid_splits", "image_folder"),
    "pope": ("folder", "image_folder"),
    "mme": ("root",),
    "gqa": ("questions", "image_folder"),
    "vqav2": ("questions", "annotations", "image_folder"),
    "textvqa": ("json", "image_folder"),
    "vizwiz": ("json", "image_folder"),
    "mmbench": ("tsv",),
}


def expand_names(names) -> list[str]:
  """Benchmark names in order, `builtin` expanded to BUILTIN; unknown names raise."""
  return list(benchmark_sources(names))


def benchmark_sources(names) -> dict[str, str]:
  """-> {benchmark: "builtin" | "files"}, in the order named.

  Benchmarks that come from `builtin` read the built-in synthetic files; a benchmark
  named itself reads the files at config.eval.benchmarks.<name> (also when `builtin`
  names it too). `synthetic` is always built-in.
  """
  out = {}
  for n in names:
    n = n.strip()
    if not n:
      continue
    for x in (BUILTIN if n == "builtin" else (n,)):
      if x not in HEADLINE:
        raise ValueError(f"unknown benchmark {x!r}; known: builtin, {', '.join(HEADLINE)}")
      if n != "builtin" and x != "synthetic":
        out[x] = "files"
      else:
        out.setdefault(x, "builtin")
  return out


def check_benchmark_paths(config, names) -> dict[str, str]:
  """Checks that every benchmark named to read the user's files has its paths set
  (before any data or weight is read). -> `benchmark_sources(names)`.

  Raises ValueError with one line per benchmark that lacks paths, naming the
  config fields to set.
  """
  sources = benchmark_sources(names)
  b = config.eval.benchmarks
  problems = []
  for name, source in sources.items():
    if source != "files":
      continue
    unset = [f"--config.eval.benchmarks.{name}.{f}" for f in BENCHMARK_FIELDS[name]
             if not b[name][f]]
    if not unset:
      continue
    verb = "is" if len(unset) == 1 else "are"
    hint = (f"; or use --benchmarks=builtin for the built-in synthetic {name}"
            if name in BUILTIN else "")
    problems.append(f"benchmark {name}: {', '.join(unset)} {verb} not set: set "
                    f"{'it' if len(unset) == 1 else 'them'} to your copy's files "
                    f"(formats: mqt/scorers.py){hint}")
  if problems:
    raise ValueError("\n".join(problems))
  return sources


def _builtin_notes(config, sources: dict) -> list[str]:
  """Notes for built-in benchmarks whose user paths are set (and so not read)."""
  b = config.eval.benchmarks
  out = []
  for name, source in sources.items():
    if source == "builtin" and name in BENCHMARK_FIELDS and \
        any(b[name][f] for f in BENCHMARK_FIELDS[name]):
      out.append(f"note: --benchmarks=builtin evaluates the built-in synthetic {name}; "
                 f"config.eval.benchmarks.{name} is read only with --benchmarks={name}")
  return out


def _load_builtin(name: str, base: str) -> list:
  """The built-in synthetic version of `name`, under `base`."""
  if name == "synthetic":
    return scorers.load_synthetic(os.path.join(base, "eval.json"), base)
  if name == "pope":
    return scorers.load_pope(os.path.join(base, "pope"), base)
  if name == "scienceqa":
    return scorers.load_scienceqa(os.path.join(base, "scienceqa", "problems.json"),
                                  os.path.join(base, "scienceqa", "pid_splits.json"), base)
  if name == "vqav2":
    return scorers.load_vqav2(os.path.join(base, "vqa", "questions.json"),
                              os.path.join(base, "vqa", "annotations.json"), base)
  if name == "gqa":
    return scorers.load_gqa(os.path.join(base, "gqa", "testdev_balanced_questions.json"), base)
  raise ValueError(f"benchmark {name!r} has no built-in version; built-in: {BUILTIN}")


def _load_files(config, name: str, workdir: str) -> list:
  """`name` from the user's files at config.eval.benchmarks.<name> (checked set)."""
  b = config.eval.benchmarks
  if name == "pope":
    return scorers.load_pope(b.pope.folder, b.pope.image_folder)
  if name == "scienceqa":
    return scorers.load_scienceqa(b.scienceqa.problems, b.scienceqa.pid_splits,
                                  b.scienceqa.image_folder)
  if name == "vqav2":
    return scorers.load_vqav2(b.vqav2.questions, b.vqav2.annotations, b.vqav2.image_folder)
  if name == "gqa":
    return scorers.load_gqa(b.gqa.questions, b.gqa.image_folder)
  if name == "mme":
    return scorers.load_mme(b.mme.root)
  if name in ("textvqa", "vizwiz"):
    return scorers.BENCHMARKS[name].load(b[name].json, b[name].image_folder)
  if name == "mmbench":
    return scorers.load_mmbench(b.mmbench.tsv, os.path.join(workdir, "mmbench_images"),
                                b.mmbench.circular)
  raise ValueError(f"benchmark {name!r} reads no files")


def load_benchmarks(config, names, workdir: str, limit: int = 0) -> dict:
  """-> {name: [Question]}: `builtin` benchmarks from the built-in synthetic files, the
  others from the paths in config.eval.benchmarks (an error lists every benchmark
  whose paths are not set). Every question must have a reference answer."""
  sources = check_benchmark_paths(config, names)
  for note in _builtin_notes(config, sources):
    print(note, flush=True)
  base = None
  out = {}
  for name, source in sources.items():
    if source == "builtin":
      base = base or builtin_benchmark_dir(config, workdir)
      qs = _load_builtin(name, base)
    else:
      qs = _load_files(config, name, workdir)
    if limit:
      qs = qs[:limit]
    if not qs:
      raise ValueError(f"benchmark {name}: no questions were loaded")
    no_ref = [q.qid for q in qs if q.answer is None]
    if no_ref:
      raise ValueError(f"benchmark {name}: {len(no_ref)} of {len(qs)} questions have no "
                       f"reference answer (first: {no_ref[0]!r}); give an annotated split")
    out[name] = qs
  return out


# ---------------------------------------------------------------------------
# The sweep.

def _round_up(x: int, k: int = 8) -> int:
  return int(math.ceil(x / k) * k)


def sweep(config, workdir: str, ms, names, out_dir: str, checkpoint: str = "",
          limit: int = 0, dry_run: bool = False) -> dict:
  """Runs every benchmark at every m; writes results, predictions and plots. The memory
  of the largest m is printed first, and a run that cannot fit stops before loading
  weights; `dry_run`: only that (no data or weights read), returning the figures."""
  t_start = time.perf_counter()
  if not ms:
    raise ValueError("no m to evaluate: pass --ms=1,2,4,...")
  sources = check_benchmark_paths(config, names)  # Config only: no file read yet.
  # Fails fast, before data or compute.
  checkpoint, tok_path = inference.resolve_paths(config, workdir, checkpoint)
  model_cfg = inference.model_config(config, checkpoint)
  num_queries = model_cfg.query.num_queries
  ms = [matryoshka.validate_m(int(m), num_queries) for m in ms]
  gcfg = config.eval.generation
  max_text = config_lib.max_text_len(config, config.eval.data, "config.eval.data")
  bsz = int(gcfg.batch_size)
  if dry_run:  # No data: the longest prompt the evaluation's sequence length allows.
    _, sampling = inference.encode_prompts(config, tok_path, [], [], gcfg)
    return inference.plan_memory(config, model_cfg, max(ms), bsz, max_text, sampling, True)
  benches = load_benchmarks(config, names, workdir, limit)
  base_scores = {n: scorers.baselines(n, qs) for n, qs in benches.items()}
  tok = tokenizer_lib.Tokenizer.load(tok_path)
  prompts = {}
  for name, qs in benches.items():
    prompts[name] = [inference.encode_prompt(q.prompt, tok, q.image is not None,
                                             config.eval.data.template) for q in qs]
    for q, p in zip(qs, prompts[name]):
      if len(p) > max_text:
        raise ValueError(f"benchmark {name}, question {q.qid}: the prompt has {len(p)} tokens, "
                         f"more than the {max_text} that the evaluation's sequence length "
                         f"(config.eval.data.max_len, else config.data.max_len) leaves "
                         f"beside {num_queries} visual tokens")
  text_len = min(_round_up(max(len(p) for ps in prompts.values() for p in ps)), max_text)
  sampling = inference.sampling_config(gcfg, tok)
  inference.plan_memory(config, model_cfg, max(ms), bsz, text_len, sampling, False)
  loaded = inference.load(config, workdir, checkpoint, model_cfg)
  size = loaded.model_cfg.vision.image_size
  os.makedirs(os.path.join(out_dir, "predictions"), exist_ok=True)
  print(f"evaluating {', '.join(f'{n} ({len(q)})' for n, q in benches.items())} at m = "
        f"{ms}; batch {bsz}, prompt length {text_len}, up to {sampling.max_new_tokens} new "
        f"tokens; checkpoint {loaded.checkpoint}", flush=True)
  # Token batches are built once for every m; images are decoded per batch when it runs
  # (holding a whole benchmark's pixels, e.g. VQAv2's 100k+ at 336 px, would not fit).
  batches = {}
  for name, qs in benches.items():
    ids, mask = inference.pad_prompts(prompts[name], text_len, sampling.pad_id)
    rows = []
    for start in range(0, len(qs), bsz):
      sel = list(range(start, min(start + bsz, len(qs))))
      pad = sel + [sel[-1]] * (bsz - len(sel))  # Repeat the last row; its answer is dropped.
      rows.append((sel, [qs[i].image for i in pad], ids[pad], mask[pad]))
    batches[name] = rows
  results = {"ms": ms, "benchmarks": list(benches), "headline": {n: HEADLINE[n] for n in benches},
             "sources": {n: sources[n] for n in benches},
             "baselines": base_scores,
             "batch_size": bsz, "text_len": text_len, "max_new_tokens": sampling.max_new_tokens,
             "checkpoint": loaded.checkpoint, "per_m": {}}
  total = len(ms) * sum(len(v) for v in batches.values())
  done = 0
  _, paths, ids, mask = next(iter(batches.values()))[0]
  timed = (inference.load_images(paths, size), ids, mask)  # The batch whose prefill is timed.
  for m in ms:
    with count_compiles() as setup_compiles:
      runner = inference.Answerer(loaded, m, bsz, text_len, sampling, seed=int(config.seed))
      prefill_s = runner.prefill_latency(*timed)
    entry = {"compile_s": runner.compile_s,
             "xla_compiles_setup": setup_compiles(),
             "prefill_ms_per_batch": prefill_s * 1e3, "prefill_ms_per_image": prefill_s * 1e3 / bsz,
             "flops": flops_lib.flops_per_m(loaded.model_cfg, text_len, m,
                                            max_new_tokens=sampling.max_new_tokens),
             "benchmarks": {}}
    with count_compiles() as batch_compiles:
      all_preds = {}
      for name, qs in benches.items():
        preds = all_preds[name] = {}
        for sel, paths, ids, mask in batches[name]:
          images = inference.load_images(paths, size)
          for i, a in zip(sel, runner(images, ids, mask, rows=len(sel))):
            preds[qs[i].qid] = a
          done += 1
    entry["xla_compiles_during_batches"] = batch_compiles()
    for name, qs in benches.items():
      preds = all_preds[name]
      entry["benchmarks"][name] = scorers.BENCHMARKS[name].score(qs, preds)
      with open(os.path.join(out_dir, "predictions", f"{name}_m{m}.jsonl"), "w") as f:
        for q in qs:
          f.write(json.dumps({"qid": q.qid, "prediction": preds[q.qid],
                              "answer": answer_json(q.answer)}) + "\n")
    entry["decode_tokens_per_s"] = decode_rate(runner.generate_s, runner.batches, prefill_s,
                                               runner.tokens)
    entry["generated_tokens"] = runner.tokens
    results["per_m"][m] = entry
    elapsed = time.perf_counter() - t_start
    eta = elapsed / done * (total - done)
    heads = "  ".join(f"{n} {entry['benchmarks'][n][HEADLINE[n]]:.3f}" for n in benches)
    print(f"[eval] m={m:<4} {heads}  prefill {entry['prefill_ms_per_batch']:.1f} ms/batch  "
          f"decode {_rate_text(entry['decode_tokens_per_s'])} tok/s  ({done}/{total} batches, "
          f"ETA {eta:.0f}s)", flush=True)
  results["wall_time_s"] = time.perf_counter() - t_start
  write_results(results, out_dir)
  print("\n" + format_results(results), flush=True)
  print(f"\nresults, predictions and plots written to {out_dir}", flush=True)
  return results


# ---------------------------------------------------------------------------
# Output.

def answer_json(answer):
  """A reference answer as JSON: str / number / bool as is, lists (VQA's human answers)
  and tuples as lists, dicts with str keys; anything else as its str; None stays None."""
  if answer is None or isinstance(answer, (str, int, float, bool)):
    return answer
  if isinstance(answer, (list, tuple)):
    return [answer_json(a) for a in answer]
  if isinstance(answer, dict):
    return {str(k): answer_json(v) for k, v in answer.items()}
  return str(answer)


def _total_gflops(entry) -> float:
  return entry["flops"]["prefill"] / 1e9


def format_results(results: dict) -> str:
  ms = results["ms"]
  per = results["per_m"]
  base = results.get("baselines", {})
  head = f"{'':<24}" + "".join(f"{'m=' + str(m):>10}" for m in ms)
  lines = [head, "-" * len(head)]
  for name in results["benchmarks"]:
    metric = results["headline"][name]
    lines.append(f"{name + ' ' + metric:<24}"
                 + "".join(f"{per[m]['benchmarks'][name][metric]:>10.3f}" for m in ms))
    subs = sorted(k for k in per[ms[0]]["benchmarks"][name] if k.startswith("type/"))
    for k in subs:
      lines.append(f"{'  ' + k[5:]:<24}"
                   + "".join(f"{per[m]['benchmarks'][name][k]:>10.3f}" for m in ms))
    if name in base:
      lines.append(f"{'  baselines':<24}  chance {base[name]['chance']:.3f}, image-blind "
                   f"{base[name]['image_blind']:.3f}")
  lines.append(f"{'prefill GFLOPs/image':<24}" + "".join(f"{_total_gflops(per[m]):>10.4g}"
                                                         for m in ms))
  lines.append(f"{'prefill ms/batch':<24}" + "".join(f"{per[m]['prefill_ms_per_batch']:>10.1f}"
                                                     for m in ms))
  rates = [_rate_text(per[m]["decode_tokens_per_s"]) for m in ms]
  lines.append(f"{'decode tok/s':<24}" + "".join(f"{r:>10}" for r in rates))
  return "\n".join(lines)


def decode_rate(generate_s: float, batches: int, prefill_s: float, tokens: int):
  """Generated tokens per second of generation time after the prefill, or None.

  The decode time is the generation time less `batches` median prefills; when
  that is under 5% of the generation time (one-word answers: generation is
  almost all prefill) the difference is timing noise, so no rate is claimed.
  """
  decode_s = generate_s - batches * prefill_s
  if tokens <= 0 or decode_s < 0.05 * generate_s:
    return None
  return tokens / decode_s


def _rate_text(rate) -> str:
  return "n/a" if rate is None else f"{rate:,.0f}"


def write_results(results: dict, out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  jsonable = {**results, "per_m": {str(m): v for m, v in results["per_m"].items()}}
  with open(os.path.join(out_dir, "results.json"), "w") as f:
    json.dump(jsonable, f, indent=1)
  with open(os.path.join(out_dir, "results.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["benchmark", "metric", "m", "value"])
    for m, entry in results["per_m"].items():
      for name, metrics in entry["benchmarks"].items():
        for k, v in metrics.items():
          w.writerow([name, k, m, v])
      for k, v in entry["flops"].items():
        w.writerow(["cost", f"flops/{k}", m, v])
      for k in ("prefill_ms_per_batch", "prefill_ms_per_image", "decode_tokens_per_s",
                "xla_compiles_setup", "xla_compiles_during_batches"):
        w.writerow(["cost", k, m, entry[k]])
  plot(results, out_dir)


# ---------------------------------------------------------------------------
# Plots.

# Mantissa series for plain-number ticks on a log axis, sparsest first.
_NICE_MANTISSAS = ((1,), (1, 3), (1, 2, 5), (1, 1.5, 2, 3, 5, 7),
                   (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8))
# FLOPs units: (divisor from GFLOPs, name), the first whose range reads well is used.
_FLOPS_UNITS = ((1e-3, "MFLOPs"), (1.0, "GFLOPs"), (1e3, "TFLOPs"))
_BASELINE_STYLE = {"chance": ("chance", (2, 2)), "image_blind": ("image-blind", (6, 3))}


def plain_number(x: float) -> str:
  """A tick label without exponents: 0.5 -> "0.5", 2.0 -> "2", 1500 -> "1,500"."""
  if abs(x) >= 1000:
    return f"{x:,.0f}"
  return f"{x:.3g}" if abs(x) >= 1e-3 else f"{x:.1e}"


def _spread(ticks: list[float], lo: float, hi: float, max_ticks: int) -> bool:
  """At most max_ticks, at least 1/(max_ticks + 1) of the log axis apart."""
  if len(ticks) > max_ticks:
    return False
  gap = math.log10(hi / lo) / (max_ticks + 1)
  return all(math.log10(b / a) >= gap for a, b in zip(ticks, ticks[1:]))


def log_ticks(lo: float, hi: float, max_ticks: int = 5) -> list[float]:
  """Plain-number ticks for a log axis shown from lo to hi (0 < lo < hi).

  -> the most ticks of a 1-3 / 1-2-5 / ... series that fit `_spread`; where none
  gives two, the ends rounded to a few significant digits (inside [lo, hi]).
  """
  best = []
  for mantissas in _NICE_MANTISSAS:
    ticks = []
    for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
      for mant in mantissas:
        t = float(f"{mant * 10.0 ** e:.6g}")
        if lo <= t <= hi:
          ticks.append(t)
    if len(ticks) > len(best) and _spread(ticks, lo, hi, max_ticks):
      best = ticks
  if len(best) >= 2:
    return best
  ends = [_round_inside(lo, lo, hi), _round_inside(hi, lo, hi)]
  return ends if ends[0] < ends[1] else [ends[0]]


def _round_inside(x: float, lo: float, hi: float) -> float:
  """x with the fewest significant digits (2 to 4) that stays in [lo, hi]."""
  for digits in (2, 3, 4):
    t = float(f"{x:.{digits}g}")
    if lo <= t <= hi:
      return t
  return x


def thin_ticks(values, max_ticks: int = 12) -> list:
  """Sorted distinct values kept at least 1/max_ticks of the log axis apart, the
  smallest and largest always kept (the one before the largest yields to it)."""
  vals = sorted(set(values))
  if len(vals) < 3:
    return vals
  gap = math.log2(vals[-1] / vals[0]) / max_ticks
  kept = [vals[0]]
  for v in vals[1:]:
    if math.log2(v / kept[-1]) >= gap:
      kept.append(v)
  if kept[-1] != vals[-1]:
    if len(kept) > 1 and math.log2(vals[-1] / kept[-1]) < gap:
      kept.pop()
    kept.append(vals[-1])
  return kept


def _log_limits(lo: float, hi: float) -> tuple[float, float]:
  """View limits around [lo, hi] on a log axis, with a margin."""
  pad = max(1.15, (hi / lo) ** 0.06)
  return lo / pad, hi * pad


def _flops_unit(gflops) -> tuple[float, str]:
  hi = max(gflops)
  for div, name in _FLOPS_UNITS:
    if hi / div < 1e4:
      return div, name
  return _FLOPS_UNITS[-1]


def _set_log_x(ax, x, kind: str) -> None:
  """A log x axis with a few plain-number tick labels that do not overlap."""
  from matplotlib import ticker  # pylint: disable=import-outside-toplevel
  lo, hi = _log_limits(min(x), max(x))
  ax.set_xscale("log", base=2 if kind == "m" else 10)
  ax.set_xlim(lo, hi)
  ticks = thin_ticks(x) if kind == "m" else log_ticks(lo, hi)
  ax.xaxis.set_major_locator(ticker.FixedLocator(ticks))
  ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: plain_number(v)))
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  ax.tick_params(axis="x", labelsize=8)


def _draw_baselines(ax, base: dict, color) -> None:
  """Dashed horizontal lines in the benchmark's colour, one legend entry each."""
  for key, (label, dashes) in _BASELINE_STYLE.items():
    if key in base and base[key] is not None:
      ax.axhline(base[key], linestyle="--", dashes=dashes, color=color, linewidth=1.1,
                 alpha=0.8, label=f"{label} {base[key]:.3g}")


def _pyplot():
  """matplotlib.pyplot on the file-only Agg backend."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def make_figure(results: dict, kind: str):
  """The figure of accuracy_vs_<kind>.png (kind "m" or "flops"): one panel per
  benchmark with its headline metric, baselines as dashed lines. -> a Figure."""
  plt = _pyplot()
  ms = results["ms"]
  per = results["per_m"]
  names = results["benchmarks"]
  baselines = results.get("baselines", {})
  sources = results.get("sources", {})
  gflops = [_total_gflops(per[m]) for m in ms]
  div, unit = _flops_unit(gflops)
  cols = min(3, len(names))
  rows = int(math.ceil(len(names) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
  for i, (ax, name) in enumerate(zip(axes.flat, names)):
    color = f"C{i % 10}"
    metric = results["headline"][name]
    x = ms if kind == "m" else [g / div for g in gflops]
    y = [per[m]["benchmarks"][name][metric] for m in ms]
    ax.plot(x, y, "o-", color=color, label=metric)
    for xi, yi, m in zip(x, y, ms):
      ax.annotate(f"{m}", (xi, yi), textcoords="offset points", xytext=(3, 4), fontsize=7)
    _draw_baselines(ax, baselines.get(name, {}), color)
    _set_log_x(ax, x, kind)
    ax.set_xlabel("visual tokens m" if kind == "m" else f"prefill {unit} per image")
    ax.set_ylabel(metric)
    if all(0.0 <= v <= 1.0 for v in y + [b for b in baselines.get(name, {}).values()
                                         if b is not None]):
      ax.set_ylim(0.0, 1.02)  # Rates on their full scale: noise does not look like a trend.
    ax.set_title(name + (" (built-in)" if sources.get(name) == "builtin" else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
  for ax in list(axes.flat)[len(names):]:
    ax.axis("off")
  fig.suptitle(f"accuracy against {'m' if kind == 'm' else 'FLOPs'} "
               f"({os.path.basename(os.path.dirname(results['checkpoint'])) or 'model'})")
  fig.tight_layout()
  return fig


def plot(results: dict, out_dir: str) -> list[str]:
  """accuracy_vs_m.png and accuracy_vs_flops.png: one panel per benchmark, with its
  chance and image-blind baselines (results["baselines"]) as dashed lines."""
  plt = _pyplot()
  paths = []
  for kind in ("m", "flops"):
    fig = make_figure(results, kind)
    path = os.path.join(out_dir, f"accuracy_vs_{kind}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths
