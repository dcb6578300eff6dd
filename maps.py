r"""Maps of what each visual token draws on, for one image at chosen m (a PNG grid).

  python maps.py --config=configs/tiny.py --workdir=/tmp/mqt_tiny --image=photo.png \
      --ms=1,4,9 --out=maps.png

One row per m: the image, then one heatmap per visual token over it (Grad-CAM
style over the vision tower's patches, `mqt/maps.py`). Only the vision tower and
the query transformer are read from the checkpoint (the last stage of --workdir,
another --checkpoint folder, or --checkpoint=hf for the config's HF weights,
such as the released MQT-LLaVA-7B layout). Where the query transformer's
attention depends on the image (the perceiver variant's content keys;
--attention=auto), a second grid of its attention weights goes beside --out
(`<out>_attention.png`); the released position-only keys give every image the
same attention, so only the gradient maps say anything there. Every problem of the command line,
the config and the paths is named at once before any weight is read (exit
status 2).
"""
import numpy as np
from absl import flags

from data import images as images_lib
from mqt import cli
from mqt import inference
from mqt import maps
from mqt import matryoshka
from mqt import paths
from mqt import validate

_CONFIG, _WORKDIR, _CHECKPOINT = cli.define_model_flags()
_IMAGE = flags.DEFINE_string("image", None, "The image file.")
_MS = flags.DEFINE_list("ms", None, "Values of m, one row of maps each (1 <= m <= M).")
_OUT = flags.DEFINE_string("out", "maps.png", "The PNG to write (local path).")
_ATTENTION = flags.DEFINE_enum("attention", "auto", ["auto", "always", "never"],
                               "Also write the attention-weight grid: auto = where the "
                               "variant's attention depends on the image (perceiver).")
flags.mark_flags_as_required(["config", "workdir", "image", "ms"])


def command_line_problems(config, found: cli.Problems) -> list[int]:
  """--ms (integers, each 1 <= m <= M; M known later for --checkpoint=hf), --image and
  --out; problems go to `found`. -> the m values."""
  big_m = None if _CHECKPOINT.value == "hf" else validate.num_queries(config)
  ms, bad = cli.int_list("ms", _MS.value)
  found.add(bad)
  found.add(validate.ms_problems(f"--ms={','.join(_MS.value)}", ms, big_m))
  if not paths.isfile(_IMAGE.value):
    found.add(f"image {_IMAGE.value} does not exist")
  folder = paths.dirname(paths.absolute(_OUT.value))
  if paths.is_uri(_OUT.value) or not paths.isdir(folder):
    found.add(f"--out={_OUT.value}: the folder {folder} does not exist on local disk")
  return ms


def main(argv):
  cli.start(argv)
  config = cli.apply_param_dtype(_CONFIG.value)
  found = cli.Problems()
  ms = command_line_problems(config, found)
  skip = ("eval.ms",) + (("stage",) if _CHECKPOINT.value == "hf" else ())
  inference.load_problems(found, config, _WORKDIR.value, _CHECKPOINT.value, skip=skip,
                          need_tokenizer=False)
  found.raise_if_any()
  inference.check_images([_IMAGE.value])
  loaded = inference.load(config, _WORKDIR.value, _CHECKPOINT.value,
                          components=("vision", "query"))
  cfg = loaded.model_cfg
  # M of HF weights is known once their config is read: check the m's against it.
  ms = sorted({matryoshka.validate_m(m, cfg.query.num_queries) for m in ms})
  image = inference.load_images([_IMAGE.value], cfg.vision.image_size)
  attention = _ATTENTION.value == "always" or (_ATTENTION.value == "auto"
                                               and cfg.query.variant == "perceiver")
  with loaded.context():
    by_m = {m: maps.latent_maps(cfg, loaded.params, image, m)[0] for m in ms}
    att = {m: maps.attention_maps(cfg, loaded.params, image, m)[0] for m in ms} \
        if attention else None
  shown = np.clip(image[0] * np.asarray(images_lib.CLIP_STD) + np.asarray(images_lib.CLIP_MEAN),
                  0, 1)
  maps.save_grid(_OUT.value, shown, by_m)
  g = by_m[ms[0]].shape[-1]
  print(f"wrote {_OUT.value}: {len(ms)} rows (m = {', '.join(map(str, ms))}), "
        f"{sum(ms)} gradient maps over a {g}x{g} patch grid")
  if att is not None:
    path = attention_path(_OUT.value)
    maps.save_grid(path, shown, att)
    print(f"wrote {path}: the query transformer's attention weights, same rows")


def attention_path(out: str) -> str:
  """maps.png -> maps_attention.png."""
  stem, ext = (out[:-4], out[-4:]) if out.lower().endswith(".png") else (out, ".png")
  return f"{stem}_attention{ext}"


if __name__ == "__main__":
  cli.run(main)
