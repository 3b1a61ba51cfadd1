"""Robust image decoding: encoded bytes -> uint8 RGB [H, W, 3], or a named reason to skip.

Two steps, so the target size can be chosen between them: `open_image` reads only the
header (format, size, EXIF orientation) and refuses what must not be decoded; then
`OpenedImage.load(draft_hw)` decodes. For a JPEG much larger than its target, `load` asks
libjpeg for a reduced-scale decode (1/2, 1/4 or 1/8: PIL's `draft`), which is several times
faster and still at least the target size, so the final resize only shrinks.

Decoders (`config.data.decode.decoder`): "pil" decodes everything with PIL. "auto" (the
default) decodes baseline and progressive RGB and grayscale JPEGs with libjpeg-turbo through
simplejpeg, straight into a NumPy array, at the scale PIL's draft would choose, with the
same accurate IDCT and smooth chroma upsampling, and applies the EXIF orientation with the
same flips and rotations: the same pixels as "pil" wherever the libjpeg-turbo builds of the
two agree (bit for bit with Pillow 13.0 and simplejpeg 1.9.0, tested; not with a Pillow
built on another libjpeg), about 1.3x faster to decode, without PIL's copies. Everything
else goes to PIL: other formats, CMYK / YCCK JPEGs, and any JPEG that simplejpeg refuses or
warns about (truncated or corrupt data, 12-bit), so the reasons for bad bytes are PIL's.

Every input is turned into RGB: grayscale, palette, CMYK, 16-bit and float modes are
converted (16-bit values scaled by 1/256, not clipped); alpha is composited over white;
EXIF orientation is applied; animated GIF/WebP and multi-page TIFF give their first frame.

Failures raise `DecodeError(reason)` with one of REASONS, never anything else for bad
bytes, so that a caller can count and skip them.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import warnings

import ml_collections
import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from navit_clip.choices import check_choice, check_range

REASONS = ("empty", "not_an_image", "unsupported_format", "mislabelled", "decompression_bomb",
           "too_small", "extreme_aspect", "truncated", "corrupt")
FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# File extension or declared format -> PIL format name, for the mislabelled check.
EXTENSIONS = {"jpg": "JPEG", "jpeg": "JPEG", "jpe": "JPEG", "png": "PNG", "webp": "WEBP",
              "gif": "GIF", "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF"}
_SWAPS_AXES = (5, 6, 7, 8)  # EXIF orientations that transpose the image
_EXIF_ORIENTATION = 0x0112
_WHITE = (255, 255, 255)
# Leading bytes of the supported formats: unidentifiable bytes with one are corrupt images.
_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00",
          b"MM\x00*")
# What PIL raises on bad bytes, across its format plugins.
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError,
               ZeroDivisionError, struct.error)
MISLABELLED_POLICIES = ("decode", "skip")
DECODERS = ("auto", "pil")
_TURBO_MODES = ("RGB", "L")  # PIL modes of the JPEGs that "auto" decodes with libjpeg-turbo
# EXIF orientation -> the flip / rotation that displays the image, as in PIL's
# ImageOps.exif_transpose (FLIP_LEFT_RIGHT, ROTATE_180, FLIP_TOP_BOTTOM, TRANSPOSE,
# ROTATE_270, TRANSVERSE, ROTATE_90)
_ORIENT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1),
           7: lambda a: a[::-1, ::-1].transpose(1, 0, 2), 8: lambda a: np.rot90(a, 1)}


def check_config(cfg: ml_collections.ConfigDict | DecodeLimits,
                 prefix: str = "config.data.decode.") -> None:
  """Checks config.data.decode (its `decoder` among them), or the same fields of a
  DecodeLimits (0 turns a limit off).

  `prefix` + field name names a field in the errors ("config.data.decode.max_pixels").
  """
  check_choice(f"{prefix}mislabelled", cfg.mislabelled, MISLABELLED_POLICIES)
  if isinstance(cfg, ml_collections.ConfigDict):
    check_choice(f"{prefix}decoder", cfg.decoder, DECODERS)
  for name in ("max_pixels", "min_side", "max_aspect"):
    check_range(f"{prefix}{name}", getattr(cfg, name), 0)


class DecodeError(ValueError):
  """Bytes that cannot or must not become an image; `reason` is one of REASONS."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
  """What `open_image` refuses before decoding.

  Attributes:
    max_pixels: width * height above this is a decompression bomb (0 = no limit).
    min_side: images with a side shorter than this many pixels are too small (0 = none).
    max_aspect: long side / short side above this is an extreme aspect (0 = none).
    mislabelled: "decode" decodes bytes whose content disagrees with their declared format
      (a PNG named .jpg) and only notes it; "skip" refuses them.
  """

  max_pixels: int = 100_000_000
  min_side: int = 8
  max_aspect: float = 20.0
  mislabelled: str = "decode"

  def __post_init__(self):
    check_config(self, prefix="DecodeLimits.")


