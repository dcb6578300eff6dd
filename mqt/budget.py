"""A compute budget -> m, the number of visual tokens (1 <= m <= M).

Two budgets, each per sample (one image and its question, batch 1):

  FLOPs    the analytic FLOPs of one generation (mqt/flops.py): the prompt pass at m plus
           max_new_tokens decoded tokens, the most a generation can cost. The chosen m is
           the largest whose FLOPs fit; FLOPs grow with m, but every m is checked.
  latency  milliseconds, from a latency table measured on this machine (`measure_latency`,
           the latency.py command): the median wall time of one generation at batch 1 that
           decodes exactly max_new_tokens tokens, per measured m. Between measured m the
           latency is interpolated linearly; above the largest measured m and below the
           smallest nothing is assumed, so only measured ranges are chosen from.

A budget that not even m = 1 (or the smallest measured m) fits is a BudgetError naming
the budget and that cost. The table is JSON beside the checkpoint (`table_path`); loading
a table measured on another device, or a missing or corrupt one, is a ValueError naming
the file.
"""
import dataclasses
import datetime
import json
import math
import os
import time

import jax
import numpy as np

from mqt import flops as flops_lib
from mqt import generate as gen
from mqt import inference
from mqt import matryoshka
from mqt import paths

_KEYS = ("device", "text_len", "max_new_tokens", "batch_size", "ms")
MEASURE_PROMPT = "Describe the image in detail."  # The timed question (padded to text_len).


class BudgetError(ValueError):
  """A budget that cannot be met, or a malformed budget request; one line."""


def _check_budget(value, what: str, unit: str = "") -> float:
  """A positive finite number, else BudgetError naming it."""
  try:
    x = float(value)
  except (TypeError, ValueError):
    raise BudgetError(f"{what} {value!r} is not a number") from None
  if not math.isfinite(x) or x <= 0:
    raise BudgetError(f"{what} {value!r}{unit} must be a positive finite number")
  return x


def sample_flops(model_cfg, m: int, text_len: int, max_new_tokens: int) -> int:
  """Analytic FLOPs of one sample at m: the prompt pass plus max_new_tokens decoded
  tokens (batch 1; a generation that runs to its token limit, the worst case)."""
  f = flops_lib.flops_per_m(model_cfg, text_len, m, max_new_tokens)
  return int(f["prefill"] + max_new_tokens * f["llm_decode_per_token"])


def _num_queries(model_cfg) -> int:
  return int(model_cfg.query.num_queries)


def m_for_flops(model_cfg, flops_budget: float, text_len: int, max_new_tokens: int) -> int:
  """The largest m in 1..M whose `sample_flops` fit `flops_budget` (every m checked);
  BudgetError when m = 1 does not fit or the budget is not a positive number."""
  budget = _check_budget(flops_budget, "FLOPs budget")
  fits = [m for m in range(1, _num_queries(model_cfg) + 1)
          if sample_flops(model_cfg, m, text_len, max_new_tokens) <= budget]
  if not fits:
    cost = sample_flops(model_cfg, 1, text_len, max_new_tokens)
    raise BudgetError(f"FLOPs budget {budget:.4g} is below the {cost:.4g} FLOPs of one sample "
                      f"at m=1 (prompt {text_len} tokens, {max_new_tokens} new tokens)")
  return max(fits)


def flag_problems(flops_budget, latency_budget_ms, latency_table: str) -> list[str]:
  """The budget flags of a command (--flops_budget, --latency_budget_ms, --latency_table):
  each budget a positive finite number; a table only beside a latency budget."""
  problems = [f"--{name}={value:g} must be a positive number"
              for name, value in (("flops_budget", flops_budget),
                                  ("latency_budget_ms", latency_budget_ms))
              if value is not None and not (math.isfinite(value) and value > 0)]
  if latency_table and latency_budget_ms is None:
    problems.append(f"--latency_table={latency_table} is read only with --latency_budget_ms")
  return problems


def device_name() -> str:
  """This process's first device: platform and kind, the device count, and for a CPU
  the host's cores (e.g. "cpu cpu x8, 2 cores", "gpu NVIDIA H100 80GB HBM3 x1")."""
  d = jax.devices()[0]
  name = f"{d.platform} {d.device_kind} x{jax.device_count()}"
  return name + (f", {os.cpu_count()} cores" if d.platform == "cpu" else "")


