"""Acceptance tests for data/images.py: decoding, modes and CLIP parity.

The reference is HF's PIL-based CLIP image processor (transformers 5.x:
`CLIPImageProcessorPil`; `CLIPImageProcessor` needs torchvision), configured
as LLaVA's CLIP-L/336 processor but with a variable size. In pad mode the
reference is fed `pad_to_square(img)`, as LLaVA does. Photos come from
`skimage.data` (shipped with scikit-image, no download).
"""
import functools
import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import skimage.data
from PIL import Image

from data import images

try:
  from transformers.models.clip import CLIPImageProcessorPil as _HFProcessor
except ImportError:  # Older transformers: the slow processor is PIL-based.
  from transformers import CLIPImageProcessor as _HFProcessor

TOL = 1e-2  # Per value, after normalization (one grey level is ~0.015).
SIZES = (336, 64)
MODES = ("pad", "crop")


@functools.lru_cache(maxsize=None)
def _hf_processor(size):
  return _HFProcessor(
      size={"shortest_edge": size},
      crop_size={"height": size, "width": size},
      resample=Image.Resampling.BICUBIC,
      do_resize=True, do_center_crop=True, do_rescale=True,
      do_normalize=True, do_convert_rgb=True,
      image_mean=list(images.CLIP_MEAN), image_std=list(images.CLIP_STD))


def hf_reference(img, size, mode):
  """HF output as np.float32 [size, size, 3] (HWC)."""
  if mode == "pad":
    img = images.pad_to_square(img)
  out = _hf_processor(size)(img, return_tensors="np")["pixel_values"][0]
  return np.transpose(out, (1, 2, 0)).astype(np.float32)


def assert_matches_hf(ours, img, size, mode, what):
  ref = hf_reference(img, size, mode)
  assert ours.shape == (size, size, 3) and ours.dtype == np.float32, what
  dev = float(np.abs(ours - ref).max())
  assert dev <= TOL, f"{what} {mode} {size}: max deviation {dev}"
  return dev


@functools.lru_cache(maxsize=None)
def photo(name):
  a = getattr(skimage.data, name)()
  return Image.fromarray(a)


PHOTOS = ("astronaut", "coffee", "chelsea", "camera", "rocket", "logo")


def _alpha(size):
  """A [H, W] uint8 alpha: opaque disc, fully transparent corners, ramps."""
  w, h = size
  y, x = np.mgrid[0:h, 0:w]
  r = np.hypot((x - w / 2) / w, (y - h / 2) / h)
  return np.clip(255 * (0.6 - r) / 0.25, 0, 255).astype(np.uint8)


def _to_i16(img):
  """Grey [H, W] 8-bit -> I;16 using the whole 0..65535 range, plus noise."""
  g = np.asarray(img.convert("L")).astype(np.int64) * 257
  g = g + np.random.default_rng(0).integers(0, 257, g.shape)
  return Image.fromarray(np.clip(g, 0, 65535).astype(np.uint16))


def _p_with_transparency():
  p = photo("chelsea").quantize(64)
  a = np.asarray(p).copy()
  a[:60, :90] = 7  # A corner block of the transparent index.
  out = Image.fromarray(a, mode="P")
  out.putpalette(p.getpalette())
  out.info["transparency"] = 7
  return out


def mode_variant(mode):
  base = photo("chelsea")  # 451 x 300, wide.
  if mode == "L":
    return base.convert("L")
  if mode == "LA":
    la = base.convert("L").convert("LA")
    la.putalpha(Image.fromarray(_alpha(base.size)))
    return la
  if mode == "RGBA":
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.fromarray(_alpha(base.size)))
    return rgba
  if mode == "P":
    return base.quantize(256)
  if mode == "P+transparency":
    return _p_with_transparency()
  if mode == "CMYK":
    return base.convert("CMYK")
  if mode == "I;16":
    return _to_i16(base)
  raise ValueError(mode)


VARIANTS = ("L", "LA", "RGBA", "P", "P+transparency", "CMYK")


def encode(img, fmt, **kw):
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


# ----------------------------------------------------------- HF parity ------


