r"""What batching buys the serving engine alone, and what a request costs before it.

  python -m bench.serve_batching --workdir=/tmp/mqt_tiny --json_out=/tmp/serve_batching.json

On the checkpoint of --config / --workdir (default: the trained configs/tiny.py model):

  engine   mqt/serving.py's BucketedGenerator at each --batch_sizes (one program per
           bucket), fed the built-in held-out questions with m drawn uniformly over
           1..M: milliseconds per batch, rows per second, and the speed-up over batch 1.
           Interleaved rounds, median (bench/common.py's time_rounds).
  request  the server's work for one request before the engine, in this process: parsing
           the OpenAI-style JSON, decoding the base64 PNG, preprocessing it
           (mqt/chat_api.parse_chat) and building the prompt ids: milliseconds of Python
           per request, which serve.py's request threads run one at a time (the GIL).

Together they say where a batched server's throughput ends on this machine: at
engine rows/s when the model dominates, at 1 / request-ms when the request handling does.
"""
import time

import numpy as np
from absl import app
from absl import flags

from bench import common
from bench import serve_samples
from mqt import chat_api
from mqt import cli
from mqt import inference
from mqt import serving

_CONFIG = flags.DEFINE_string("config", "configs/tiny.py", "The model's config file.")
_WORKDIR = flags.DEFINE_string("workdir", "/tmp/mqt_tiny", "The trained run's workdir.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8", "16", "32"], "Engine batch sizes.")
_RUNS = flags.DEFINE_integer("runs", 15, "Timed rounds; the median is reported.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the m drawn per row.")
_JSON = common.define_json_flag()


def main(argv):
  del argv
  config = cli.load_config_file(_CONFIG.value)
  loaded = inference.load(config, _WORKDIR.value)
  big_m = loaded.model_cfg.query.num_queries
  size = loaded.model_cfg.vision.image_size
  sampling = inference.sampling_config(config.eval.generation, loaded.tokenizer)
  samples, source = serve_samples.builtin_samples(_WORKDIR.value, 8)
  bodies = [chat_api.chat_body(q, png) for png, q in samples]

  def handle(body):
    req = chat_api.parse_chat(body, image_size=size, big_m=big_m,
                              max_new_tokens=sampling.max_new_tokens)
    return req.image, inference.encode_prompt(req.question, loaded.tokenizer, True,
                                              loaded.template)

  parsed = [handle(b) for b in bodies]
  text_len = max(len(p) for _, p in parsed)
  rng = np.random.default_rng(_SEED.value)
  watch = common.MachineWatch().start()
  calls, sizes = {}, [int(b) for b in _BATCHES.value]
  for bs in sizes:
    gen = serving.BucketedGenerator(loaded, None, bs, text_len, sampling)
    rows = [parsed[i % len(parsed)] for i in range(bs)]
    images = np.stack([im for im, _ in rows])
    prompts = [p for _, p in rows]
    ms = [int(m) for m in rng.integers(1, big_m + 1, bs)]
    calls[bs] = lambda g=gen, i=images, p=prompts, m=ms: g.run(i, p, m)
    print(f"batch {bs}: {len(gen.buckets)} programs compiled in {gen.compile_s:.1f} s; rows' m "
          f"{ms}", flush=True)
  times = common.time_rounds(calls, _RUNS.value)
  t0, n = time.perf_counter(), 0
  while time.perf_counter() - t0 < 2.0:
    handle(bodies[n % len(bodies)])
    n += 1
  request_ms = (time.perf_counter() - t0) / n * 1e3
  record = watch.stop()
  base = np.median(times[sizes[0]]) / sizes[0]
  print(f"\nengine on {source}, M={big_m}, prompt {text_len} tokens, up to "
        f"{sampling.max_new_tokens} new tokens, median of {_RUNS.value} rounds")
  print("| batch | ms per batch | rows/s | speed-up over batch 1 |")
  print("|---|---|---|---|")
  out = []
  for bs in sizes:
    t = float(np.median(times[bs]))
    out.append(dict(batch_size=bs, ms_per_batch=t * 1e3, rows_per_s=bs / t,
                    speedup=base / (t / bs)))
    print(f"| {bs} | {t * 1e3:.2f} | {bs / t:.0f} | {base / (t / bs):.2f}x |")
  print(f"\nrequest handling before the engine (JSON, base64, PNG decode, preprocessing, "
        f"prompt ids): {request_ms:.2f} ms per request in Python, at most "
        f"{1e3 / request_ms:.0f} requests/s on one interpreter")
  common.finish(record, _JSON(), engine=out, request_ms=request_ms, text_len=text_len,
                source=source, big_m=big_m)


if __name__ == "__main__":
  app.run(main)
