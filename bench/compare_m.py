r"""Matryoshka training against fixed-m training, on the same data and budget.

  python -m bench.compare_m --root=/tmp/mqt_compare

Trains and evaluates, from one config (`--train_config`, default configs/tiny.py):
  matryoshka   the config as it is: its last stage draws m at random each step,
               `--seeds` seeds;
  fixed        the same recipe with every stage at m = M
               (`stageN.matryoshka.kind=fixed`), evaluated at every m (the
               visual tokens truncated to the first m), `--seeds` seeds;
  specialist   the same recipe with the last stage at one fixed m, for each m of
               `--specialists` (the specialist at m = M is `fixed`), first seed;
  ablations    first seed: the last stage's m drawn as the paper does (`official`:
               even numbers 2..M) and log-uniformly (`log_uniform`), the perceiver
               query transformer (content keys; its own earlier stages), and
               `frozen_query`: the query transformer frozen in the last stage, so
               only the LLM learns under random m (the config's `train_query=false`
               knob, which configs/tiny.py has).

Every stage but the last trains at m = M in the config (the command checks), so
those stages are trained once per seed (and per query variant) and every run of
that seed continues from them (`stageN.init_from`): the runs differ only where
their recipes differ. All runs share one prepared copy of the built-in data
(`<root>/data`). Other data: pass the same overrides train.py takes with
--shared, e.g. --shared=--config.stage2.data.json_path=... (every run gets them).

Writes <root>/results.json (every run's accuracy per question type and m, with
counts), <root>/table.md (mean accuracy over the question types of `--table_types`, with
standard errors, per m; the m = M specialist is the fixed model), and
<root>/accuracy_vs_m.png (accuracy against m and against FLOPs per sample).
Prints the wall time, CPU time of the runs and the load average before and after.
A second call with the same --root keeps the runs that finished (their
summary.json) and continues the others (train.py resumes from its workdir);
--report_only only tabulates.
"""
import contextlib
import json
import math
import os
import resource
import sys
import time

from absl import app
from absl import flags

from bench import sweep
from mqt import cli

# --root, --train_config, --parallel and --shared are bench.sweep's flags (one definition).
_ROOT, _CONFIG, _PARALLEL, _SHARED = sweep._ROOT, sweep._CONFIG, sweep._PARALLEL, sweep._SHARED  # pylint: disable=protected-access
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Seeds of the matryoshka and fixed runs.")
_SPECIALISTS = flags.DEFINE_list("specialists", ["1", "2", "4"],
                                 "m of the fixed-m specialists (M itself is the fixed run).")
_ABLATIONS = flags.DEFINE_list("ablations", ["official", "log_uniform", "perceiver",
                                             "frozen_query"],
                               "Ablations at the first seed: any of official, log_uniform, "
                               "perceiver, frozen_query; empty for none.")
_TYPES = flags.DEFINE_list("table_types", [], "Question types averaged in the table and plot "
                           "(default: the types the matryoshka runs learn: above their "
                           "image-blind chance by more than 3 standard errors at m = M).")
_DRY = flags.DEFINE_bool("plan_only", False, "Print the runs and their commands, run nothing.")
_REPORT = flags.DEFINE_bool("report_only", False, "Train nothing: tabulate and plot the runs "
                            "already under --root.")

ABLATIONS = ("official", "log_uniform", "perceiver", "frozen_query")


def with_knob(config_path: str, knob: str) -> str:
  """configs/x.py[:a=b] + "k=v" -> configs/x.py:a=b,k=v."""
  return config_path + ("," if ":" in config_path else ":") + knob


def _load_config(path: str, shared=()):
  """The recipe's ConfigDict (path may carry `:knobs`) with the --config.* overrides of
  `shared` applied (the values as train.py would read them: literals, else strings).
  An override of a field the config lacks is a ValueError naming it."""
  import ast  # pylint: disable=import-outside-toplevel
  config = cli.load_config_file(path)
  for arg in shared:
    if not arg.startswith("--config."):
      continue
    key, _, text = arg[len("--config."):].partition("=")
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      node = node.get(part) if hasattr(node, "get") else None
    if node is None or not hasattr(node, "get") or leaf not in node:
      raise ValueError(f"--shared={arg}: the config has no field {key}")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    with node.unlocked() if hasattr(node, "unlocked") else contextlib.nullcontext():
      node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], (int, float, str)) \
          and not isinstance(node[leaf], bool) else value
  return config