@dataclasses.dataclass(frozen=True)
class LatencyTable:
  """Median milliseconds of one generation at batch 1 per measured m."""
  device: str            # `device_name()` where it was measured; checked on load.
  text_len: int          # Prompt tokens it was measured at.
  max_new_tokens: int    # Every measured generation decoded exactly this many tokens.
  batch_size: int        # 1.
  ms: dict               # {m: milliseconds}, sorted by m.
  checkpoint: str = ""   # The checkpoint measured.
  measured_at: str = ""  # UTC time, ISO 8601.
  path: str = dataclasses.field(default="", compare=False)  # The file it was loaded from.

  def _where(self) -> str:
    return f"latency table {self.path}" if self.path else "the latency table"

  def latency_at(self, m: int) -> float:
    """Milliseconds at m: measured, or linearly interpolated between the measured m around
    it; ValueError outside the measured range."""
    known = sorted(self.ms)
    if not known[0] <= m <= known[-1]:
      raise ValueError(f"m={m} lies outside the measured m {known[0]}..{known[-1]} of "
                       f"{self._where()}")
    if m in self.ms:
      return float(self.ms[m])
    hi = next(k for k in known if k > m)
    lo = max(k for k in known if k < m)
    w = (m - lo) / (hi - lo)
    return float(self.ms[lo] * (1 - w) + self.ms[hi] * w)

  def m_for(self, budget_ms: float, num_queries: int) -> int:
    """The largest m (within the measured range, <= num_queries) whose latency fits
    `budget_ms`; BudgetError when not even the smallest measured m fits."""
    budget = _check_budget(budget_ms, "latency budget", " ms")
    known = sorted(self.ms)
    if known[-1] > num_queries:
      raise ValueError(f"{self._where()} holds m={known[-1]}, more than this model's "
                       f"M={num_queries}: it was measured for another model")
    fits = [m for m in range(known[0], known[-1] + 1) if self.latency_at(m) <= budget]
    if not fits:
      raise BudgetError(f"latency budget {budget:g} ms is below the "
                        f"{self.ms[known[0]]:.4g} ms measured at m={known[0]}, the smallest "
                        f"m of {self._where()}")
    return max(fits)

  def to_json(self) -> dict:
    return {"device": self.device, "text_len": self.text_len,
            "max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
            "ms": {str(m): v for m, v in sorted(self.ms.items())},
            "checkpoint": self.checkpoint, "measured_at": self.measured_at}

  def save(self, path: str) -> str:
    """Writes the table as JSON (atomically). -> path."""
    paths.write_text_atomic(path, json.dumps(self.to_json(), indent=1) + "\n")
    return path

  @classmethod
  def load(cls, path: str, device: str | None = None) -> "LatencyTable":
    """Reads a table; ValueError naming `path` when it is missing, corrupt, or measured
    on a device other than `device` (default: this process's `device_name()`)."""
    if not paths.isfile(path):
      raise ValueError(f"no latency table at {path}: measure one with `python latency.py "
                       f"--config=... --workdir=...`")
    try:
      with paths.open(path) as f:
        raw = json.load(f)
      missing = [k for k in _KEYS if k not in raw]
      if missing:
        raise ValueError(f"it lacks {', '.join(missing)}")
      table = cls(device=str(raw["device"]), text_len=int(raw["text_len"]),
                  max_new_tokens=int(raw["max_new_tokens"]),
                  batch_size=int(raw["batch_size"]),
                  ms={int(m): float(v) for m, v in sorted(raw["ms"].items(),
                                                          key=lambda kv: int(kv[0]))},
                  checkpoint=str(raw.get("checkpoint", "")),
                  measured_at=str(raw.get("measured_at", "")), path=path)
      if not table.ms or min(table.ms) < 1 or not all(
          math.isfinite(v) and v > 0 for v in table.ms.values()):
        raise ValueError("its ms must map m >= 1 to positive milliseconds")
    except (ValueError, TypeError, AttributeError, OSError) as e:
      raise ValueError(f"latency table {path} is not a valid table ({e}): measure it again "
                       f"with `python latency.py`") from None
    here = device_name() if device is None else device
    if table.device != here:
      raise ValueError(f"latency table {path} was measured on {table.device}, not on this "
                       f"machine's {here}: measure one here with `python latency.py`")
    return table


def table_path(checkpoint: str, workdir: str) -> str:
  """Where the latency table of a checkpoint lives: "<checkpoint>/latency.json" for an
  orbax checkpoints folder, "<workdir>/latency_hf.json" for imported HF weights ("hf")."""
  if checkpoint == "hf":
    return paths.join(workdir, "latency_hf.json")
  return paths.join(checkpoint, "latency.json")


def timing_sampling(pad_id: int, max_new_tokens: int) -> gen.SamplingConfig:
  """Greedy decoding that never stops early: eos_id = -1, a token no model emits, so every
  generation decodes exactly max_new_tokens tokens."""
  return gen.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0,
                            eos_id=-1, pad_id=pad_id)


