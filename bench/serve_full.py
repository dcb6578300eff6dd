r"""The full-size model answering: prefill and per-token decode times per (m, batch).

  python -m bench.full_checkpoint --out=/tmp/mqt7b      # once: the released layout
  python -m bench.serve_full --ckpt=/tmp/mqt7b --param_dtype=bfloat16 --ms=16,256 \
      --batch_sizes=1

What `predict.py --checkpoint=hf` does, timed: the memory of every (m, batch) is
planned first (nothing is read when one cannot fit), the checkpoint is imported
streaming into the config's shardings, then per (m, batch) one generation
program is compiled and run on a prompt of --text_len tokens: the prefill's
time (median of --runs after a warm-up) and the decode time per new token
((generation - prefill) / (new tokens - 1); EOS is disabled so every row
decodes --max_new_tokens). The images are random pixels: the weights are
random too, so only the times mean anything.
"""
import os
import time

import numpy as np
from absl import app
from absl import flags

from configs import mqt_llava
from mqt import cli
from mqt import generate as gen
from mqt import inference

_CKPT = flags.DEFINE_string("ckpt", None, "An HF-format MQT-LLaVA folder (with tokenizer.model).")
_MS = flags.DEFINE_list("ms", ["16", "256"], "Values of m.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1"], "Batch sizes.")
_TEXT_LEN = flags.DEFINE_integer("text_len", 48, "Prompt tokens, the <image> placeholder included.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 8, "New tokens per row.")
_RUNS = flags.DEFINE_integer("runs", 1, "Timed prefills (after one warm-up); median.")
flags.mark_flags_as_required(["ckpt"])


def main(argv):
  cli.start(argv)
  config = cli.apply_param_dtype(mqt_llava.get_config())
  config.init.kind = "hf"
  config.init.mqt_llava = _CKPT.value
  config.tokenizer_path = os.path.join(_CKPT.value, "tokenizer.model")
  checkpoint, _ = inference.resolve_paths(config, "/tmp", "hf")
  model_cfg = inference.model_config(config, checkpoint)
  sampling = gen.SamplingConfig(max_new_tokens=_MAX_NEW.value, eos_id=-1)
  cases = [(int(m), int(b)) for m in _MS.value for b in _BATCH_SIZES.value]
  for m, b in cases:  # Every case is known to fit before a weight is read.
    inference.plan_memory(config, model_cfg, m, b, _TEXT_LEN.value, sampling, dry_run=False)
  t0 = time.perf_counter()
  loaded = inference.load(config, "/tmp", "hf", model_cfg)
  print(f"imported in {time.perf_counter() - t0:.0f} s ({config.model.param_dtype})", flush=True)
  rng = np.random.default_rng(0)
  rows = []
  for m, b in cases:
    runner = inference.Answerer(loaded, m, b, _TEXT_LEN.value, sampling)
    size = model_cfg.vision.image_size
    images = rng.standard_normal((b, size, size, 3)).astype(np.float32)
    ids = rng.integers(3, 1000, (b, _TEXT_LEN.value)).astype(np.int32)
    ids[:, 1] = model_cfg.image_token_id
    mask = np.ones_like(ids, bool)
    prefill_s = runner.prefill_latency(images, ids, mask, repeats=_RUNS.value)
    runner(images, ids, mask)
    per_token = (runner.generate_s - prefill_s) / (_MAX_NEW.value - 1)
    rows.append((m, b, runner.compile_s, prefill_s, per_token))
    print(f"m={m:<4} batch {b}: compile {runner.compile_s:.0f} s, prefill {prefill_s:.2f} s, "
          f"decode {per_token:.2f} s/token", flush=True)
  print(f"\n{'m':>5}{'batch':>7}{'prefill s':>11}{'decode s/token':>16}")
  for m, b, _, p, d in rows:
    print(f"{m:>5}{b:>7}{p:>11.2f}{d:>16.2f}")


if __name__ == "__main__":
  app.run(main)