def plan(config, config_path: str, root: str, seeds, specialists, ablations,
         shared=()) -> tuple[dict, dict]:
  """-> (earlier-stage runs, last-stage runs): {name: [train.py argument, ...]}.

  Raises ValueError when an earlier stage does not train at m = M, or an m is out of
  range, naming it."""
  stages = [int(x) for x in str(config.run_stages).split(",") if x.strip()]
  big_m = int(config.model.query.num_queries)
  last, earlier = stages[-1], stages[:-1]
  for n in earlier:
    mk = config[f"stage{n}"].matryoshka
    if mk.kind != "fixed" or int(mk.m) not in (0, big_m):
      raise ValueError(f"stage{n} samples m ({mk.kind}, m={mk.m}): this comparison trains "
                       f"the stages before the last once and shares them, so they must run "
                       f"at m = M (matryoshka.kind=fixed, m=0)")
  for m in specialists:
    if not 1 <= m <= big_m:
      raise ValueError(f"--specialists: m={m} is out of range 1..M={big_m}")
  unknown = sorted(set(ablations) - set(ABLATIONS))
  if unknown:
    raise ValueError(f"--ablations: unknown {unknown}; known: {list(ABLATIONS)}")
  data = [f"--config.data.data_dir={os.path.join(root, 'data')}", *shared]
  perceiver_path = with_knob(config_path, "variant=perceiver")
  pre = {}
  if earlier:
    prep = [f"--config.run_stages={','.join(map(str, earlier))}", "--config.eval.ms=()"]
    for s in seeds:
      pre[f"early_seed{s}"] = [f"--config={config_path}", f"--config.seed={s}", *prep, *data]
    if "perceiver" in ablations:
      pre["early_perceiver"] = [f"--config={perceiver_path}", f"--config.seed={seeds[0]}",
                                *prep, *data]

  def last_stage(early: str, seed: int, cfg_path: str, *extra) -> list[str]:
    args = [f"--config={cfg_path}", f"--config.seed={seed}", *data]
    if earlier:
      ckpt = os.path.join(root, early, f"stage{earlier[-1]}", "checkpoints")
      args += [f"--config.run_stages={last}", f"--config.stage{last}.init_from={ckpt}"]
    return args + list(extra)

  kind = f"--config.stage{last}.matryoshka.kind"
  fixed = [f"{kind}=fixed", f"--config.stage{last}.matryoshka.m=0"]
  runs = {}
  for s in seeds:
    runs[f"matryoshka_seed{s}"] = last_stage(f"early_seed{s}", s, config_path)
    runs[f"fixed_seed{s}"] = last_stage(f"early_seed{s}", s, config_path, *fixed)
  s0 = seeds[0]
  for m in specialists:
    if m != big_m:
      runs[f"specialist_m{m}"] = last_stage(f"early_seed{s0}", s0, config_path, f"{kind}=fixed",
                                            f"--config.stage{last}.matryoshka.m={m}")
  for name in ("official", "log_uniform"):
    if name in ablations:
      runs[name] = last_stage(f"early_seed{s0}", s0, config_path, f"{kind}={name}")
  if "perceiver" in ablations:
    runs["perceiver"] = last_stage("early_perceiver", s0, perceiver_path)
  if "frozen_query" in ablations:  # Stage 1 is the same: only the last stage's rules differ.
    runs["frozen_query"] = last_stage(f"early_seed{s0}", s0,
                                      with_knob(config_path, "train_query=false"))
  return pre, runs


