r"""Serve a trained MQT-LLaVA over HTTP: an OpenAI-style chat endpoint and a page.

  python serve.py --config=configs/tiny.py --workdir=/tmp/mqt_tiny --port=8000

  IMG=$(base64 -w0 photo.png)
  curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \
    -d '{"m": 4, "messages": [{"role": "user", "content": [
          {"type": "text", "text": "What colour is the circle?"},
          {"type": "image_url", "image_url": {"url": "data:image/png;base64,'"$IMG"'"}}]}]}'

Each request picks its number of visual tokens: "m" (1 <= m <= M), "flops_budget"
(the largest m whose FLOPs per sample fit) or "latency_budget_ms" (from the latency
table that `python latency.py` measures on this machine); none: --default_m.
Concurrent requests are batched (--batch_size rows, waiting up to --max_wait_ms for
more): one generation program per bucket of m (--buckets), compiled at start, so any
mix of m runs without compiling again (mqt/serving.py). The page at http://HOST:PORT/
uploads an image, asks at an m or a FLOPs budget, and compares answers at several m.

Every problem of the command line, the config, its files and the checkpoint is named
at once (exit status 2) before any weight is read. The memory the largest bucket's
program needs is printed next; a server that cannot fit stops there (--dry_run prints
it and stops). The server listens as soon as the
weights are loaded: GET /health answers 503 while the programs compile, 200 once
requests are served. Ctrl-C (SIGINT) or SIGTERM stops it cleanly.
"""
import os
import signal
import sys
import threading
import time

import numpy as np
from absl import flags

from mqt import budget
from mqt import cli
from mqt import config_lib
from mqt import inference
from mqt import matryoshka
from mqt import run_inputs
from mqt import server as server_lib
from mqt import serving
from mqt import validate

_CONFIG, _WORKDIR, _CHECKPOINT = cli.define_model_flags()
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (0.0.0.0: every "
                            "interface).")
_PORT = flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 8, "Requests per generation batch.")
_MAX_WAIT_MS = flags.DEFINE_float("max_wait_ms", 10.0, "How long a batch waits for more "
                                  "requests after its first.")
_BUCKETS = flags.DEFINE_list("buckets", [], "Bucket sizes of m, one compiled program each "
                             "(default: 1, 2, 4, ... up to M, and M).")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_tokens", None, "Longest prompt (question in "
                                   "its template) accepted; the programs are compiled for "
                                   "it. Default: config.eval.data's text length.")
_DEFAULT_M = flags.DEFINE_integer("default_m", None, "m of a request that names neither m "
                                  "nor a budget (default: M).")
_LATENCY_TABLE = flags.DEFINE_string("latency_table", "", "The latency table of "
                                     "latency_budget_ms requests (default: the one "
                                     "latency.py writes beside the checkpoint).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", None, "Most tokens an answer has "
                                "(default: config.eval.generation).")
_MAX_BODY_MB = flags.DEFINE_float("max_body_mb", 16.0, "Largest request body, MiB.")


def log(line: str) -> None:
  print(line, flush=True)


def command_line_problems(config) -> list[str]:
  """The serving flags, checked before anything is read (m against M where the config
  knows M; --checkpoint=hf learns it later)."""
  big_m = None if _CHECKPOINT.value == "hf" else validate.num_queries(config)
  problems = []
  if not 0 <= _PORT.value <= 65535:
    problems.append(f"--port={_PORT.value} must lie in 0..65535")
  for name, flag in (("batch_size", _BATCH_SIZE), ("max_prompt_tokens", _MAX_PROMPT),
                     ("max_new_tokens", _MAX_NEW)):
    if flag.value is not None and flag.value < 1:
      problems.append(f"--{name}={flag.value} must be >= 1")
  if not _MAX_WAIT_MS.value >= 0:
    problems.append(f"--max_wait_ms={_MAX_WAIT_MS.value} must be >= 0")
  if not _MAX_BODY_MB.value > 0:
    problems.append(f"--max_body_mb={_MAX_BODY_MB.value} must be > 0")
  buckets, bad = cli.int_list("buckets", _BUCKETS.value)
  problems += bad
  if big_m is not None and not bad:
    try:
      matryoshka.bucket_sizes(buckets, big_m)
    except ValueError as e:
      problems.append(f"--buckets={','.join(_BUCKETS.value)}: {e}")
  if _DEFAULT_M.value is not None:
    problems += validate.ms_problems(f"--default_m={_DEFAULT_M.value}", [_DEFAULT_M.value], big_m)
  if _LATENCY_TABLE.value and not os.path.isfile(_LATENCY_TABLE.value):
    problems.append(f"--latency_table={_LATENCY_TABLE.value} does not exist (measure one with "
                    f"python latency.py)")
  return problems


def preflight(config, workdir: str) -> None:
  """Every problem of the flags, the config, the paths and the checkpoint, named together
  before any weight is read (a UserError, exit status 2)."""
  found = cli.Problems()
  found.add(command_line_problems(config))
  hf = _CHECKPOINT.value == "hf"
  inference.load_problems(found, config, workdir, _CHECKPOINT.value,
                          skip=("eval.ms",) + (("stage",) if hf else ()))
  if _MAX_PROMPT.value is None:
    found.check(config_lib.max_text_len, config, config.eval.data, "config.eval.data")
  found.raise_if_any()


