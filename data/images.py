"""Image decoding and CLIP preprocessing for MQT-LLaVA.

Two steps, both run in data-loader workers:

  load_image: bytes or a path -> an RGB `PIL.Image.Image`. JPEG, PNG, WebP and
    GIF (first frame) are decoded (BMP and TIFF too; MPO, the multi-picture
    JPEG some cameras write, as JPEG), the EXIF orientation is applied, and every mode
    is brought to 8-bit RGB (see `to_rgb`).
  preprocess: RGB image -> np.float32 [size, size, 3] (HWC), normalized with the
    CLIP mean/std. Mode "crop" (stage 1): resize the shortest side to `size`
    (PIL bicubic), centre crop. Mode "pad" (stage 2, eval): LLaVA's
    expand2square with the CLIP mean colour, then the same resize and crop
    (a no-op crop, the image being square).

Both modes equal HF `CLIPImageProcessor` (transformers 5.x; its PIL backend
`CLIPImageProcessorPil`) configured with `size={"shortest_edge": size}`,
`crop_size={"height": size, "width": size}`, bicubic resampling and
`do_convert_rgb=True`, fed `pad_to_square(img)` in pad mode as LLaVA does.

Mode conversion (`to_rgb`):
  * Transparency ("A" band, as in LA, PA, RGBA, or a `transparency` entry as in
    palette images with a transparent index) is composited onto white, exactly
    as HF's `convert_to_rgb` does. (The original LLaVA loader's bare
    `.convert("RGB")` would drop alpha instead, exposing whatever colour the
    transparent pixels happen to store, often black.)
  * L, P, CMYK, YCbCr, 1, F, ...: PIL's own `convert("RGB")`, as HF. CMYK is
    converted naively (no ICC profile), as HF does. F (float) is read on a
    0..255 scale and clipped, as HF does.
  * 16-bit grey (I;16, I;16B, I;16L, I;16N) and 32-bit integer I: scaled from
    0..65535 to 0..255 (round(v * 255 / 65535), values outside clipped).
    HF (PIL's convert) clips at 255 instead, which turns almost any 16-bit
    image white; this is the one deliberate difference from HF.

Errors: every failure to read or decode raises `ImageError` naming the file
(its path, or the `name` the caller gives, e.g. a sample id).
"""
import io
import os
from typing import Optional, Tuple, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from data import paths

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PAD_COLOR = (122, 116, 104)  # tuple(int(x * 255) for x in CLIP_MEAN)

# Decoders tried by `load_image`; anything else is refused (smaller attack
# surface than all of PIL's plugins). "JPEG" also opens MPO (multi-picture
# JPEG, written by some cameras) as its first picture.
FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# Largest image (width * height) decoded or built by padding: 8192 x 8192.
MAX_PIXELS = 1 << 26
MODES = ("pad", "crop")

Source = Union[str, os.PathLike, bytes, bytearray, memoryview]

# Folded normalization: (x / 255 - mean) / std = x * _SCALE + _OFFSET.
_MEAN = np.asarray(CLIP_MEAN, np.float64)
_STD = np.asarray(CLIP_STD, np.float64)
_SCALE = (1.0 / (255.0 * _STD)).astype(np.float32)
_OFFSET = (-_MEAN / _STD).astype(np.float32)


class ImageError(ValueError):
  """An image could not be read, decoded or converted; the message names it."""


def _display_name(source, name: Optional[str]) -> str:
  if name is not None:
    return str(name)
  if isinstance(source, (str, os.PathLike)):
    return os.fspath(source)
  return "<bytes>"


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
  """I;16* or I image [H, W] -> L, mapping 0..65535 linearly onto 0..255."""
  a = np.asarray(img).astype(np.int64)
  a = np.clip(a, 0, 65535)
  a = (a * 255 + 32767) // 65535  # round(a * 255 / 65535)
  return Image.fromarray(a.astype(np.uint8), mode="L")


def _has_alpha(img: Image.Image) -> bool:
  bands = img.getbands()
  return ("A" in bands or "a" in bands
          or img.info.get("transparency") is not None)


def to_rgb(img: Image.Image, name: Optional[str] = None) -> Image.Image:
  """Converts any PIL mode to 8-bit RGB (rules in the module docstring).

  Args:
    img: a PIL image of any mode, [H, W] or [H, W, C].
    name: how to name the image in errors.

  Returns:
    An RGB image of the same size ([H, W, 3]); `img` itself if already RGB
    without a transparency key.
  """
  mode = img.mode
  try:
    if mode.startswith("I;16") or mode == "I":
      return _sixteen_bit_to_l(img).convert("RGB")
    if _has_alpha(img):
      rgba = img.convert("RGBA")
      white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
      return Image.alpha_composite(white, rgba).convert("RGB")
    if mode == "RGB":
      return img
    return img.convert("RGB")
  except (ValueError, OSError) as e:
    where = name if name is not None else "image"
    raise ImageError(f"{where}: cannot convert mode {mode} to RGB: {e}") from e