@pytest.mark.parametrize("name", PHOTOS)
def test_photos_match_hf(name):
  img = photo(name)
  for im in (img, img.transpose(Image.Transpose.TRANSPOSE)):  # wide and tall
    for size in SIZES:
      for mode in MODES:
        assert_matches_hf(images.preprocess(im, size, mode), im, size, mode,
                          f"{name} {im.size} {im.mode}")


@pytest.mark.parametrize("variant", VARIANTS)
def test_modes_match_hf(variant):
  img = mode_variant(variant)
  assert img.mode == variant.split("+")[0]
  for size in SIZES:
    for mode in MODES:
      assert_matches_hf(images.preprocess(img, size, mode), img, size, mode,
                        variant)


# (variant, format, mode the file decodes to, whether it keeps transparency)
ROUND_TRIPS = [
    ("RGB", "JPEG", "RGB", False), ("RGB", "PNG", "RGB", False),
    ("RGB", "WEBP", "RGB", False), ("RGB", "GIF", "P", False),
    ("L", "JPEG", "L", False), ("L", "PNG", "L", False),
    ("L", "WEBP", "RGB", False), ("L", "GIF", "P", False),
    ("LA", "PNG", "LA", True), ("LA", "WEBP", "RGBA", True),
    ("RGBA", "PNG", "RGBA", True), ("RGBA", "WEBP", "RGBA", True),
    ("RGBA", "GIF", "P", True),
    ("P", "PNG", "P", False), ("P", "GIF", "P", False),
    ("P+transparency", "PNG", "P", True), ("P+transparency", "GIF", "P", True),
    ("CMYK", "JPEG", "CMYK", False), ("CMYK", "TIFF", "CMYK", False),
]


@pytest.mark.parametrize("variant,fmt,decoded_mode,alpha", ROUND_TRIPS)
def test_encoded_round_trip_matches_hf(variant, fmt, decoded_mode, alpha):
  img = photo("chelsea") if variant == "RGB" else mode_variant(variant)
  data = encode(img, fmt)
  decoded = Image.open(io.BytesIO(data))
  decoded.load()
  # The file really is in that mode, so that conversion path is exercised.
  assert decoded.mode == decoded_mode
  assert images._has_alpha(decoded) == alpha
  loaded = images.load_image(data, name=f"{variant}.{fmt}")
  assert loaded.mode == "RGB" and loaded.size == img.size
  for size in SIZES:
    for mode in MODES:
      out = images.load_and_preprocess(data, size, mode)
      assert_matches_hf(out, decoded, size, mode, f"{variant} via {fmt}")


# ------------------------------------------------ modes HF gets wrong -------


def test_i16_is_scaled_not_clipped():
  img = mode_variant("I;16")
  assert img.mode == "I;16"
  src = np.asarray(img).astype(np.int64)
  want = (src * 255 + 32767) // 65535
  for data in (encode(img, "PNG"), encode(img, "TIFF")):
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    got = np.asarray(images.load_image(data))
    np.testing.assert_array_equal(got[..., 0], want)
    np.testing.assert_array_equal(got[..., 0], got[..., 2])
    # Not saturated: mid-grey on average, as the 8-bit photo it came from.
    assert 40 < got.mean() < 215
    # Parity with HF on the properly scaled 8-bit grey image.
    grey = Image.fromarray(want.astype(np.uint8), mode="L")
    for size in SIZES:
      for mode in MODES:
        assert_matches_hf(images.load_and_preprocess(data, size, mode), grey,
                          size, mode, "I;16")
  # 32-bit I (16-bit data) follows the same scale.
  i32 = Image.fromarray(src.astype(np.int32))
  assert i32.mode == "I"
  np.testing.assert_array_equal(np.asarray(images.to_rgb(i32))[..., 1], want)


def test_i16_plain_pil_conversion_would_saturate():
  # The reason for the difference above: PIL's convert clips 16-bit values.
  img = mode_variant("I;16")
  naive = np.asarray(img.convert("RGB"))
  ours = np.asarray(images.to_rgb(img))
  assert (naive == 255).mean() > 0.9
  assert (ours == 255).mean() < 0.1


