"""How many visual tokens each training step uses (config `matryoshka`).

  official     uniform over the even numbers 2..M, one m for the whole batch
               (stage 2 of the paper)
  uniform      uniform over 1..M
  log_uniform  m = round(exp(U(0, log M))), favouring small m
  fixed        always `m` (stage 1 of the paper: m = M)
  list         every m in `ms` each step, losses averaged

`sample(step)` returns int32 [K] (K = len(ms) for `list`, else 1), drawn on the
host from (seed, step): deterministic, resumable, and data to the jitted step.

Buckets (config `matryoshka.buckets`): the train step is compiled once per bucket
size n, running n latents and T + n - 1 sequence slots, and a step runs in the
smallest bucket that holds its largest m (`bucket`). Without buckets every step runs
all M latents and T + M - 1 slots whatever m is; with them the cost follows m, and
the loss of each sample is the same (the latents past m are masked either way).
"""
import numpy as np

KINDS = ("official", "uniform", "log_uniform", "fixed", "list")


class MSampler:

  def __init__(self, kind: str, num_queries: int, seed: int = 0, m: int = 0,
               ms: tuple[int, ...] = (), buckets: tuple[int, ...] = ()):
    if kind not in KINDS:
      raise ValueError(f"unknown matryoshka kind {kind!r}; choose one of {KINDS}")
    self.kind, self.big_m, self.seed = kind, num_queries, seed
    self.fixed = m or num_queries
    self.ms = tuple(int(x) for x in ms)
    for value in (self.fixed, *self.ms):
      validate_m(value, num_queries)
    if kind == "list" and not self.ms:
      raise ValueError("matryoshka kind 'list' needs a non-empty ms")
    self.buckets = bucket_sizes(buckets, num_queries)

  @property
  def width(self) -> int:
    return len(self.ms) if self.kind == "list" else 1

  def bucket(self, ms) -> int:
    """The smallest bucket size >= max(ms): the latents and visual slots a step runs."""
    top = int(np.max(ms))
    return next(b for b in self.buckets if b >= top)

  def reachable_buckets(self) -> tuple[int, ...]:
    """The buckets a step of this distribution can land in."""
    if self.kind == "fixed":
      return (self.bucket([self.fixed]),)
    if self.kind == "list":
      return (self.bucket(self.ms),)
    support = range(2, self.big_m + 1, 2) if self.kind == "official" and self.big_m > 1 \
        else range(1, self.big_m + 1)
    return tuple(sorted({self.bucket([m]) for m in support}))

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


def bucket_sizes(buckets, num_queries: int) -> tuple[int, ...]:
  """Sorted distinct bucket sizes ending at M (M is added when missing); () gives (M,).
  A size outside 1..M is a ValueError."""
  out = set()
  for b in buckets:
    if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 1 <= b <= num_queries:
      raise ValueError(f"bucket size {b!r} is out of range: each must be an integer in "
                       f"1..M={num_queries}")
    out.add(int(b))
  out.add(num_queries)
  return tuple(sorted(out))


def pow2_buckets(num_queries: int, smallest: int = 1) -> tuple[int, ...]:
  """Powers of two from `smallest` up to M, and M."""
  out, b = [], smallest
  while b < num_queries:
    out.append(b)
    b *= 2
  return tuple(out) + (num_queries,)