def declared_format(name: str | None) -> str | None:
  """'x.JPG' / 'jpeg' / 'image/png' -> 'JPEG' / 'JPEG' / 'PNG'; None if unknown."""
  if not name:
    return None
  return EXTENSIONS.get(name.rsplit("/", 1)[-1].rsplit(".", 1)[-1].lower())


class OpenedImage:
  """An image whose header has been read and accepted; `load` decodes it.

  Attributes:
    size_hw: (height, width) after EXIF orientation, in pixels.
    format: PIL's name of the detected format.
    mislabelled: the content's format differs from the declared one.
  """

  def __init__(self, image: Image.Image, mislabelled: bool, data: bytes | None = None,
               decoder: str = "pil"):
    """`data`, the encoded bytes of `image`, lets the "auto" decoder read them itself."""
    self._image = image
    self.format = image.format
    self.mislabelled = mislabelled
    w, h = image.size
    self._orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    self._transposed = self._orientation in _SWAPS_AXES
    self.size_hw = (w, h) if self._transposed else (h, w)
    turbo = (decoder == "auto" and data is not None and self.format in ("JPEG", "MPO")
             and image.mode in _TURBO_MODES)
    self._turbo_data = data if turbo else None

  def load(self, draft_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Decodes to uint8 [H, W, 3] RGB, oriented.

    Args:
      draft_hw: the (height, width) the caller will resize to. A JPEG is then decoded at
        the smallest of scales 1, 1/2, 1/4, 1/8 that is still at least this size, so H, W
        may be smaller than `size_hw`. None decodes at full size.

    Raises:
      DecodeError: "truncated" or "corrupt".
    """
    im = self._image
    try:
      want_wh = None
      if draft_hw is not None and self.format in ("JPEG", "MPO"):
        h, w = draft_hw
        want_wh = (h, w) if self._transposed else (w, h)
      if self._turbo_data is not None:
        pixels = _turbo_decode(self._turbo_data, im.size, _draft_scale(im.size, want_wh))
        if pixels is not None:
          orient = _ORIENT.get(self._orientation)
          return pixels if orient is None else np.ascontiguousarray(orient(pixels))
      if want_wh is not None:
        im.draft(None, want_wh)
      im.load()
      im = ImageOps.exif_transpose(im)
      return _to_rgb(im)
    except DecodeError:
      raise
    except _PIL_ERRORS as e:
      reason = "truncated" if "truncated" in str(e) or isinstance(e, EOFError) else "corrupt"
      raise DecodeError(reason, f"{type(e).__name__}: {e}") from None
    finally:
      self._image.close()


def _draft_scale(size_wh: tuple[int, int], want_wh: tuple[int, int] | None) -> int:
  """The reduction PIL's JPEG `draft` picks: the largest of 8, 4, 2, 1 that divides neither
  side below the wanted one (1 when nothing is wanted)."""
  if want_wh is None:
    return 1
  scale = min(size_wh[0] // want_wh[0], size_wh[1] // want_wh[1])
  return next(s for s in (8, 4, 2, 1) if scale >= s or s == 1)


def _turbo_decode(data: bytes, size_wh: tuple[int, int], scale: int) -> np.ndarray | None:
  """A JPEG -> uint8 [ceil(H / scale), ceil(W / scale), 3] RGB with libjpeg-turbo (stored
  orientation), or None where simplejpeg refuses it or warns (PIL then decodes it)."""
  w, h = size_wh
  out_h, out_w = -(-h // scale), -(-w // scale)
  try:
    if tuple(simplejpeg.decode_jpeg_header(data)[:2]) != (h, w):
      return None
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=out_h,
                                    min_width=out_w)
  except (ValueError, RuntimeError):
    return None
  return pixels if pixels.shape == (out_h, out_w, 3) else None


def _wide_gray_to_rgb(im: Image.Image) -> np.ndarray:
  """16-bit, int32 or float gray -> uint8 [H, W, 3], converted in place in the image's own
  dtype (uint16 / int32 / float32), never in an int64 or float64 copy: 16-bit values are
  divided by 256 (as are int32 ones when any exceeds 255), then clipped to [0, 255]."""
  values = np.array(im)  # writable, the image's dtype
  if im.mode != "F" and (im.mode.startswith("I;16") or values.max(initial=0) > 255):
    values >>= 8
  np.clip(values, 0, 255, out=values)
  gray = values.astype(np.uint8)
  del values
  return np.repeat(gray[..., None], 3, axis=-1)


def _to_rgb(im: Image.Image) -> np.ndarray:
  """Any PIL mode -> uint8 [H, W, 3]."""
  mode = im.mode
  if mode == "RGB":
    return np.asarray(im)
  if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
    return _wide_gray_to_rgb(im)
  if mode == "P":
    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
  elif mode in ("LA", "La", "PA", "RGBa"):
    im = im.convert("RGBA")
  if im.mode == "RGBA":
    background = Image.new("RGBA", im.size, _WHITE + (255,))
    return np.asarray(Image.alpha_composite(background, im).convert("RGB"))
  return np.asarray(im.convert("RGB"))


def open_image(data: bytes, limits: DecodeLimits = DecodeLimits(),
               declared: str | None = None, decoder: str = "auto") -> OpenedImage:
  """Reads the header of encoded image bytes and checks them against `limits`.

  Args:
    data: the encoded file.
    limits: what to refuse.
    declared: the format the bytes claim to be (a file name, an extension or a format
      name such as "jpeg"), or None.
    decoder: one of DECODERS, for `OpenedImage.load` (see the module docstring).

  Raises:
    DecodeError: "empty", "not_an_image", "unsupported_format", "mislabelled" (only with
      limits.mislabelled == "skip"), "decompression_bomb", "too_small", "extreme_aspect",
      "corrupt".
  """
  check_choice("decoder", decoder, DECODERS)
  if data is None or len(data) == 0:
    raise DecodeError("empty")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      im = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise DecodeError("decompression_bomb", str(e)) from None
  except Image.UnidentifiedImageError:
    head = bytes(data[:16])
    image_like = head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")
    raise DecodeError("corrupt" if image_like else "not_an_image",
                      f"{len(data)} bytes starting {head[:8]!r}") from None
  except _PIL_ERRORS as e:
    raise DecodeError("corrupt", f"{type(e).__name__}: {e}") from None
  if im.format not in FORMATS:
    im.close()
    raise DecodeError("unsupported_format", str(im.format))
  want = declared_format(declared)
  content = "JPEG" if im.format == "MPO" else im.format
  mislabelled = want is not None and want != content
  if mislabelled and limits.mislabelled == "skip":
    im.close()
    raise DecodeError("mislabelled", f"declared {want}, content {content}")
  w, h = im.size
  if limits.max_pixels and w * h > limits.max_pixels:
    im.close()
    raise DecodeError("decompression_bomb", f"{w}x{h} > {limits.max_pixels} pixels")
  if min(w, h) < max(limits.min_side, 1):
    im.close()
    raise DecodeError("too_small", f"{w}x{h}")
  if limits.max_aspect and max(w, h) > limits.max_aspect * min(w, h):
    im.close()
    raise DecodeError("extreme_aspect", f"{w}x{h}")
  try:
    return OpenedImage(im, mislabelled, bytes(data), decoder)
  except _PIL_ERRORS as e:
    im.close()
    reason = "truncated" if "truncated" in str(e) else "corrupt"
    raise DecodeError(reason, f"reading metadata: {type(e).__name__}: {e}") from None