def test_alpha_composited_on_white():
  rgba = mode_variant("RGBA")
  alpha = np.asarray(rgba)[..., 3]
  rgb = np.asarray(rgba)[..., :3].astype(np.float64)
  for data in (encode(rgba, "PNG"), encode(mode_variant("LA"), "PNG")):
    got = np.asarray(images.load_image(data)).astype(np.float64)
    clear, opaque = alpha == 0, alpha == 255
    assert clear.any() and opaque.any()
    assert (got[clear] == 255).all()
  got = np.asarray(images.load_image(encode(rgba, "PNG"))).astype(np.float64)
  a = alpha[..., None] / 255.0
  np.testing.assert_allclose(got, rgb * a + 255 * (1 - a), atol=1.01)
  # Palette image with a transparent index: that block turns white.
  for fmt in ("PNG", "GIF"):
    got = np.asarray(images.load_image(encode(_p_with_transparency(), fmt)))
    assert (got[:60, :90] == 255).all(), fmt
    assert (got[100:] != 255).any(), fmt


def test_gif_first_frame():
  frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 0, 255))]
  buf = io.BytesIO()
  frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
  got = np.asarray(images.load_image(buf.getvalue()))
  assert got.shape == (30, 40, 3)
  assert (got == (255, 0, 0)).all()


# ------------------------------------------------------------- padding ------


def test_pad_color_constant():
  assert images.PAD_COLOR == (122, 116, 104)
  assert images.PAD_COLOR == tuple(int(x * 255) for x in images.CLIP_MEAN)


