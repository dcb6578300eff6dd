r"""Run several train.py variants side by side and tabulate their held-out accuracy.

  python -m bench.sweep --spec=sweep.json --parallel=8 --root=/tmp/sweep

sweep.json maps a run name to its overrides, e.g.

  {"base": [],
   "depth4": ["--config.model.llm.depth=4"],
   "depth4_4k": ["--config.model.llm.depth=4", "--config.stage2.steps=4000"]}

Each run is `python train.py --config=<--train_config> --workdir=<root>/<name>` plus
--shared overrides (every run) and its own, its output in <root>/<name>.log.
At most --parallel run at once: on a GPU machine several tiny runs share the
card (eight configs/tiny.py runs on one H200 went at ~30 steps/s each). Every run
prepares its built-in data in its own workdir, so runs never race on a folder.
Prints a line as each run ends and then a table of accuracy per question type
at the largest and smallest evaluated m, from each run's summary.json; writes
<root>/results.json. A run that fails is reported with the end of its log, and
the sweep exits non-zero. Run it from the repository root. A second sweep over
the same --root continues each run from its checkpoints (train.py resumes from
its workdir); give a new --root for fresh runs.
"""
import functools
import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags

_SPEC = flags.DEFINE_string("spec", None, "JSON file: run name -> list of overrides.")
_ROOT = flags.DEFINE_string("root", "/tmp/mqt_sweep", "Workdirs, logs and results.json go here.")
_PARALLEL = flags.DEFINE_integer("parallel", 2, "Runs at once.")
_CONFIG = flags.DEFINE_string("train_config", "configs/tiny.py", "The config file every run "
                              "starts from (train.py --config).")
_SHARED = flags.DEFINE_multi_string("shared", [], "An override for every run (repeat the "
                                    "flag for more), e.g. --shared=--config.checkpoint.every=5000")


def load_spec(path: str) -> dict:
  """The spec file as {name: [override, ...]}; a malformed one is an error naming it."""
  with open(path) as f:
    try:
      spec = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"sweep spec {path}: not JSON ({e})") from None
  if not isinstance(spec, dict) or not spec:
    raise ValueError(f"sweep spec {path}: want a non-empty object of name -> list of overrides")
  for name, args in spec.items():
    if not name or "/" in name or name.startswith("."):
      raise ValueError(f"sweep spec {path}: run name {name!r} is not a plain folder name")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
      raise ValueError(f"sweep spec {path}: run {name!r} wants a list of strings, got {args!r}")
  return spec


def train_command(name: str, overrides, root: str, config: str, shared=()) -> list[str]:
  return [sys.executable, "train.py", f"--config={config}",
          f"--workdir={os.path.join(root, name)}", *shared, *overrides]


def summarize(summary: dict) -> dict:
  """{type: (accuracy at the largest m, at the smallest m)} plus the two m; {} for a run
  without an evaluation."""
  if "accuracy" not in summary.get("eval", {}):
    return {}
  acc = summary["eval"]["accuracy"]
  ms = sorted(int(m) for m in summary["eval"]["ms"])
  hi, lo = str(ms[-1]), str(ms[0])
  return {"m_max": ms[-1], "m_min": ms[0],
          "accuracy": {t: (acc[t][hi], acc[t][lo]) for t in sorted(acc)}}


def run_sweep(spec: dict, root: str, parallel: int, command, poll_s: float = 2.0,
              log=functools.partial(print, flush=True)) -> dict:
  """Runs command(name, overrides) for every run, `parallel` at a time.
  -> {name: {"wall_s", "rc", and "accuracy"... or "failed": log tail}}."""
  os.makedirs(root, exist_ok=True)
  pending, running, results = list(spec.items()), {}, {}
  start = time.time()
  while pending or running:
    while pending and len(running) < parallel:
      name, overrides = pending.pop(0)
      log_path = os.path.join(root, name + ".log")
      with open(log_path, "w") as out:
        proc = subprocess.Popen(command(name, overrides), stdout=out, stderr=subprocess.STDOUT)
      running[name] = (proc, time.time(), log_path)
    time.sleep(poll_s)
    for name, (proc, began, log_path) in list(running.items()):
      if proc.poll() is None:
        continue
      del running[name]
      entry = {"wall_s": round(time.time() - began, 1), "rc": proc.returncode}
      summary_path = os.path.join(root, name, "summary.json")
      if proc.returncode == 0 and os.path.exists(summary_path):
        with open(summary_path) as f:
          entry.update(summarize(json.load(f)))
        status = "done"
      else:
        with open(log_path, errors="replace") as f:
          entry["failed"] = f.read()[-2000:]
        status = f"FAILED (rc {proc.returncode}; {log_path})"
      results[name] = entry
      elapsed, left = time.time() - start, len(spec) - len(results)
      eta = f", ETA {elapsed / len(results) * left / 60:.0f} min" if left else ""
      log(f"[{len(results)}/{len(spec)}] {name}: {status} in {entry['wall_s']:.0f} s "
          f"(sweep {elapsed:.0f} s{eta})")
  return results


def format_table(results: dict) -> str:
  done = {n: r for n, r in results.items() if "accuracy" in r}
  if not done:
    return "no run finished"
  types = sorted({t for r in done.values() for t in r["accuracy"]})
  width = max(len(n) for n in done) + 2
  first = next(iter(done.values()))
  head = f"{'run':{width}s} {'wall':>6s}  " + "  ".join(f"{t[:8]:>9s}" for t in types)
  lines = [f"accuracy at m = {first['m_max']} / m = {first['m_min']}", head, "-" * len(head)]
  for name, r in done.items():
    cells = "  ".join(f"{r['accuracy'][t][0]:.2f}/{r['accuracy'][t][1]:.2f}"
                      if t in r["accuracy"] else f"{'-':>9s}" for t in types)
    lines.append(f"{name:{width}s} {r['wall_s']:5.0f}s  {cells}")
  return "\n".join(lines)


def main(argv):
  del argv
  if not _SPEC.value:
    raise app.UsageError("--spec is required")
  spec = load_spec(_SPEC.value)
  command = lambda name, overrides: train_command(name, overrides, _ROOT.value, _CONFIG.value,
                                                  _SHARED.value)
  results = run_sweep(spec, _ROOT.value, _PARALLEL.value, command)
  with open(os.path.join(_ROOT.value, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  print(format_table(results))
  failed = sorted(n for n, r in results.items() if "failed" in r)
  if failed:
    print(f"failed: {', '.join(failed)} (logs under {_ROOT.value})")
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
