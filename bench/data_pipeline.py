r"""Input pipeline throughput (samples/s) against what the tiny train step consumes.

  python -m bench.data_pipeline

Two datasets: the built-in synthetic set (PNG at configs/tiny.py's image size,
as it reads it) and LLaVA-format JSON with real JPEG photos (skimage) decoded, padded and
resized to 336 px (the 7B model's input), each through TFDS ArrayRecord and
the grain pipeline, in-process and with 2 worker processes. What the step consumes:
`bench.train_step`'s stage-2 step of configs/tiny.py (batch 32, all M visual slots),
measured in the same run. The last lines say whether the machine was busy
(`bench.common.MachineWatch`: load average, a reference matmul, other processes).
"""
import json
import os
import tempfile
import time

import numpy as np
from absl import app
from absl import flags
from PIL import Image

from bench import common
from bench import train_step as bench_train_step
from configs import tiny
from data import pipeline
from data import prepare
from data.sources import TfdsSource
from mqt import config_lib

_BATCHES = flags.DEFINE_integer("batches", 12, "Timed batches per measurement.")
_JSON = common.define_json_flag()


def _throughput(source, cfg, batches):
  it = iter(pipeline.make_dataset(source, cfg))
  next(it)  # Start-up (worker processes, first decode) is not timed.
  t = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * cfg.batch_size / (time.perf_counter() - t)


def _jpeg_llava(root, n=240):
  import skimage.data
  photos = [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea(),
            skimage.data.rocket()]
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  records = []
  for i in range(n):
    img = Image.fromarray(photos[i % len(photos)])
    w, h = img.size
    box = (rng.integers(0, w // 4), rng.integers(0, h // 4), w - rng.integers(0, w // 4),
           h - rng.integers(0, h // 4))
    img.crop(box).save(os.path.join(root, "images", f"{i}.jpg"), quality=90)
    records.append({"id": f"s{i}", "image": f"{i}.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the picture? Describe it briefly."},
        {"from": "gpt", "value": "A photograph of an object in front of a plain background."}]})
  with open(os.path.join(root, "data.json"), "w") as f:
    json.dump(records, f)
  return prepare.prepare_llava(os.path.join(root, "data.json"), os.path.join(root, "images"),
                               "bench", os.path.join(root, "tfds"))


def main(argv):
  del argv
  watch = common.MachineWatch().start()
  root = tempfile.mkdtemp(prefix="mqt_bench_")
  config = tiny.get_config()
  px = config.data.builtin_image_size
  text_len = config_lib.max_text_len(config, config.stage2.data, "config.stage2.data")
  sizes = {"captions": 64, "instruct": 2000, "eval": 64}
  synth = prepare.ensure_builtin(os.path.join(root, "builtin"), image_size=px, sizes=sizes)
  tok = prepare.builtin_tokenizer_path(os.path.join(root, "builtin"))
  jpeg = _jpeg_llava(os.path.join(root, "jpeg"))
  rows = []
  for name, src, size in ((f"built-in {px}px PNG", TfdsSource(synth, "instruct"), px),
                          ("LLaVA JPEG 336px", TfdsSource(jpeg, "train"), 336)):
    for workers in (0, 2):
      cfg = pipeline.PipelineConfig(batch_size=32, max_text_len=text_len, image_size=size,
                                    tokenizer_path=tok, worker_count=workers, num_epochs=None)
      rows.append((name, workers, _throughput(src, cfg, _BATCHES.value)))
  # What the train step of configs/tiny.py consumes, measured in the same run.
  run = bench_train_step.setup(config, 32, text_len)
  big_m = run.cfg.query.num_queries
  need = bench_train_step.bench(run, [(str(big_m), big_m, None)], 5)[0]
  consumed = 32 / need["step_s"]
  record = watch.stop()
  print(f"{'dataset':<20}{'workers':>8}{'samples/s':>12}{'x tiny step':>12}")
  for name, workers, rate in rows:
    print(f"{name:<20}{workers:>8}{rate:>12,.0f}{rate / consumed:>12.1f}")
  print(f"configs/tiny.py's train step consumes {consumed:,.0f} samples/s "
        f"(batch 32, {need['step_s'] * 1e3:.0f} ms per step)")
  common.finish(record, _JSON(), step_s=need["step_s"],
                rows=[dict(dataset=n, workers=w, samples_per_s=r) for n, w, r in rows])


if __name__ == "__main__":
  app.run(main)