def load_image(source: Source, name: Optional[str] = None,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
  """Reads and decodes one image into RGB.

  Args:
    source: a file path, or the encoded bytes of the file.
    name: how to name the image in errors (default: the path, or "<bytes>").
    max_pixels: refuse images with more than this many pixels (width * height),
      checked from the header before decoding (decompression bombs).

  Returns:
    An RGB `PIL.Image.Image` [H, W, 3], EXIF orientation applied, first frame
    for animations.

  Raises:
    ImageError: missing/unreadable file, unknown format, corrupt or truncated
      data, too many pixels, unconvertible mode. The message names the file.
    TypeError: `source` is neither a path nor bytes.
  """
  label = _display_name(source, name)
  if isinstance(source, (str, os.PathLike)):
    try:
      data = paths.read_bytes(source)
    except FileNotFoundError as e:
      raise ImageError(f"{label}: no such image file") from e
    except OSError as e:
      raise ImageError(f"{label}: cannot read image file: {e}") from e
  elif isinstance(source, (bytes, bytearray, memoryview)):
    data = bytes(source)
  else:
    raise TypeError(f"{label}: expected a path or bytes, got {type(source)}")
  if not data:
    raise ImageError(f"{label}: empty image file")

  try:
    img = Image.open(io.BytesIO(data), formats=FORMATS)
  except Image.DecompressionBombError as e:
    raise ImageError(f"{label}: refused, too many pixels "
                     f"(decompression bomb?): {e}") from e
  except UnidentifiedImageError as e:
    raise ImageError(f"{label}: not a recognised image "
                     f"(accepted: {', '.join(FORMATS)})") from e
  except (OSError, ValueError, SyntaxError) as e:
    raise ImageError(f"{label}: corrupt image header: {e}") from e

  w, h = img.size
  if w <= 0 or h <= 0:
    raise ImageError(f"{label}: empty image ({w}x{h})")
  if w * h > max_pixels:
    raise ImageError(f"{label}: refused, {w}x{h} = {w * h} pixels is more than "
                     f"max_pixels={max_pixels} (decompression bomb?)")
  try:
    img.load()  # First frame only; raises on truncated or corrupt data.
  except (OSError, ValueError, SyntaxError, EOFError,
          Image.DecompressionBombError) as e:
    raise ImageError(f"{label}: corrupt or truncated image data: {e}") from e

  try:
    img = ImageOps.exif_transpose(img)
  except Exception:  # pylint: disable=broad-except
    pass  # Unreadable EXIF: keep the stored orientation rather than fail.
  return to_rgb(img, label)


def pad_to_square(img: Image.Image,
                  color: Tuple[int, int, int] = PAD_COLOR) -> Image.Image:
  """LLaVA's expand2square: centres `img` on a square of `color`.

  Args:
    img: an image [H, W] of any mode (converted with `to_rgb` first).
    color: RGB fill of the padding.

  Returns:
    An RGB image [S, S, 3], S = max(H, W); `img` at ((S - W) // 2, 0) when it
    is tall, at (0, (S - H) // 2) when it is wide; `img` (as RGB) if square.
  """
  img = to_rgb(img)
  w, h = img.size
  if w == h:
    return img
  s = max(w, h)
  out = Image.new("RGB", (s, s), tuple(color))
  out.paste(img, ((s - w) // 2, 0) if h > w else (0, (s - h) // 2))
  return out


def _resize_crop(img: Image.Image, size: int, max_pixels: int) -> Image.Image:
  """Shortest side -> size (bicubic), then a centre crop [size, size].

  HF's order and arithmetic: the whole image is resized, then cropped. Only
  when the resized image would exceed `max_pixels` (aspect ratios beyond
  max_pixels / size**2, e.g. 1:590 at 336) is just the kept region resampled
  (PIL `resize(box=...)`), which may differ from HF by a grey level or so.
  """
  w, h = img.size
  # HF's get_resize_output_image_size: long side truncated, not rounded.
  if w <= h:
    nw, nh = size, int(size * h / w)
  else:
    nw, nh = int(size * w / h), size
  left, top = (nw - size) // 2, (nh - size) // 2
  if nw * nh > max_pixels:
    sx, sy = w / nw, h / nh
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return img.resize((size, size), Image.Resampling.BICUBIC, box=box)
  img = img.resize((nw, nh), Image.Resampling.BICUBIC)
  if (nw, nh) != (size, size):
    img = img.crop((left, top, left + size, top + size))
  return img


def preprocess(img: Image.Image, size: int, mode: str,
               max_pixels: int = MAX_PIXELS) -> np.ndarray:
  """CLIP preprocessing of one image.

  Args:
    img: a PIL image [H, W] of any mode (converted with `to_rgb`).
    size: output side, e.g. 336.
    mode: "pad" (stage 2 / eval: `pad_to_square` with PAD_COLOR first) or
      "crop" (stage 1: shortest side to `size`, centre crop).
    max_pixels: memory guard for extreme sizes or aspect ratios. In pad
      mode a padded square larger than this is not built: the image is first
      shrunk (bicubic) so that the square fits. In crop mode a resized image
      larger than this is not built: only the kept region is resampled. Only
      such extreme images (e.g. 1000 x 9000) then differ slightly from HF.

  Returns:
    np.float32 [size, size, 3]: (pixel / 255 - CLIP_MEAN) / CLIP_STD.
  """
  if mode not in MODES:
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
  if int(size) != size or size <= 0:
    raise ValueError(f"size must be a positive int, got {size!r}")
  size = int(size)
  img = to_rgb(img)
  if mode == "pad":
    s = max(img.size)
    if s * s > max_pixels:
      k = int(np.sqrt(max_pixels)) / s
      img = img.resize((max(1, round(img.width * k)),
                        max(1, round(img.height * k))),
                       Image.Resampling.BICUBIC)
    img = pad_to_square(img)
  img = _resize_crop(img, size, max_pixels)
  x = np.asarray(img, dtype=np.float32)
  return x * _SCALE + _OFFSET


def load_and_preprocess(source: Source, size: int, mode: str,
                        name: Optional[str] = None) -> np.ndarray:
  """`load_image` then `preprocess`: np.float32 [size, size, 3]."""
  return preprocess(load_image(source, name=name), size, mode)
