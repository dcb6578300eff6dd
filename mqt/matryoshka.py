"""How many visual tokens each training step uses (config `matryoshka`).

  official     uniform over the even numbers 2..M, one m for the whole batch
               (stage 2 of the paper)
  uniform      uniform over 1..M
  log_uniform  m = round(exp(U(0, log M))), favouring small m
  fixed        always `m` (stage 1 of the paper: m = M)
  list         every m in `ms` each step, losses averaged

`sample(step)` returns int32 [K] (K = len(ms) for `list`, else 1), drawn on the
host from (seed, step): deterministic, resumable, and data to the jitted step.
"""
import numpy as np

KINDS = ("official", "uniform", "log_uniform", "fixed", "list")


class MSampler:

  def __init__(self, kind: str, num_queries: int, seed: int = 0, m: int = 0,
               ms: tuple[int, ...] = ()):
    if kind not in KINDS:
      raise ValueError(f"unknown matryoshka kind {kind!r}; choose one of {KINDS}")
    self.kind, self.big_m, self.seed = kind, num_queries, seed
    self.fixed = m or num_queries
    self.ms = tuple(int(x) for x in ms)
    for value in (self.fixed, *self.ms):
      validate_m(value, num_queries)
    if kind == "list" and not self.ms:
      raise ValueError("matryoshka kind 'list' needs a non-empty ms")

  @property
  def width(self) -> int:
    return len(self.ms) if self.kind == "list" else 1

  def sample(self, step: int) -> np.ndarray:
    rng = np.random.default_rng([self.seed, step])
    if self.kind == "official":
      m = 2 * rng.integers(1, self.big_m // 2 + 1) if self.big_m > 1 else 1
    elif self.kind == "uniform":
      m = rng.integers(1, self.big_m + 1)
    elif self.kind == "log_uniform":
      m = int(np.clip(np.round(np.exp(rng.uniform(0, np.log(self.big_m)))), 1, self.big_m))
    elif self.kind == "fixed":
      m = self.fixed
    else:
      return np.asarray(self.ms, np.int32)
    return np.asarray([m], np.int32)


def validate_m(m, num_queries: int) -> int:
  """1 <= m <= M, else a ValueError naming both."""
  if isinstance(m, bool) or not isinstance(m, (int, np.integer)):
    raise ValueError(f"m must be an integer, got {m!r}")
  if not 1 <= int(m) <= num_queries:
    raise ValueError(f"m={m} is out of range: 1 <= m <= M={num_queries}")
  return int(m)
