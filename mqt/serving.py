"""Serving a trained MQT-LLaVA at any m with a few compiled programs, and batching requests.

`BucketedGenerator` compiles one generation program per bucket size b ahead of time
(`num_latents=b`: the query transformer runs b latents, the prompt has T + b - 1
slots), with each row's m as data (an int32 [batch_size] input). A batch runs in the
smallest bucket that holds its largest m; a row at m < b is masked inside the bigger
program, and masking equals slicing (mqt/generate.py), so every row gets exactly what a
program compiled for its own m alone would give it. Serving any mix of m therefore
compiles nothing after construction, and a batch costs what its bucket costs. Default
buckets: powers of two up to M, and M (`matryoshka.pow2_buckets`).

Rows past the requests of a batch are padding: a zero image, a one-token prompt of the
pad id and m = 1 (finite numbers everywhere; their answers are dropped).

`Batcher` owns a worker thread that serves submitted requests in batches: after the
oldest queued request it waits up to `max_wait_ms` for more, then takes up to
`batch_size` requests (oldest first) whose bucket is at most the oldest one's: smaller
buckets ride along in the larger program, larger ones wait for a batch of their own.
An exception in a batch fails the futures of that batch only; the worker keeps serving.

  loaded = inference.load(config, workdir)
  gen = BucketedGenerator(loaded, None, batch_size=8, text_len=64,
                          sampling=inference.sampling_config(config.eval.generation,
                                                             loaded.tokenizer))
  batcher = Batcher(gen, max_wait_ms=10)
  ids = inference.encode_prompt("What colour is the circle?", loaded.tokenizer, True,
                                loaded.template)
  result = batcher.submit(image, ids, m=4).result()   # Result(text=..., bucket=4, ...)
"""
import collections
import concurrent.futures
import dataclasses
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from mqt import generate as gen
from mqt import inference
from mqt import matryoshka


@dataclasses.dataclass
class Result:
  """One answered request.

  new_tokens: generated tokens (an EOS counted); prompt_tokens: the LLM's prompt slots
  (the text tokens and m visual tokens in place of the image placeholder); queue_s: from
  submission to the start of its batch; compute_s: its batch's generation call;
  batch_size: the requests in that batch; tokens: the generated ids (no EOS);
  finish_reason: "stop" (an EOS ended it) or "length" (the token limit did)."""
  text: str
  m: int
  bucket: int
  new_tokens: int
  prompt_tokens: int
  queue_s: float
  compute_s: float
  batch_size: int
  tokens: tuple = ()
  finish_reason: str = "length"


