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

Benchmarks (mqt/benchmarks/registry.py lists them; each module there gives its file
format, prompt and scorer): `builtin` is the built-in synthetic set (every benchmark
with a built-in version, read from the files under `run_inputs.builtin_benchmark_dir`, which the
caller prepares: evaluate.py does); a benchmark named itself reads the user's files at
the paths in `config.eval.benchmarks.<name>`, and one whose paths are not set is an
error (every such benchmark named at once, before anything is read). Questions are
loaded, and their files checked, before any compute. Outputs under --out_dir:
results.json (with each benchmark's "sources" and chance / image-blind "baselines"),
results.csv, predictions/<benchmark>_m<m>.jsonl (qid, prediction and the reference
answer as JSON), accuracy_vs_m.png, accuracy_vs_flops.png (mqt/plots.py).
"""
import csv
import json
import math
import os
import time
from typing import Mapping

from data import tokenizer as tokenizer_lib
from mqt import config_lib
from mqt import flops as flops_lib
from mqt import inference
from mqt import matryoshka
from mqt import plots
from mqt import run_inputs
from mqt.benchmarks import registry
from mqt.benchmarks.baselines import Chance
from mqt.benchmarks.common import need_answers
from mqt.benchmarks.table import Column, Row, format_table

# ---------------------------------------------------------------------------
# Loading benchmarks (all files checked before any compute).

def expand_names(names) -> list[str]:
  """Benchmark names in order, `builtin` expanded to the built-in ones; unknown names
  raise."""
  return list(benchmark_sources(names))


def benchmark_sources(names) -> dict[str, str]:
  """-> {benchmark: "builtin" | "files"}, in the order named.

  Benchmarks that come from `builtin` read the built-in synthetic files; a benchmark
  named itself reads the files at config.eval.benchmarks.<name> (also when `builtin`
  names it too). One that reads no user files (`synthetic`) is always built-in.
  """
  out = {}
  for n in names:
    n = n.strip()
    if not n:
      continue
    for x in (registry.builtin_names() if n == "builtin" else (n,)):
      if x not in registry.REGISTRY:
        raise ValueError(f"unknown benchmark {x!r}; known: builtin, "
                         f"{', '.join(registry.REGISTRY)}")
      if n != "builtin" and registry.REGISTRY[x].from_config is not None:
        out[x] = "files"
      else:
        out.setdefault(x, "builtin")
  return out


def _unset_paths(config, name: str) -> list[str]:
  """The path fields of config.eval.benchmarks.<name> that are not set, as flags."""
  block = config.eval.benchmarks.get(name) or {}
  return [f"--config.eval.benchmarks.{name}.{f}" for f in registry.get(name).path_fields
          if not block.get(f)]


def check_benchmark_paths(config, names) -> dict[str, str]:
  """Checks that every benchmark named to read the user's files has its paths set
  (before any data or weight is read). -> `benchmark_sources(names)`.

  Raises ValueError with one line per benchmark that lacks paths, naming the
  config fields to set.
  """
  sources = benchmark_sources(names)
  problems = []
  for name, source in sources.items():
    unset = _unset_paths(config, name) if source == "files" else []
    if not unset:
      continue
    bench = registry.get(name)
    verb = "is" if len(unset) == 1 else "are"
    hint = (f"; or use --benchmarks=builtin for the built-in synthetic {name}"
            if bench.from_builtin is not None else "")
    problems.append(f"benchmark {name}: {', '.join(unset)} {verb} not set: set "
                    f"{'it' if len(unset) == 1 else 'them'} to your copy's files "
                    f"(formats: {bench.load.__module__.replace('.', '/')}.py){hint}")
  if problems:
    raise ValueError("\n".join(problems))
  return sources


def _builtin_notes(config, sources: dict) -> list[str]:
  """Notes for built-in benchmarks whose user paths are set (and so not read)."""
  out = []
  for name, source in sources.items():
    bench = registry.get(name)
    if source == "builtin" and bench.path_fields and \
        len(_unset_paths(config, name)) < len(bench.path_fields):
      out.append(f"note: --benchmarks=builtin evaluates the built-in synthetic {name}; "
                 f"config.eval.benchmarks.{name} is read only with --benchmarks={name}")
  return out


def load_benchmarks(config, names, workdir: str, limit: int = 0) -> dict:
  """-> {name: [Question]}: `builtin` benchmarks from the built-in files (prepared
  beforehand in `run_inputs.builtin_benchmark_dir`), the others from the paths in
  config.eval.benchmarks (an error lists every benchmark whose paths are not set).
  Every question must have a reference answer."""
  sources = check_benchmark_paths(config, names)
  for note in _builtin_notes(config, sources):
    print(note, flush=True)
  base = run_inputs.builtin_benchmark_dir(config, workdir) if "builtin" in sources.values() else ""
  if base and not os.path.isdir(base):
    raise FileNotFoundError(f"the built-in benchmark files are not in {base}: prepare them "
                            f"first (evaluate.py does, before the sweep)")
  out = {}
  for name, source in sources.items():
    bench = registry.get(name)
    if source == "builtin":
      qs = bench.from_builtin(base)
    else:
      qs = bench.from_config(config.eval.benchmarks[name], workdir)
    out[name] = qs[:limit] if limit else qs
    need_answers(out[name], f"benchmark {name}", "to evaluate")
  return out


# ---------------------------------------------------------------------------
# The sweep.

def _round_up(x: int, k: int = 8) -> int:
  return int(math.ceil(x / k) * k)


def _encode(config, tok, benches: dict, max_text: int, num_queries: int) -> dict:
  """-> {name: [token ids]} of every question's prompt; a prompt longer than `max_text`
  is named."""
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
  return prompts


def _batches(benches: dict, prompts: dict, text_len: int, bsz: int, pad_id: int) -> dict:
  """-> {name: [(question indices, image paths, ids, mask)]}: token batches built once
  for every m; images are decoded per batch when it runs (holding a whole benchmark's
  pixels, e.g. VQAv2's 100k+ at 336 px, would not fit)."""
  batches = {}
  for name, qs in benches.items():
    ids, mask = inference.pad_prompts(prompts[name], text_len, pad_id)
    rows = []
    for start in range(0, len(qs), bsz):
      sel = list(range(start, min(start + bsz, len(qs))))
      pad = sel + [sel[-1]] * (bsz - len(sel))  # Repeat the last row; its answer is dropped.
      rows.append((sel, [qs[i].image for i in pad], ids[pad], mask[pad]))
    batches[name] = rows
  return batches


def sweep(config, workdir: str, ms, names, out_dir: str, checkpoint: str = "",
          limit: int = 0, dry_run: bool = False,
          chance: Mapping[str, Chance] | None = None, pick_m=None) -> dict:
  """Runs every benchmark at every m; writes results, predictions and plots. The memory
  of the largest m is printed first, and a run that cannot fit stops before loading
  weights; `dry_run`: only that (no data or weights read), returning the figures.
  chance: benchmark name -> (questions -> its chance score), for the benchmarks whose
  answer sets only the caller knows (the built-in synthetic set's). pick_m: (model config,
  prompt length, max new tokens) -> (m, a line saying why), called once the sweep's prompt
  length is known (the longest prompt allowed on a dry run), before any weight is read: the
  sweep runs at that m alone instead of `ms` (a budget, evaluate.py's --flops_budget)."""
  t_start = time.perf_counter()
  if not ms and pick_m is None:
    raise ValueError("no m to evaluate: pass --ms=1,2,4,...")
  sources = check_benchmark_paths(config, names)  # Config only: no file read yet.
  # Fails fast, before data or compute.
  checkpoint, tok_path = run_inputs.resolve_paths(config, workdir, checkpoint)
  model_cfg = inference.model_config(config, checkpoint)
  num_queries = model_cfg.query.num_queries
  ms = [matryoshka.validate_m(int(m), num_queries) for m in ms or ()]
  gcfg = config.eval.generation
  max_text = config_lib.max_text_len(config, config.eval.data, "config.eval.data")
  bsz = int(gcfg.batch_size)
  if dry_run:  # No data: the longest prompt the evaluation's sequence length allows.
    _, sampling = inference.encode_prompts(config, tok_path, [], [], gcfg)
    ms = _picked(pick_m, model_cfg, max_text, sampling.max_new_tokens) or ms
    return inference.plan_memory(config, model_cfg, max(ms), bsz, max_text, sampling, True)
  benches = load_benchmarks(config, names, workdir, limit)
  chance = chance or {}
  base_scores = {n: registry.baselines(n, qs, chance.get(n)) for n, qs in benches.items()}
  tok = tokenizer_lib.Tokenizer.load(tok_path)
  prompts = _encode(config, tok, benches, max_text, num_queries)
  text_len = min(_round_up(max(len(p) for ps in prompts.values() for p in ps)), max_text)
  sampling = inference.sampling_config(gcfg, tok)
  ms = _picked(pick_m, model_cfg, text_len, sampling.max_new_tokens) or ms
  inference.plan_memory(config, model_cfg, max(ms), bsz, text_len, sampling, False)
  loaded = inference.load(config, workdir, checkpoint, model_cfg)
  size = loaded.model_cfg.vision.image_size
  os.makedirs(os.path.join(out_dir, "predictions"), exist_ok=True)
  print(f"evaluating {', '.join(f'{n} ({len(q)})' for n, q in benches.items())} at m = "
        f"{ms}; batch {bsz}, prompt length {text_len}, up to {sampling.max_new_tokens} new "
        f"tokens; checkpoint {loaded.checkpoint}", flush=True)
  batches = _batches(benches, prompts, text_len, bsz, sampling.pad_id)
  headline = {n: registry.get(n).headline for n in benches}
  results = {"ms": ms, "benchmarks": list(benches), "headline": headline,
             "sources": {n: sources[n] for n in benches},
             "baselines": base_scores,
             "batch_size": bsz, "text_len": text_len, "max_new_tokens": sampling.max_new_tokens,
             "checkpoint": loaded.checkpoint, "per_m": {}}
  total = len(ms) * sum(len(v) for v in batches.values())
  done = 0
  _, paths, ids, mask = next(iter(batches.values()))[0]
  timed_batch = (inference.load_images(paths, size), ids, mask)  # Its prefill is timed.
  for m in ms:
    runner = inference.Answerer(loaded, m, bsz, text_len, sampling, seed=int(config.seed),
                                timed=True)
    prefill_s = runner.prefill_latency(*timed_batch)
    entry = {"compile_s": runner.compile_s,
             "prefill_ms_per_batch": prefill_s * 1e3, "prefill_ms_per_image": prefill_s * 1e3 / bsz,
             "flops": flops_lib.flops_per_m(loaded.model_cfg, text_len, m,
                                            max_new_tokens=sampling.max_new_tokens),
             "benchmarks": {}}
    for name, qs in benches.items():
      preds = {}
      for sel, paths, ids, mask in batches[name]:
        images = inference.load_images(paths, size)
        for i, a in zip(sel, runner(images, ids, mask, rows=len(sel))):
          preds[qs[i].qid] = a
        done += 1
      entry["benchmarks"][name] = registry.get(name).score(qs, preds)
      _write_predictions(os.path.join(out_dir, "predictions", f"{name}_m{m}.jsonl"), qs, preds)
    entry["decode_tokens_per_s"] = decode_rate(runner.generate_s, runner.batches, prefill_s,
                                               runner.tokens)
    entry["generated_tokens"] = runner.tokens
    results["per_m"][m] = entry
    elapsed = time.perf_counter() - t_start
    eta = elapsed / done * (total - done)
    heads = "  ".join(f"{n} {entry['benchmarks'][n][headline[n]]:.3f}" for n in benches)
    print(f"[eval] m={m:<4} {heads}  prefill {entry['prefill_ms_per_batch']:.1f} ms/batch  "
          f"decode {_rate_text(entry['decode_tokens_per_s'])} tok/s  ({done}/{total} batches, "
          f"ETA {eta:.0f}s)", flush=True)
  results["wall_time_s"] = time.perf_counter() - t_start
  write_results(results, out_dir)
  print("\n" + format_results(results), flush=True)
  print(f"\nresults, predictions and plots written to {out_dir}", flush=True)
  return results


def _picked(pick_m, model_cfg, text_len: int, max_new_tokens: int) -> list[int]:
  """[the m that pick_m chooses] (its line printed), or [] without pick_m."""
  if pick_m is None:
    return []
  m, why = pick_m(model_cfg, text_len, max_new_tokens)
  print(why, flush=True)
  return [m]


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


def _write_predictions(path: str, questions, preds: dict) -> None:
  """One JSON line per question: qid, prediction and the reference answer."""
  with open(path, "w") as f:
    for q in questions:
      f.write(json.dumps({"qid": q.qid, "prediction": preds[q.qid],
                          "answer": answer_json(q.answer)}) + "\n")


def _score_text(x) -> str:
  return "n/a" if x is None else f"{x:.3f}"


def format_results(results: dict) -> str:
  """The results as a text table, a column per m: each benchmark's headline metric (and
  its per-type rows), its baselines, then the prefill FLOPs and time and decode rate."""
  ms = results["ms"]
  per = results["per_m"]
  base = results.get("baselines", {})
  rows = []
  for name in results["benchmarks"]:
    metric = results["headline"][name]
    metrics = [per[m]["benchmarks"][name] for m in ms]
    rows.append(Row(f"{name} {metric}", [x[metric] for x in metrics]))
    rows += [Row("  " + k[5:], [x[k] for x in metrics])
             for k in sorted(metrics[0]) if k.startswith("type/")]
    if name in base:
      rows.append(Row("  baselines", note=f"  chance {_score_text(base[name]['chance'])}, "
                                          f"image-blind {_score_text(base[name]['image_blind'])}"))
  rows += [Row("prefill GFLOPs/image", [plots.prefill_gflops(per[m]) for m in ms], fmt=".4g"),
           Row("prefill ms/batch", [per[m]["prefill_ms_per_batch"] for m in ms], fmt=".1f"),
           Row("decode tok/s", [_rate_text(per[m]["decode_tokens_per_s"]) for m in ms])]
  return format_table([Column(f"m={m}", 10) for m in ms], rows, label=("", 24))


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
  """results.json, results.csv (benchmark, metric, m, value) and the plots."""
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
      for k in ("prefill_ms_per_batch", "prefill_ms_per_image", "decode_tokens_per_s"):
        w.writerow(["cost", k, m, entry[k]])
  plots.plot(results, out_dir)