def measure_latency(loaded, ms, text_len: int, max_new_tokens: int, repeats: int = 3,
                    progress=None) -> LatencyTable:
  """Times one generation at batch 1 per m in `ms` (one program each, compiled first):
  a blank image and `MEASURE_PROMPT` padded to text_len tokens, exactly max_new_tokens
  decoded tokens; the median of `repeats` runs after a warm-up. progress(m, ms): called
  after each m."""
  big_m = _num_queries(loaded.model_cfg)
  ms = sorted({matryoshka.validate_m(int(m), big_m) for m in ms})
  if not ms:
    raise ValueError("no m to measure")
  if repeats < 1:
    raise ValueError(f"repeats must be >= 1, got {repeats}")
  tok = loaded.tokenizer
  prompt = inference.encode_prompt(MEASURE_PROMPT, tok, True, loaded.template)
  if len(prompt) > text_len:
    raise ValueError(f"text_len={text_len} is shorter than the {len(prompt)} tokens of the "
                     f"timed prompt")
  ids, mask = inference.pad_prompts([prompt], text_len, max(tok.pad_id, 0))
  size = loaded.model_cfg.vision.image_size
  images = np.zeros((1, size, size, 3), np.float32)
  sampling = timing_sampling(max(tok.pad_id, 0), max_new_tokens)
  out = {}
  for m in ms:
    runner = inference.Answerer(loaded, m, 1, text_len, sampling)
    runner(images, ids, mask)  # Warm-up.
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      runner(images, ids, mask)
      times.append(time.perf_counter() - t0)
    out[m] = float(np.median(times)) * 1e3
    if progress is not None:
      progress(m, out[m])
  stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
  return LatencyTable(device=device_name(), text_len=text_len, max_new_tokens=max_new_tokens,
                      batch_size=1, ms=out, checkpoint=loaded.checkpoint, measured_at=stamp)


def choose_m(model_cfg, text_len: int, max_new_tokens: int, *, m=None, flops_budget=None,
             latency_budget_ms=None, table: LatencyTable | None = None) -> tuple[int, str]:
  """Exactly one of m / flops_budget / latency_budget_ms (the latency one needs `table`,
  measured decoding at least max_new_tokens tokens) -> (m, one line saying why). A prompt
  longer than the table's, or fewer new tokens, is noted in the line. BudgetError for none
  or several, a bad m, a table of fewer new tokens, or a budget that cannot be met."""
  given = {k: v for k, v in (("m", m), ("flops_budget", flops_budget),
                             ("latency_budget_ms", latency_budget_ms)) if v is not None}
  if len(given) != 1:
    got = ", ".join(f"{k}={v}" for k, v in given.items()) or "none"
    raise BudgetError(f"give exactly one of m, flops_budget, latency_budget_ms (got {got})")
  big_m = _num_queries(model_cfg)
  cost = lambda k: sample_flops(model_cfg, k, text_len, max_new_tokens)
  shape = f"prompt {text_len} tokens, up to {max_new_tokens} new tokens"
  if m is not None:
    try:
      m = matryoshka.validate_m(m, big_m)
    except ValueError as e:
      raise BudgetError(str(e)) from None
    return m, f"m={m}: as asked ({cost(m):.4g} FLOPs per sample, {shape})"
  if flops_budget is not None:
    chosen = m_for_flops(model_cfg, flops_budget, text_len, max_new_tokens)
    which = "the largest m (= M)" if chosen == big_m else "the largest m"
    return chosen, (f"m={chosen}: {which} whose {cost(chosen):.4g} FLOPs per sample fit the "
                    f"budget {float(flops_budget):.4g} ({shape})")
  if table is None:
    raise BudgetError("a latency budget needs a latency table (measure one with "
                      "`python latency.py`)")
  if max_new_tokens > table.max_new_tokens:
    raise BudgetError(f"{table._where()} was measured decoding {table.max_new_tokens} tokens, "
                      f"but this run decodes up to {max_new_tokens}: measure one with "
                      f"`python latency.py --max_new_tokens={max_new_tokens}`")
  chosen = table.m_for(latency_budget_ms, big_m)
  how = "measured" if chosen in table.ms else "interpolated"
  which = ("the largest m (= M)" if chosen == big_m else "the largest measured m"
           if chosen == max(table.ms) else "the largest m")
  note = (f"; this prompt has {text_len} tokens, more than the table's {table.text_len}: "
          f"the latency is underestimated" if text_len > table.text_len else "")
  if max_new_tokens < table.max_new_tokens:
    note += (f"; this run decodes up to {max_new_tokens} tokens, fewer than the table's "
             f"{table.max_new_tokens}: the latency is overestimated")
  return chosen, (f"m={chosen}: {which} whose {table.latency_at(chosen):.4g} ms "
                  f"({how}; batch 1, prompt {table.text_len} tokens, {table.max_new_tokens} "
                  f"new tokens, {table.device}) fits the budget "
                  f"{float(latency_budget_ms):g} ms{note}")
