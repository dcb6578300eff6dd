"""Every benchmark the evaluator knows, in the order it reports them.

Each module under mqt/benchmarks/ describes one benchmark (its file format, loader,
prompt, scorer and headline metric) in its `BENCHMARK`; the line below lists them, and
every other list of benchmark names is derived from it: the names --benchmarks accepts,
the built-in ones (those with a built-in synthetic version), the config fields
config.eval.benchmarks.<name>.<field> (mqt/config_lib.py), headline metrics and
baselines. Adding a benchmark: write its module, import it here and add it to the list
(and give the module its BUILD target).
"""
from typing import Sequence

from mqt.benchmarks import baselines as baselines_lib
from mqt.benchmarks import gqa
from mqt.benchmarks import mmbench
from mqt.benchmarks import mme
from mqt.benchmarks import pope
from mqt.benchmarks import scienceqa
from mqt.benchmarks import synthetic
from mqt.benchmarks import textvqa
from mqt.benchmarks import vizwiz
from mqt.benchmarks import vqav2
from mqt.benchmarks.common import Benchmark, Question

REGISTRY = {m.BENCHMARK.name: m.BENCHMARK for m in (
    synthetic, pope, scienceqa, vqav2, gqa, mme, textvqa, vizwiz, mmbench)}


def get(name: str) -> Benchmark:
  """The benchmark `name`; a ValueError lists the known ones."""
  if name not in REGISTRY:
    raise ValueError(f"unknown benchmark {name!r}; known: {', '.join(REGISTRY)}")
  return REGISTRY[name]


def builtin_names() -> tuple[str, ...]:
  """The benchmarks with a built-in synthetic version (what --benchmarks=builtin runs)."""
  return tuple(n for n, b in REGISTRY.items() if b.from_builtin is not None)


def headlines() -> dict[str, str]:
  """name -> the metric that summarises the benchmark."""
  return {n: b.headline for n, b in REGISTRY.items()}


def config_fields() -> dict[str, dict]:
  """name -> {field: default} of config.eval.benchmarks.<name> (benchmarks read from the
  user's files)."""
  return {n: dict(b.fields) for n, b in REGISTRY.items() if b.fields}


def baselines(name: str, questions: Sequence[Question],
              chance: baselines_lib.Chance | None = None) -> dict:
  """{"chance": x, "image_blind": y} for `questions` of benchmark `name`, in its headline
  metric (see mqt/benchmarks/baselines.py); `chance` replaces the benchmark's own."""
  if name not in REGISTRY:
    raise ValueError(f"no baselines for benchmark {name!r}; known: {', '.join(REGISTRY)}")
  return baselines_lib.baselines(REGISTRY[name], questions, chance)
