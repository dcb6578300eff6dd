"""Progress lines, TensorBoard event files, a stage's running record and a JSON summary."""
import collections
import json
import time

import numpy as np

from absl import logging

from data import pipeline
from data import records
from mqt import paths


def _fmt_time(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class Progress:
  """A live line: step, loss, m, steps/s, tokens/s, ETA; plus TensorBoard scalars."""

  def __init__(self, workdir: str, name: str, total_steps: int, first_step: int = 0,
               every: int = 10, is_main: bool = True):
    self.name, self.total, self.every, self.is_main = name, total_steps, every, is_main
    self._t0, self._s0 = time.perf_counter(), first_step
    self._last_t, self._last_s, self._tokens = self._t0, first_step, 0
    self.writer = None
    logdir = paths.join(workdir, "tensorboard", name)
    why_not = tensorboard_problem(logdir) if is_main else None
    if why_not:
      print(f"[{name}] no TensorBoard events this run: {why_not}", flush=True)
    elif is_main:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self.writer = SummaryWriter(logdir)

  def update(self, step: int, metrics: dict, tokens: int):
    """step: the number of steps done. metrics: host floats/ints."""
    self._tokens += tokens
    if self.writer is not None:
      for k, v in metrics.items():
        self.writer.add_scalar(k, v, step)
    if step % self.every and step != self.total:
      return
    now = time.perf_counter()
    dt = max(now - self._last_t, 1e-9)
    rate = (step - self._last_s) / dt
    tok_rate = self._tokens / dt
    eta = (self.total - step) / max((step - self._s0) / max(now - self._t0, 1e-9), 1e-9)
    line = (f"[{self.name}] step {step}/{self.total}  loss {metrics['loss']:.4f}  "
            f"m {metrics.get('m', float('nan')):g}  {rate:.2f} steps/s  {tok_rate:,.0f} tok/s  "
            f"ETA {_fmt_time(eta)}")
    for counter in ("skipped", "truncated"):  # Samples never vanish unannounced.
      if metrics.get(counter):
        line += f"  {counter} {int(metrics[counter])}"
    if self.is_main:
      logging.info(line)
      print(line, flush=True)
    self._last_t, self._last_s, self._tokens = now, step, 0

  def close(self):
    if self.writer is not None:
      self.writer.close()


def tensorboard_problem(logdir: str) -> str | None:
  """Why tensorboardX cannot write event files in `logdir`, or None. It writes local
  folders; of URIs only gs:// (with google-cloud-storage installed; it re-uploads the
  whole event file at each flush) and s3:// (with boto3); any other scheme it would
  write as a local folder named like the URI."""
  if not paths.is_uri(logdir):
    return None
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
  scheme = logdir.partition("://")[0]
  if (scheme, True) in (("gs", record_writer.GCS_ENABLED), ("s3", record_writer.S3_ENABLED)):
    return None
  need = {"gs": "google-cloud-storage", "s3": "boto3"}.get(scheme)
  if need:
    return f"tensorboardX writes {logdir} only with {need} installed (pip install {need})"
  return f"tensorboardX cannot write to {scheme}:// ({logdir}); use a local or gs:// workdir"


def write_summary(workdir: str, summary: dict):
  path = paths.join(workdir, "summary.json")
  return paths.write_text_atomic(path, json.dumps(summary, indent=2, sort_keys=True))


LAST_LOSSES = 20  # A stage's final_loss is the mean of its last LAST_LOSSES step losses.


class StageRecord:
  """What a stage's summary needs, kept across resumes (each checkpoint stores `state()`):
  its last LAST_LOSSES losses, the rows skipped and truncated (every occurrence), and
  the data ledger (data.records.Ledger: each unused record once, by reason).

  `log(line)` prints one line the first time a reason of skipped records is met."""

  def __init__(self, ledger, losses=(), skipped: int = 0, truncated: int = 0, log=print):
    self.ledger, self.log = ledger, log
    self.losses = collections.deque((float(x) for x in losses), maxlen=LAST_LOSSES)
    self.skipped, self.truncated = int(skipped), int(truncated)
    self._shared = (self.skipped, self.truncated)  # The counts every process agrees on.

  @classmethod
  def start(cls, source, log=print) -> "StageRecord":
    """A fresh record for `source` (its `total` and the `problems` found on opening it)."""
    record = cls(records.Ledger(source.total), log=log)
    record.add_problems(source.problems)
    return record

  @classmethod
  def from_state(cls, state: dict, source, log=print) -> "StageRecord":
    """The record saved by `state()`; the source's own problems are counted again (each
    record once, so nothing doubles)."""
    record = cls(records.Ledger.from_state(state["ledger"]), state["losses"], state["skipped"],
                 state["truncated"], log=log)
    record.add_problems(source.problems)
    return record

  def state(self) -> dict:
    """JSON-serialisable: {"losses", "skipped", "truncated", "ledger"}."""
    return {"losses": list(self.losses), "skipped": self.skipped, "truncated": self.truncated,
            "ledger": self.ledger.state()}

  def add_problems(self, problems) -> None:
    """Counts unused records (data.records.Problem); logs each new reason once."""
    for problem in problems:
      if self.ledger.add(problem):
        self.log(records.skip_line(problem))

  def add_batch(self, batch: dict) -> None:
    """Counts a batch's skipped (by record and reason) and truncated rows."""
    self.skipped += int(batch["skipped"].sum())
    self.truncated += int(batch["truncated"].sum())
    self.add_problems(pipeline.batch_problems(batch))

  def merge_processes(self, gather) -> None:
    """Makes each process's record the whole run's (several processes each count their
    own rows): the ledgers united, the skipped and truncated rows summed. `gather(obj)`
    -> every process's obj: a collective, so every process calls this at the same step."""
    mine = {"skipped": self.skipped - self._shared[0],
            "truncated": self.truncated - self._shared[1], "ledger": self.ledger.state()}
    parts = gather(mine)
    if len(parts) == 1:
      return
    self.skipped = self._shared[0] + sum(int(p["skipped"]) for p in parts)
    self.truncated = self._shared[1] + sum(int(p["truncated"]) for p in parts)
    self.ledger = records.Ledger.union([p["ledger"] for p in parts])
    self._shared = (self.skipped, self.truncated)

  def add_loss(self, loss: float) -> None:
    self.losses.append(float(loss))

  def final_loss(self) -> float | None:
    """The mean of the last LAST_LOSSES losses (None before any step)."""
    return float(np.mean(list(self.losses))) if self.losses else None

  def summary(self, steps: int) -> dict:
    """The stage's entry of summary.json: steps, final_loss, the ledger's totals under
    "data" (total, used, skipped per reason, skipped_total) and the rows truncated."""
    return {"steps": int(steps), "final_loss": self.final_loss(),
            "data": {**self.ledger.totals(), "truncated_rows": self.truncated}}


def without_timings(summary):
  """A summary less its wall-clock figures (keys ending in "_s" or "time"), for comparing
  runs."""
  if isinstance(summary, dict):
    return {k: without_timings(v) for k, v in summary.items()
            if not (k.endswith("_s") or k.endswith("time"))}
  if isinstance(summary, list):
    return [without_timings(v) for v in summary]
  return summary
