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

Benchmarks: the built-in synthetic ones (`builtin`: the held-out `synthetic`
questions scored by exact match per type, and `pope`, `scienceqa`, `vqav2`,
`gqa` written in the published file formats under <data_dir>), or the
published ones at the paths in `config.eval.benchmarks` (scorers:
mqt/scorers.py). Questions are loaded, and their files checked, before any
compute. Outputs under --out_dir: results.json, results.csv,
predictions/<benchmark>_m<m>.jsonl, accuracy_vs_m.png, accuracy_vs_flops.png.
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
HEADLINE = {"synthetic": "accuracy", "pope": "f1", "scienceqa": "accuracy", "mme": "perception",
            "gqa": "accuracy", "vqav2": "accuracy", "textvqa": "accuracy",
            "vizwiz": "accuracy", "mmbench": "accuracy"}


# ---------------------------------------------------------------------------
# The built-in held-out files.

def builtin_benchmark_dir(config, workdir: str) -> str:
  """The synthetic held-out splits in the published formats (written once, atomically)."""
  root = os.path.join(train.builtin_dir(config, workdir), "mqt_synthetic_benchmarks")
  wanted = {"seed": int(config.data.builtin_seed), "image_size": int(config.data.builtin_image_size),
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

def expand_names(names) -> list[str]:
  out = []
  for n in names:
    n = n.strip()
    if not n:
      continue
    for x in (BUILTIN if n == "builtin" else (n,)):
      if x not in HEADLINE:
        raise ValueError(f"unknown benchmark {x!r}; known: builtin, {', '.join(HEADLINE)}")
      if x not in out:
        out.append(x)
  return out


def load_benchmarks(config, names, workdir: str, limit: int = 0) -> dict:
  """-> {name: [Question]}; empty pope/scienceqa/vqav2/gqa paths = the built-in files."""
  b = config.eval.benchmarks
  builtin = None
  def base():
    nonlocal builtin
    builtin = builtin or builtin_benchmark_dir(config, workdir)
    return builtin
  def need(name, field, value):
    if not value:
      raise ValueError(f"benchmark {name}: --config.eval.benchmarks.{name}.{field} is not set")
    return value
  out = {}
  for name in expand_names(names):
    if name == "synthetic":
      qs = scorers.load_synthetic(os.path.join(base(), "eval.json"), base())
    elif name == "pope":
      if b.pope.folder:
        qs = scorers.load_pope(b.pope.folder, need(name, "image_folder", b.pope.image_folder))
      else:
        qs = scorers.load_pope(os.path.join(base(), "pope"), base())
    elif name == "scienceqa":
      if b.scienceqa.problems:
        qs = scorers.load_scienceqa(b.scienceqa.problems,
                                    need(name, "pid_splits", b.scienceqa.pid_splits),
                                    need(name, "image_folder", b.scienceqa.image_folder))
      else:
        qs = scorers.load_scienceqa(os.path.join(base(), "scienceqa", "problems.json"),
                                    os.path.join(base(), "scienceqa", "pid_splits.json"), base())
    elif name == "vqav2":
      if b.vqav2.questions:
        qs = scorers.load_vqav2(b.vqav2.questions, b.vqav2.annotations or None,
                                need(name, "image_folder", b.vqav2.image_folder))
      else:
        qs = scorers.load_vqav2(os.path.join(base(), "vqa", "questions.json"),
                                os.path.join(base(), "vqa", "annotations.json"), base())
    elif name == "gqa":
      if b.gqa.questions:
        qs = scorers.load_gqa(b.gqa.questions, need(name, "image_folder", b.gqa.image_folder))
      else:
        qs = scorers.load_gqa(os.path.join(base(), "gqa", "testdev_balanced_questions.json"),
                              base())
    elif name == "mme":
      qs = scorers.load_mme(need(name, "root", b.mme.root))
    elif name in ("textvqa", "vizwiz"):
      sub = b[name]
      qs = scorers.BENCHMARKS[name].load(need(name, "json", sub.json),
                                         need(name, "image_folder", sub.image_folder))
    elif name == "mmbench":
      tsv = need(name, "tsv", b.mmbench.tsv)
      qs = scorers.load_mmbench(tsv, os.path.join(workdir, "mmbench_images"), b.mmbench.circular)
    if limit:
      qs = qs[:limit]
    if not qs:
      raise ValueError(f"benchmark {name}: no questions were loaded")
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
                              "answer": q.answer if isinstance(q.answer, (str, int)) else None})
                  + "\n")
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

def _total_gflops(entry) -> float:
  return entry["flops"]["prefill"] / 1e9


def format_results(results: dict) -> str:
  ms = results["ms"]
  per = results["per_m"]
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


def plot(results: dict, out_dir: str) -> list[str]:
  """accuracy_vs_m.png and accuracy_vs_flops.png: one panel per benchmark."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  ms = results["ms"]
  per = results["per_m"]
  names = results["benchmarks"]
  paths = []
  for kind in ("m", "flops"):
    cols = min(3, len(names))
    rows = int(math.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
      metric = results["headline"][name]
      x = ms if kind == "m" else [_total_gflops(per[m]) for m in ms]
      y = [per[m]["benchmarks"][name][metric] for m in ms]
      ax.plot(x, y, "o-", color="C0")
      for xi, yi, m in zip(x, y, ms):
        ax.annotate(f"{m}", (xi, yi), textcoords="offset points", xytext=(3, 4), fontsize=7)
      ax.set_xscale("log", base=2 if kind == "m" else 10)
      ax.set_xlabel("visual tokens m" if kind == "m" else "prefill GFLOPs per image")
      ax.set_ylabel(metric)
      if all(0.0 <= v <= 1.0 for v in y):
        ax.set_ylim(0.0, 1.02)  # Rates on their full scale: noise does not look like a trend.
      ax.set_title(name)
      ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
      ax.axis("off")
    fig.suptitle(f"accuracy against {'m' if kind == 'm' else 'FLOPs'} "
                 f"({os.path.basename(os.path.dirname(results['checkpoint'])) or 'model'})")
    fig.tight_layout()
    path = os.path.join(out_dir, f"accuracy_vs_{kind}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths
