"""Progress lines, TensorBoard event files and a JSON summary."""
import json
import os
import time

from absl import logging


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
    if is_main:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
      self.writer = SummaryWriter(os.path.join(workdir, "tensorboard", name))

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


def write_summary(workdir: str, summary: dict):
  path = os.path.join(workdir, "summary.json")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(summary, f, indent=2, sort_keys=True)
  os.replace(tmp, path)
  return path