def read_eval(workdir: str) -> dict | None:
  """A run's held-out evaluation from its summary.json, or None."""
  path = os.path.join(workdir, "summary.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    ev = json.load(f).get("eval")
  if not ev or "accuracy" not in ev:
    return None
  return {"ms": [int(m) for m in ev["ms"]], "count": ev["count"], "chance": ev.get("chance", {}),
          "accuracy": {t: {int(m): a for m, a in row.items()} for t, row in ev["accuracy"].items()}}


def blind_chance(json_path: str) -> dict:
  """{type: accuracy of answering each type's most frequent answer}, from held-out LLaVA
  records that carry "type" and "answer" (an image-blind guesser that knows the
  answers' frequencies); {} when the records do not."""
  import collections  # pylint: disable=import-outside-toplevel
  with open(json_path) as f:
    records = json.load(f)
  by_type = collections.defaultdict(collections.Counter)
  for r in records:
    if not isinstance(r, dict) or "type" not in r or "answer" not in r:
      return {}
    by_type[r["type"]][str(r["answer"])] += 1
  return {t: max(c.values()) / sum(c.values()) for t, c in by_type.items()}


def learned_types(evals: dict, seeds, chance: dict, big_m: int) -> tuple[list, dict]:
  """Types whose matryoshka runs beat chance at m = M by more than 3 standard errors
  (of the mean over seeds). -> (learned, {other type: (accuracy, chance, se)})."""
  runs = [evals[f"matryoshka_seed{s}"] for s in seeds if f"matryoshka_seed{s}" in evals]
  learned, other = [], {}
  for t in sorted(runs[0]["accuracy"]):
    c = combine([mean_over_types(e, [t], big_m) for e in runs])
    acc, se, ch = c["mean"], c["se"], chance.get(t)
    if ch is not None and acc - ch > 3 * max(se, 1e-9):
      learned.append(t)
    else:
      other[t] = (acc, ch, se)
  return learned, other


def mean_over_types(ev: dict, types, m: int) -> tuple[float, float]:
  """(mean accuracy over `types` at m, its binomial standard error)."""
  ps = [(ev["accuracy"][t][m], ev["count"][t]) for t in types]
  mean = sum(p for p, _ in ps) / len(ps)
  se = math.sqrt(sum(p * (1 - p) / n for p, n in ps)) / len(ps)
  return mean, se


def combine(values) -> dict:
  """Seeds of one recipe at one m: [(mean, se)] -> mean, its binomial SE, and the
  spread over seeds (half the range)."""
  means = [v for v, _ in values]
  return {"mean": sum(means) / len(means),
          "se": math.sqrt(sum(se * se for _, se in values)) / len(values),
          "spread": (max(means) - min(means)) / 2, "n_seeds": len(values)}


def aggregate(evals: dict, seeds, specialists, big_m: int, types=None) -> dict:
  """{recipe: {m: combine(...)}} over the runs that finished; specialists keyed by m."""
  any_ev = next(iter(evals.values()))
  ms = any_ev["ms"]
  types = list(types) or sorted(any_ev["accuracy"])
  out = {"ms": ms, "types": types, "recipes": {}}
  for recipe in ("matryoshka", "fixed"):
    runs = [evals[f"{recipe}_seed{s}"] for s in seeds if f"{recipe}_seed{s}" in evals]
    if runs:
      out["recipes"][recipe] = {m: combine([mean_over_types(e, types, m) for e in runs])
                                for m in ms}
  spec = {}
  for m in sorted(set(specialists) | {big_m}):  # The fixed run is the specialist at M.
    name = f"specialist_m{m}" if m != big_m else f"fixed_seed{seeds[0]}"
    if name in evals and m in ms:
      spec[m] = combine([mean_over_types(evals[name], types, m)])
  out["specialists"] = spec
  for name in ABLATIONS:
    if name in evals:
      out["recipes"][name] = {m: combine([mean_over_types(evals[name], types, m)]) for m in ms}
  return out


def _cell(c: dict | None) -> str:
  if c is None:
    return "-"
  text = f"{c['mean']:.3f} ± {c['se']:.3f}"
  return text + (f" (±{c['spread']:.3f})" if c["n_seeds"] > 1 else "")


def format_markdown(agg: dict, gflops: dict, chance: float | None) -> str:
  ms = agg["ms"]
  lines = [f"mean accuracy over {', '.join(agg['types'])}" + (f" (chance {chance:.3f})"
                                                              if chance is not None else ""),
           "", "| recipe | " + " | ".join(f"m={m}" for m in ms) + " |",
           "|---|" + "---|" * len(ms),
           "| GFLOPs per sample | " + " | ".join(f"{gflops[m]:.4f}" for m in ms) + " |"]
  for recipe, row in agg["recipes"].items():
    lines.append(f"| {recipe} | " + " | ".join(_cell(row.get(m)) for m in ms) + " |")
  lines.append("| specialist (trained at that m) | "
               + " | ".join(_cell(agg["specialists"].get(m)) for m in ms) + " |")
  if "matryoshka" in agg["recipes"]:
    mat = agg["recipes"]["matryoshka"]
    if "fixed" in agg["recipes"]:
      fixed = agg["recipes"]["fixed"]
      lines.append("| matryoshka - fixed | " + " | ".join(
          f"{mat[m]['mean'] - fixed[m]['mean']:+.3f}" for m in ms) + " |")
    lines.append("| matryoshka - specialist | " + " | ".join(
        f"{mat[m]['mean'] - agg['specialists'][m]['mean']:+.3f}" if m in agg["specialists"]
        else "-" for m in ms) + " |")
  lines += ["", "± : binomial standard error of the mean over question types; (±x): half the "
            "range over seeds."]
  return "\n".join(lines)


def plot(agg: dict, gflops: dict, chance: float | None, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  ms = agg["ms"]
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  styles = {"matryoshka": ("C0", "-", "o"), "fixed": ("C3", "-", "s"),
            "official": ("C2", "--", "^"), "log_uniform": ("C4", "--", "v"),
            "perceiver": ("C1", ":", "D"), "frozen_query": ("C7", "-.", "x")}
  for ax, xs, label in ((axes[0], {m: m for m in ms}, "visual tokens m"),
                        (axes[1], gflops, "GFLOPs per sample (prefill)")):
    for recipe, row in agg["recipes"].items():
      color, ls, marker = styles.get(recipe, ("k", "-", "."))
      ax.errorbar([xs[m] for m in ms], [row[m]["mean"] for m in ms],
                  yerr=[max(row[m]["se"], row[m]["spread"]) for m in ms], color=color,
                  linestyle=ls, marker=marker, capsize=3, label=recipe)
    sp = agg["specialists"]
    if sp:
      ax.errorbar([xs[m] for m in sp], [sp[m]["mean"] for m in sp],
                  yerr=[sp[m]["se"] for m in sp], color="k", linestyle="none", marker="*",
                  markersize=10, capsize=3, label="specialist at m")
    if chance is not None:
      ax.axhline(chance, color="grey", linestyle=":", label="image-blind chance")
    ax.set_xlabel(label)
    ax.set_ylabel("held-out accuracy (mean over types)")
    ax.grid(alpha=0.3)
  axes[0].set_xscale("log", base=2)
  axes[0].set_xticks(ms, [str(m) for m in ms])
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def report(root: str, config, runs, seeds, specialists, types=(), machine: str = "",
           results=None) -> str:
  """Reads the runs' evaluations under root; writes table.md, results.json and
  accuracy_vs_m.png; -> the table."""
  big_m = int(config.model.query.num_queries)
  evals = {name: read_eval(os.path.join(root, name)) for name in runs}
  evals = {k: v for k, v in evals.items() if v}
  if not evals:
    raise SystemExit(f"compare_m: no run has an evaluation (logs under {root})")
  chance_by_type = dict(next(iter(evals.values()))["chance"])
  if not chance_by_type and config.eval.data.get("json_path"):
    chance_by_type = blind_chance(config.eval.data.json_path)
  types, dropped = list(types), {}
  if not types:
    types, dropped = learned_types(evals, seeds, chance_by_type, big_m)
    if not types:
      raise SystemExit("compare_m: no question type is above chance; pass --table_types")
  agg = aggregate(evals, seeds, specialists, big_m, types)
  from mqt import flops as flops_lib  # pylint: disable=import-outside-toplevel
  text_len = int(config.data.max_len) - big_m + 1
  gflops = {m: flops_lib.flops_per_m(config.model, text_len, m)["prefill"] / 1e9
            for m in agg["ms"]}
  chances = [chance_by_type.get(t) for t in agg["types"]]
  chance = sum(chances) / len(chances) if all(c is not None for c in chances) else None
  table = format_markdown(agg, gflops, chance)
  if dropped:
    table += "\n\nLeft out (not above chance at m = M in the matryoshka runs): " + "; ".join(
        f"{t} {a:.3f} ± {se:.3f}" + (f" (chance {c:.3f})" if c is not None else "")
        for t, (a, c, se) in dropped.items())
  with open(os.path.join(root, "results.json"), "w") as f:
    json.dump({"runs": {n: {**(results or {}).get(n, {}), "eval": evals.get(n)} for n in runs},
               "aggregate": agg, "gflops": gflops, "text_len": text_len, "chance": chance,
               "chance_by_type": chance_by_type, "left_out": dropped, "machine": machine},
              f, indent=1, default=str)
  with open(os.path.join(root, "table.md"), "w") as f:
    f.write(table + f"\n\nGFLOPs: analytic prefill FLOPs per sample (matmuls, multiply-add "
            f"= 2) at T = {text_len} text tokens.\n{machine}\n")
  plot(agg, gflops, chance, os.path.join(root, "accuracy_vs_m.png"))
  return table


def main(argv):
  del argv
  t0, load0 = time.time(), os.getloadavg()
  root = os.path.abspath(_ROOT.value)
  seeds = [int(s) for s in _SEEDS.value]
  specialists = [int(m) for m in _SPECIALISTS.value]
  try:
    config = _load_config(_CONFIG.value, _SHARED.value)
    for knob, ablation in (("variant=perceiver", "perceiver"),
                           ("train_query=false", "frozen_query")):
      if ablation in _ABLATIONS.value:
        try:
          _load_config(with_knob(_CONFIG.value, knob))
        except cli.UserError as e:
          raise ValueError(f"--ablations={ablation} needs the config knob {knob}: {e}") from None
    pre, runs = plan(config, _CONFIG.value, root, seeds, specialists,
                     [a for a in _ABLATIONS.value if a], _SHARED.value)
  except (ValueError, cli.UserError) as e:
    raise SystemExit(f"compare_m: {e}") from None
  if _DRY.value:
    for name, args in {**pre, **runs}.items():
      print(name, " ".join(args))
    return
  results, machine = {}, ""
  if _REPORT.value:  # Keep the timing of the run that trained them.
    try:
      with open(os.path.join(root, "results.json")) as f:
        machine = json.load(f).get("machine", "")
    except (OSError, ValueError):
      pass
  else:
    command = lambda name, args: [sys.executable, "train.py",
                                  f"--workdir={os.path.join(root, name)}", *args]
    print(f"compare_m: {len(pre)} earlier-stage runs, then {len(runs)} runs of the last "
          f"stage, {_PARALLEL.value} at a time, under {root}", flush=True)
    for phase in (pre, runs):
      done = [n for n in phase if os.path.exists(os.path.join(root, n, "summary.json"))]
      if done:
        print(f"already finished (kept): {', '.join(done)}", flush=True)
      todo = {n: a for n, a in phase.items() if n not in done}
      if todo:
        results.update(sweep.run_sweep(todo, root, _PARALLEL.value, command))
      failed = sorted(n for n in phase if "failed" in results.get(n, {}))
      if failed:
        print(f"failed: {', '.join(failed)} (logs under {root})")
        sys.exit(1)
    wall, load1 = time.time() - t0, os.getloadavg()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    machine = (f"wall {wall / 60:.1f} min, CPU time of the runs "
               f"{(usage.ru_utime + usage.ru_stime) / 60:.1f} min ({os.cpu_count()} cores), "
               f"load average {load0[0]:.2f} before, {load1[0]:.2f} after")
  table = report(root, config, runs, seeds, specialists, _TYPES.value, machine, results)
  print(table)
  print(machine)
  print(f"wrote {root}/table.md, results.json, accuracy_vs_m.png")


if __name__ == "__main__":
  flags.FLAGS.set_default("root", "/tmp/mqt_compare")
  app.run(main)
