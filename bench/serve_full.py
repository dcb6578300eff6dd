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

FLOPs: MaxText model FLOPs, forward only (`bench.common`): the prefill at S = T + m - 1
(`model_flops`), a decoded token with attention over the positions before it
(`decode_flops`, averaged over the decoded tokens). MFU divides by the best float32
matmul measured before and after the timed work (jax or numpy, named), whatever
--param_dtype is. The table ends with the machine record (busy or quiet).
"""
import os
import time

import jax
import numpy as np
from absl import app
from absl import flags

from bench import common
from configs import mqt_llava
from mqt import cli
from mqt import generate as gen
from mqt import inference
from mqt import run_inputs

_CKPT = flags.DEFINE_string("ckpt", None, "An HF-format MQT-LLaVA folder (with tokenizer.model).")
_MS = flags.DEFINE_list("ms", ["16", "256"], "Values of m.")
_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1"], "Batch sizes.")
_TEXT_LEN = flags.DEFINE_integer("text_len", 48, "Prompt tokens, the <image> placeholder included.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 8, "New tokens per row.")
_RUNS = flags.DEFINE_integer("runs", 1, "Timed prefills (after one warm-up); median.")
_JSON = common.define_json_flag()
flags.mark_flags_as_required(["ckpt"])


def main(argv):
  cli.start(argv)
  watch = common.MachineWatch().start()
  config = cli.apply_param_dtype(mqt_llava.get_config())
  config.init.kind = "hf"
  config.init.mqt_llava = _CKPT.value
  config.tokenizer_path = os.path.join(_CKPT.value, "tokenizer.model")
  checkpoint, _ = run_inputs.resolve_paths(config, "/tmp", "hf")
  model_cfg = inference.model_config(config, checkpoint)
  sampling = gen.SamplingConfig(max_new_tokens=_MAX_NEW.value, eos_id=-1)
  cases = [(int(m), int(b)) for m in _MS.value for b in _BATCH_SIZES.value]
  for m, b in cases:  # Every case is known to fit before a weight is read.
    inference.plan_memory(config, model_cfg, m, b, _TEXT_LEN.value, sampling, dry_run=False)
  t0 = time.perf_counter()
  loaded = inference.load(config, "/tmp", "hf", model_cfg)
  print(f"imported in {time.perf_counter() - t0:.0f} s ({config.model.param_dtype})", flush=True)
  total = sum(x.size for x in jax.tree.leaves(loaded.params))
  rows_max = max(b * (_TEXT_LEN.value + m - 1) for m, b in cases)
  shapes = common.model_shapes(model_cfg, rows_max)
  peak = common.measure_peak(shapes)
  rng = np.random.default_rng(0)
  rows = []
  for m, b in cases:
    runner = inference.Answerer(loaded, m, b, _TEXT_LEN.value, sampling, timed=True)
    size = model_cfg.vision.image_size
    images = rng.standard_normal((b, size, size, 3)).astype(np.float32)
    ids = rng.integers(3, 1000, (b, _TEXT_LEN.value)).astype(np.int32)
    ids[:, 1] = model_cfg.image_token_id
    mask = np.ones_like(ids, bool)
    prefill_s = runner.prefill_latency(images, ids, mask, repeats=_RUNS.value)
    runner(images, ids, mask)
    per_token = (runner.generate_s - prefill_s) / (_MAX_NEW.value - 1)
    seq = _TEXT_LEN.value + m - 1
    rows.append(dict(m=m, batch=b, compile_s=runner.compile_s, prefill_s=prefill_s,
                     decode_s=per_token,
                     prefill_flops=common.model_flops(model_cfg, _TEXT_LEN.value, m, b)["total"],
                     decode_flops=float(np.mean([common.decode_flops(model_cfg, seq + k, b)
                                                 for k in range(1, _MAX_NEW.value)]))))
    print(f"m={m:<4} batch {b}: compile {runner.compile_s:.0f} s, prefill {prefill_s:.2f} s, "
          f"decode {per_token:.2f} s/token", flush=True)
  peak = common.measure_peak(shapes, earlier=peak)
  record = watch.stop()
  print(f"\n{total:,} parameters (inference: none trains), {config.model.param_dtype}; "
        f"FLOPs: {common.CONVENTION}, forward; {common.peak_line(peak)}")
  print(f"{'m':>5}{'batch':>7}{'prefill s':>11}{'GFLOP':>10}{'MFU':>7}{'decode s/token':>16}"
        f"{'GFLOP':>10}{'MFU':>7}")
  for r in rows:
    mfu = lambda f, s: f / s / peak["flops_per_s"]
    print(f"{r['m']:>5}{r['batch']:>7}{r['prefill_s']:>11.3g}{r['prefill_flops'] / 1e9:>10.4g}"
          f"{mfu(r['prefill_flops'], r['prefill_s']):>7.1%}{r['decode_s']:>16.3g}"
          f"{r['decode_flops'] / 1e9:>10.3g}{mfu(r['decode_flops'], r['decode_s']):>7.1%}")
  common.finish(record, _JSON(), rows=rows, parameters=total, peak=peak)


if __name__ == "__main__":
  app.run(main)