def latency_table(checkpoint: str, workdir: str):
  """-> (the table or None, why there is none). A table named by --latency_table must
  load; the default one may be absent (latency budgets are then refused)."""
  path = _LATENCY_TABLE.value or budget.table_path(checkpoint, workdir)
  try:
    return budget.LatencyTable.load(path), ""
  except ValueError as e:
    if _LATENCY_TABLE.value:
      raise cli.UserError(f"--latency_table={path}: {e}") from None
    return None, str(e)


def bind(host: str, port: int) -> server_lib.Server:
  try:
    return server_lib.Server((host, port), None)
  except OSError as e:
    raise cli.UserError(f"--host={host} --port={port}: cannot listen there: {e.strerror or e}"
                        ) from None


def compile_and_serve(app, generator, max_wait_ms: float, url: str, started: float, done):
  """The background thread: compiles every bucket, then hands the engine to the app."""
  try:
    n = len(generator.buckets)
    count = iter(range(1, n + 1))
    generator.compile(lambda b, s: log(f"compiled bucket {b} ({next(count)}/{n}) in {s:.1f} s"))
    t0 = time.perf_counter()
    vis = generator.loaded.model_cfg.vision
    blank = np.zeros((1, vis.image_size, vis.image_size, vis.channels), np.float32)
    for b in generator.buckets:  # The first call of a program is slow: not a user's.
      generator.run(blank, [[generator.pad_id]], [b])
    log(f"warmed up in {time.perf_counter() - t0:.1f} s")
    batcher = serving.Batcher(generator, max_wait_ms)
    app.set_engine(batcher, generator.buckets, generator.compile_s)
    done["batcher"] = batcher
    log(f"ready: {url} ({n} programs compiled in {generator.compile_s:.1f} s; "
        f"{time.perf_counter() - started:.1f} s since start)")
  except Exception as e:  # pylint: disable=broad-except  (reported, then the server stops)
    app.set_failed(f"{type(e).__name__}: {e}")
    done["error"] = e
    done["stop"].set()


def main(argv):
  started = time.perf_counter()
  cli.start(argv)
  config = cli.apply_param_dtype(_CONFIG.value)
  workdir = _WORKDIR.value
  preflight(config, workdir)
  checkpoint, tok_path = run_inputs.resolve_paths(config, workdir, _CHECKPOINT.value)
  model_cfg = inference.model_config(config, checkpoint)
  big_m = model_cfg.query.num_queries
  default_m = matryoshka.validate_m(_DEFAULT_M.value or big_m, big_m)
  buckets = matryoshka.bucket_sizes(cli.int_list("buckets", _BUCKETS.value)[0], big_m) \
      if _BUCKETS.value else matryoshka.pow2_buckets(big_m)
  text_len = _MAX_PROMPT.value or config_lib.max_text_len(config, config.eval.data)
  gen_cfg = config.eval.generation.copy_and_resolve_references()
  if _MAX_NEW.value is not None:
    with gen_cfg.unlocked():
      gen_cfg.max_new_tokens = _MAX_NEW.value
  # The largest bucket's program bounds every bucket's: its memory is printed, and a server
  # that cannot fit stops here, before any weight is read (--dry_run: print and stop).
  _, sampling = inference.encode_prompts(config, tok_path, [], [], gen_cfg)
  inference.plan_memory(config, model_cfg, max(buckets), _BATCH_SIZE.value, text_len,
                        sampling, cli.DRY_RUN.value)
  if cli.DRY_RUN.value:
    return
  server = bind(_HOST.value, _PORT.value)
  log(f"loading {checkpoint}")
  loaded = inference.load(config, workdir, _CHECKPOINT.value, model_cfg)
  sampling = inference.sampling_config(gen_cfg, loaded.tokenizer)
  generator = serving.BucketedGenerator(loaded, buckets, _BATCH_SIZE.value, text_len,
                                        sampling, seed=int(config.seed), compile=False)
  table, table_problem = latency_table(checkpoint, workdir)
  log(f"latency budgets: {'table ' + table.path if table else 'off (' + table_problem + ')'}")
  app = server_lib.App(
      tokenizer=loaded.tokenizer, template=loaded.template, model_cfg=model_cfg,
      max_new_tokens=sampling.max_new_tokens, max_prompt_tokens=text_len, default_m=default_m,
      model_name=f"mqt-llava:{checkpoint}", table=table, table_problem=table_problem,
      max_body_bytes=int(_MAX_BODY_MB.value * (1 << 20)))
  server.app = app
  threading.Thread(target=server.serve_forever, name="mqt-http", daemon=True).start()
  log(f"listening: {server.url} (GET /health answers 503 while compiling buckets "
      f"{','.join(map(str, buckets))} at batch {_BATCH_SIZE.value}, prompt {text_len} "
      f"tokens)")
  done = {"stop": threading.Event()}
  for sig in (signal.SIGINT, signal.SIGTERM):
    signal.signal(sig, lambda *_: done["stop"].set())
  worker = threading.Thread(target=compile_and_serve, name="mqt-compile", daemon=True,
                            args=(app, generator, _MAX_WAIT_MS.value, server.url, started,
                                  done))
  worker.start()
  while not done["stop"].wait(0.5):
    pass
  log("stopping")
  server.shutdown()
  server.server_close()
  if "batcher" in done:
    done["batcher"].close(timeout=60)
  if "error" in done:
    raise cli.UserError(f"compiling the serving programs failed: {done['error']}",
                        cli.RUNTIME)
  log("stopped")
  if worker.is_alive():  # Stopped mid-compile: nothing to wait for.
    sys.stdout.flush()
    os._exit(0)  # pylint: disable=protected-access


if __name__ == "__main__":
  cli.run(main)