class BucketedGenerator:
  """Batched generation at any m (1..M), one compiled program per bucket size.

  buckets: the bucket sizes (validated by `matryoshka.bucket_sizes`, M always added);
  None: `matryoshka.pow2_buckets(M)`. compile=False defers compiling to `compile()` (a
  server can report its progress); `ready` says whether every bucket is compiled."""

  def __init__(self, loaded: inference.Loaded, buckets, batch_size: int, text_len: int,
               sampling: gen.SamplingConfig, seed: int = 0, compile: bool = True):
    # pylint: disable=redefined-builtin
    self.loaded, self.sampling, self.seed = loaded, sampling, seed
    self.big_m = loaded.model_cfg.query.num_queries
    self.buckets = (matryoshka.pow2_buckets(self.big_m) if buckets is None
                    else matryoshka.bucket_sizes(buckets, self.big_m))
    for name, value in (("batch_size", batch_size), ("text_len", text_len)):
      if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    self.batch_size, self.text_len = int(batch_size), int(text_len)
    self.pad_id = sampling.pad_id
    self.compile_s = 0.0
    self._programs = {}
    self._lock = threading.Lock()
    self._batches = 0
    if compile:
      self.compile()

  @property
  def ready(self) -> bool:
    """Every bucket's program is compiled."""
    return len(self._programs) == len(self.buckets)

  def compile(self, progress=None) -> None:
    """Compiles every bucket's program not yet compiled; `progress(bucket, seconds)` is
    called after each. Adds the time to `compile_s`."""
    model, sampling, seed = self.loaded.model, self.sampling, self.seed
    cfg = self.loaded.model_cfg
    sds = jax.ShapeDtypeStruct
    shapes = inference.input_shapes(cfg, self.batch_size, self.text_len) + (
        sds((self.batch_size,), jnp.int32), sds((), jnp.int32))
    for bucket in self.buckets:
      if bucket in self._programs:
        continue
      def run(params, images, ids, mask, ms, batch_index, n=bucket):
        rng = jax.random.fold_in(jax.random.key(seed), batch_index)
        return gen.generate(model, params, images, ids, mask, ms, rng, sampling, num_latents=n)
      t0 = time.perf_counter()
      with self.loaded.context():
        self._programs[bucket] = jax.jit(run).lower(self.loaded.params, *shapes).compile(
            inference.compiler_options(cfg))
      seconds = time.perf_counter() - t0
      self.compile_s += seconds
      if progress is not None:
        progress(bucket, seconds)

  def bucket_of(self, m: int) -> int:
    """The smallest bucket >= m (m validated: 1 <= m <= M)."""
    m = matryoshka.validate_m(m, self.big_m)
    return next(b for b in self.buckets if b >= m)

  def check_prompt(self, prompt) -> list[int]:
    """The prompt as a list of ints, or a ValueError naming what is wrong with it: empty,
    longer than text_len, a token outside the vocabulary, several image placeholders."""
    ids = [int(t) for t in prompt]
    if not ids:
      raise ValueError("the prompt is empty")
    if len(ids) > self.text_len:
      raise ValueError(f"the prompt has {len(ids)} tokens, more than the {self.text_len} "
                       "this server accepts")
    image_id = self.loaded.model_cfg.image_token_id
    vocab = self.loaded.model_cfg.llm.vocab_size
    bad = [t for t in ids if t != image_id and not 0 <= t < vocab]
    if bad:
      raise ValueError(f"prompt token {bad[0]} is outside the vocabulary 0..{vocab - 1}")
    if ids.count(image_id) > 1:
      raise ValueError(f"the prompt has {ids.count(image_id)} image placeholders; at most "
                       "one is allowed")
    return ids

  def check_image(self, image) -> np.ndarray:
    """A preprocessed image [H, W, C] float32 of the model's size, else a ValueError."""
    cfg = self.loaded.model_cfg.vision
    want = (cfg.image_size, cfg.image_size, cfg.channels)
    image = np.asarray(image)
    if image.shape != want:
      raise ValueError(f"the image has shape {image.shape}; the model takes {want} "
                       "(preprocessed, float32)")
    if not np.issubdtype(image.dtype, np.floating) or not np.all(np.isfinite(image)):
      raise ValueError("the image must hold finite floating-point values (preprocessed)")
    return image.astype(np.float32, copy=False)

  def run(self, images, prompts, ms, max_new_tokens=None) -> list[Result]:
    """n <= batch_size rows (images [n, H, W, C] preprocessed, prompt ids, m per row;
    max_new_tokens: an optional per-row limit <= the sampling's, None for none) -> one
    Result per row (queue_s 0). Runs in the bucket of max(ms)."""
    n = len(prompts)
    if not 1 <= n <= self.batch_size:
      raise ValueError(f"a batch holds 1..{self.batch_size} rows, got {n}")
    if len(images) != n or len(ms) != n:
      raise ValueError(f"{n} prompts but {len(images)} images and {len(ms)} values of m")
    limits = self._limits(max_new_tokens, n)
    buckets = [self.bucket_of(m) for m in ms]
    prompts = [self.check_prompt(p) for p in prompts]
    images = [self.check_image(image) for image in images]
    return self.run_checked(images, prompts, [int(m) for m in ms], buckets, limits)

  def run_checked(self, images, prompts, ms, buckets, limits) -> list[Result]:
    """`run` on rows already checked (`bucket_of`, `check_prompt`, `check_image`,
    `check_limit`: the Batcher checks each request once, at submit)."""
    n = len(prompts)
    bucket = max(buckets)
    if not self.ready:
      raise RuntimeError("the generator is still compiling: call compile() first")
    cfg = self.loaded.model_cfg
    size = cfg.vision.image_size
    batch = np.zeros((self.batch_size, size, size, cfg.vision.channels), np.float32)
    batch[:n] = images
    ids, mask = inference.pad_prompts(prompts + [[self.pad_id]] * (self.batch_size - n),
                                      self.text_len, self.pad_id)
    m_rows = np.ones(self.batch_size, np.int32)
    m_rows[:n] = ms
    with self._lock:
      index = self._batches
      self._batches += 1
      t0 = time.perf_counter()
      with self.loaded.context():
        out = jax.device_get(self._programs[bucket](self.loaded.params, batch, ids, mask,
                                                    m_rows, np.int32(index)))
      compute_s = time.perf_counter() - t0
    results = []
    for r in range(n):
      count = int(out["num_tokens"][r])
      row = [int(t) for t in out["tokens"][r, :count]]
      stop = bool(row) and row[-1] == self.sampling.eos_id
      if count > limits[r]:
        row, count, stop = row[:limits[r]], limits[r], False
      kept = [t for t in row if t != self.sampling.eos_id]
      has_image = cfg.image_token_id in prompts[r]
      results.append(Result(
          text=self.loaded.tokenizer.decode(kept).strip(), m=int(ms[r]), bucket=bucket,
          new_tokens=count, prompt_tokens=len(prompts[r]) + (int(ms[r]) - 1 if has_image else 0),
          queue_s=0.0, compute_s=compute_s, batch_size=n, tokens=tuple(kept),
          finish_reason="stop" if stop else "length"))
    return results

  def check_limit(self, limit) -> int:
    """A per-request token limit: 1..sampling.max_new_tokens (None: that maximum)."""
    top = self.sampling.max_new_tokens
    if limit is None:
      return top
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or \
        not 1 <= limit <= top:
      raise ValueError(f"max_new_tokens={limit!r} is out of range: 1..{top}")
    return int(limit)

  def _limits(self, max_new_tokens, n: int) -> list[int]:
    if max_new_tokens is None:
      return [self.sampling.max_new_tokens] * n
    if len(max_new_tokens) != n:
      raise ValueError(f"{n} prompts but {len(max_new_tokens)} token limits")
    return [self.check_limit(x) for x in max_new_tokens]