@pytest.mark.parametrize("w,h", [(451, 300), (300, 451), (64, 64), (7, 2)])
def test_pad_to_square_places_image_like_llava(w, h):
  src = photo("chelsea").resize((w, h))
  out = images.pad_to_square(src)
  s = max(w, h)
  assert out.mode == "RGB" and out.size == (s, s)
  a = np.asarray(out)
  x0, y0 = ((s - w) // 2, 0) if h > w else (0, (s - h) // 2)
  np.testing.assert_array_equal(a[y0:y0 + h, x0:x0 + w], np.asarray(src))
  mask = np.ones((s, s), bool)
  mask[y0:y0 + h, x0:x0 + w] = False
  assert (a[mask] == images.PAD_COLOR).all()
  assert mask.sum() == s * s - w * h


def test_padded_region_after_normalization():
  pad = np.asarray(images.PAD_COLOR) / 255.0
  want = (pad - np.asarray(images.CLIP_MEAN)) / np.asarray(images.CLIP_STD)
  img = photo("rocket")  # 640 x 427: 106 pad rows above, 107 below.
  out = images.preprocess(img, 336, "pad")
  # 106 / 640 * 336 = 55.6 output rows of padding; bicubic reaches ~4 rows.
  np.testing.assert_allclose(out[:50], np.broadcast_to(want, (50, 336, 3)),
                             atol=1e-6)
  np.testing.assert_allclose(out[-50:], np.broadcast_to(want, (50, 336, 3)),
                             atol=1e-6)
  tall = images.preprocess(img.transpose(Image.Transpose.TRANSPOSE), 336, "pad")
  np.testing.assert_allclose(tall[:, :50], np.broadcast_to(want, (336, 50, 3)),
                             atol=1e-6)
  # The image itself is not padding.
  assert np.abs(out[150:190] - want).max() > 0.5


# ---------------------------------------------------------------- EXIF ------


def _oriented(fmt, orientation):
  a = np.zeros((40, 60, 3), np.uint8)  # W=60, H=40.
  a[:, :] = (0, 0, 255)
  a[:10, :10] = (255, 0, 0)  # top-left marker
  img = Image.fromarray(a)
  exif = Image.Exif()
  exif[0x0112] = orientation
  return img, encode(img, fmt, exif=exif.tobytes())


@pytest.mark.parametrize("orientation,transpose", [
    (6, Image.Transpose.ROTATE_270),  # stored rotated left: turn 90 deg CW
    (8, Image.Transpose.ROTATE_90),   # stored rotated right: turn 90 deg CCW
])
def test_exif_orientation(orientation, transpose):
  img, png = _oriented("PNG", orientation)
  got = images.load_image(png)
  assert got.size == (40, 60)
  np.testing.assert_array_equal(np.asarray(got),
                                np.asarray(img.transpose(transpose)))
  _, jpg = _oriented("JPEG", orientation)
  got = np.asarray(images.load_image(jpg)).astype(int)
  assert got.shape == (60, 40, 3)
  red = (255, 0, 0)
  corner = (got[2:8, -8:-2] if orientation == 6 else got[-8:-2, 2:8])
  assert np.abs(corner - red).max() < 40, corner.mean((0, 1))
  assert np.abs(got[2:8, 2:8] - red).max() > 100  # not left unrotated


# ----------------------------------------------------------- bad input ------


def test_missing_file(tmp_path):
  path = tmp_path / "missing" / "nope.jpg"
  with pytest.raises(images.ImageError, match="nope.jpg"):
    images.load_image(path)
  with pytest.raises(images.ImageError, match="nope.jpg"):
    images.load_and_preprocess(str(path), 64, "pad")


def test_truncated_jpeg(tmp_path):
  data = encode(photo("astronaut"), "JPEG", quality=90)
  path = tmp_path / "cut.jpg"
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(images.ImageError, match="cut.jpg.*truncated"):
    images.load_image(path)
  with pytest.raises(images.ImageError, match="sample-17"):
    images.load_image(data[:len(data) // 2], name="sample-17")
  with pytest.raises(images.ImageError, match="cut2.jpg"):
    images.load_image(data[:300], name="cut2.jpg")  # header only


def test_random_bytes_and_empty(tmp_path):
  path = tmp_path / "noise.png"
  path.write_bytes(np.random.default_rng(0).bytes(5000))
  with pytest.raises(images.ImageError, match="noise.png"):
    images.load_image(str(path))
  path = tmp_path / "empty.jpg"
  path.write_bytes(b"")
  with pytest.raises(images.ImageError, match="empty.jpg"):
    images.load_image(path)
  with pytest.raises(images.ImageError, match="<bytes>"):
    images.load_image(b"not an image at all")


def _png_header_only(w, h):
  def chunk(kind, body):
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)
  ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
  idat = zlib.compress(b"\0" * 64)
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
          + chunk(b"IEND", b""))


def test_decompression_bomb(tmp_path):
  path = tmp_path / "bomb.png"
  path.write_bytes(_png_header_only(100_000, 100_000))  # 10^10 pixels
  with pytest.raises(images.ImageError, match="bomb.png.*pixels"):
    images.load_image(path)
  path.write_bytes(_png_header_only(9000, 9000))  # 81M: over our 67M limit
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    with pytest.raises(images.ImageError, match="bomb.png.*max_pixels"):
      images.load_image(path)
  data = encode(photo("coffee"), "PNG")  # 600 x 400
  with pytest.raises(images.ImageError, match="coffee.png.*max_pixels"):
    images.load_image(data, name="coffee.png", max_pixels=200_000)
  assert images.load_image(data, max_pixels=240_000).size == (600, 400)


# ---------------------------------------------------------- odd shapes ------


def test_extreme_aspect_is_bounded_and_close():
  strip = photo("astronaut").resize((2000, 3))  # 1:667
  for mode in MODES:
    # A low limit forces the bounded path; it stays close to HF.
    out = images.preprocess(strip, 64, mode, max_pixels=20_000)
    ref = hf_reference(strip, 64, mode)
    assert out.shape == (64, 64, 3)
    assert np.abs(out - ref).mean() < 0.02, mode
    assert np.abs(out - ref).max() < 0.5, mode
    # Under the default limit it is exact.
    assert_matches_hf(images.preprocess(strip, 64, mode), strip, 64, mode,
                      "strip")


def test_api_contract():
  img = photo("coffee")
  out = images.preprocess(img, 64, "crop")
  assert out.dtype == np.float32 and out.shape == (64, 64, 3)
  assert out.flags.c_contiguous
  data = encode(img, "PNG")
  np.testing.assert_array_equal(images.load_and_preprocess(data, 64, "pad"),
                                images.preprocess(images.load_image(data), 64,
                                                  "pad"))
  with pytest.raises(ValueError, match="mode"):
    images.preprocess(img, 64, "squash")
  with pytest.raises(ValueError, match="size"):
    images.preprocess(img, 0, "pad")
  with pytest.raises(TypeError):
    images.load_image(12345)
  assert issubclass(images.ImageError, ValueError)