@dataclasses.dataclass(eq=False)  # Compared by identity (fields hold arrays).
class _Request:
  image: np.ndarray
  prompt: list
  m: int
  bucket: int
  limit: int
  future: concurrent.futures.Future
  submitted: float


class Batcher:
  """Serves `submit`ted requests in batches on a worker thread (module docstring)."""

  def __init__(self, generator: BucketedGenerator, max_wait_ms: float = 10.0):
    if not max_wait_ms >= 0:
      raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
    self.generator, self.max_wait_s = generator, max_wait_ms / 1e3
    self._cond = threading.Condition()
    self._queue = collections.deque()
    self._closed = False
    self._started = time.perf_counter()
    self._stats = dict(requests=0, batches=0, rows=0, failed_batches=0, new_tokens=0,
                       busy_s=0.0)
    self._sizes = collections.Counter()
    self._buckets = collections.Counter()
    self._thread = threading.Thread(target=self._serve, name="mqt-batcher", daemon=True)
    self._thread.start()

  def submit(self, image, prompt, m: int, max_new_tokens: int | None = None):
    """Queues one request -> a Future of its Result. Bad input (m out of range, a prompt
    longer than the generator's text_len, a malformed image or token limit) raises
    ValueError here, before queueing."""
    g = self.generator
    bucket = g.bucket_of(m)
    prompt = g.check_prompt(prompt)
    image = g.check_image(image)
    limit = g.check_limit(max_new_tokens)
    future = concurrent.futures.Future()
    with self._cond:
      if self._closed:
        raise RuntimeError("the batcher is closed")
      self._queue.append(_Request(image, prompt, int(m), bucket, limit, future,
                                  time.perf_counter()))
      self._stats["requests"] += 1
      self._cond.notify_all()
    return future

  def _take(self) -> list[_Request] | None:
    """Blocks for the next batch (None once closed and drained)."""
    with self._cond:
      while not self._queue and not self._closed:
        self._cond.wait()
      if not self._queue:
        return None
      deadline = self._queue[0].submitted + self.max_wait_s
      while not self._closed:
        top = self._queue[0].bucket
        if sum(r.bucket <= top for r in self._queue) >= self.generator.batch_size:
          break
        left = deadline - time.perf_counter()
        if left <= 0:
          break
        self._cond.wait(left)
      top = self._queue[0].bucket
      taken, left = [], collections.deque()
      for r in self._queue:
        (taken if r.bucket <= top and len(taken) < self.generator.batch_size
         else left).append(r)
      self._queue = left
      return taken

  def _serve(self) -> None:
    try:
      self._loop()
    except BaseException as e:  # A bug here: fail what is queued rather than hang it.
      with self._cond:
        self._closed = True
        stranded, self._queue = list(self._queue), collections.deque()
      for r in stranded:
        r.future.set_exception(RuntimeError(f"the batcher's worker stopped: {e!r}"))
      raise

  def _loop(self) -> None:
    while True:
      batch = self._take()
      if batch is None:
        return
      batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
      if not batch:
        continue
      start = time.perf_counter()
      try:
        results = self.generator.run_checked(
            [r.image for r in batch], [r.prompt for r in batch], [r.m for r in batch],
            [r.bucket for r in batch], [r.limit for r in batch])
      except Exception as e:  # pylint: disable=broad-except  (fails this batch only)
        with self._cond:
          self._stats["failed_batches"] += 1
        for r in batch:
          r.future.set_exception(e)
        continue
      busy = time.perf_counter() - start
      with self._cond:
        s = self._stats
        s["batches"] += 1
        s["rows"] += len(batch)
        s["busy_s"] += busy
        s["new_tokens"] += sum(x.new_tokens for x in results)
        self._sizes[len(batch)] += 1
        self._buckets[results[0].bucket] += 1
      for r, x in zip(batch, results):
        r.future.set_result(dataclasses.replace(x, queue_s=start - r.submitted))

  def metrics(self) -> dict:
    """queue_length, requests (accepted by submit), batches (served), failed_batches,
    mean_batch_size, batch_size_counts {rows: batches}, bucket_counts {bucket: batches},
    new_tokens, tokens_per_s (generated tokens per second of generation calls), uptime_s,
    worker_alive."""
    with self._cond:
      s = self._stats
      return {"queue_length": len(self._queue), "requests": s["requests"],
              "batches": s["batches"], "failed_batches": s["failed_batches"],
              "mean_batch_size": s["rows"] / s["batches"] if s["batches"] else 0.0,
              "batch_size_counts": dict(sorted(self._sizes.items())),
              "bucket_counts": dict(sorted(self._buckets.items())),
              "new_tokens": s["new_tokens"],
              "tokens_per_s": s["new_tokens"] / s["busy_s"] if s["busy_s"] else 0.0,
              "uptime_s": time.perf_counter() - self._started,
              "worker_alive": self._thread.is_alive()}

  def close(self, timeout: float | None = None) -> None:
    """Stops taking requests, serves those already queued, and joins the worker."""
    with self._cond:
      self._closed = True
      self._cond.notify_all()
    self._thread.join(timeout)

  def __enter__(self) -> "Batcher":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
