"""Decoding every supported format and mode to RGB; limits; reduced-scale JPEG decode; the
libjpeg-turbo decoder ("auto") against PIL's."""

import io

import ml_collections
import numpy as np
import pytest
import simplejpeg
from PIL import Image, ImageOps

from data_fixtures import decode_image, encode, image_array
from navit_clip.data import decode
from navit_clip.data.decode import DecodeError, DecodeLimits, open_image


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_formats_decode_to_rgb(fmt):
  rgb = image_array(12, 20)
  out = decode_image(encode(rgb, fmt))
  assert out.dtype == np.uint8 and out.shape == (12, 20, 3)
  if fmt in ("PNG", "BMP", "TIFF"):
    np.testing.assert_array_equal(out, rgb)


def test_modes_become_rgb():
  rgb = image_array(8, 8)
  gray = decode_image(encode(Image.fromarray(rgb[..., 0]), "PNG"))
  np.testing.assert_array_equal(gray, np.repeat(rgb[..., :1], 3, -1))
  sixteen = np.full((8, 8), 200 * 256 + 255, np.uint16)
  np.testing.assert_array_equal(decode_image(encode(Image.fromarray(sixteen), "PNG")), 200)
  rgba = np.dstack([rgb, np.zeros((8, 8), np.uint8)])
  rgba[0, 0, 3] = 255
  out = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
  assert (out[1:, 1:] == 255).all()  # transparent -> white
  np.testing.assert_array_equal(out[0, 0], rgb[0, 0])
  cmyk = decode_image(encode(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95))
  assert np.abs(cmyk.astype(int) - rgb).mean() < 12
  bilevel = decode_image(encode(Image.fromarray(rgb).convert("1"), "PNG"))
  assert set(np.unique(bilevel)) <= {0, 255}


def test_exif_orientation_applied():
  rgb = image_array(20, 40)
  exif = Image.Exif()
  exif[0x0112] = 6  # rotate 90 clockwise to display
  data = encode(rgb, "PNG", exif=exif.tobytes())
  opened = open_image(data)
  assert opened.size_hw == (40, 20)
  out = opened.load()
  np.testing.assert_array_equal(out, np.rot90(rgb, k=-1))


def test_draft_decodes_jpeg_at_reduced_scale_not_below_target():
  data = encode(image_array(384, 512), "JPEG")
  opened = open_image(data)
  assert opened.size_hw == (384, 512)
  small = opened.load(draft_hw=(90, 120))
  assert small.shape == (96, 128, 3)  # 1/4 scale: the smallest at least 90 x 120
  assert open_image(data).load(draft_hw=(300, 400)).shape == (384, 512, 3)
  assert open_image(encode(image_array(384, 512), "PNG")).load((90, 120)).shape == (384, 512, 3)


@pytest.mark.parametrize("data, reason", [
    (b"", "empty"),
    (b"GIF89a" + b"\0" * 4, "corrupt"),
    (b"hello world", "not_an_image"),
])
def test_bad_bytes_raise_decode_error(data, reason):
  with pytest.raises(DecodeError) as e:
    decode_image(data)
  assert e.value.reason == reason


def test_limits():
  data = encode(image_array(30, 40), "PNG")
  for limits, reason in [(DecodeLimits(max_pixels=1000), "decompression_bomb"),
                         (DecodeLimits(min_side=31), "too_small"),
                         (DecodeLimits(max_aspect=1.2), "extreme_aspect")]:
    with pytest.raises(DecodeError) as e:
      open_image(data, limits)
    assert e.value.reason == reason
  assert open_image(data, DecodeLimits(max_pixels=0, min_side=0, max_aspect=0)).size_hw == (30, 40)
  assert open_image(data, declared="x.jpg").mislabelled
  assert not open_image(data, declared="x.PNG").mislabelled
  with pytest.raises(DecodeError, match="mislabelled"):
    open_image(data, DecodeLimits(mislabelled="skip"), declared="jpeg")


def _pil_reference(data: bytes, draft_wh=None) -> np.ndarray:
  """PIL alone, as the "pil" decoder has always decoded: draft, load, orient, RGB."""
  im = Image.open(io.BytesIO(data))
  if draft_wh is not None:
    im.draft(None, draft_wh)
  im.load()
  return np.asarray(ImageOps.exif_transpose(im).convert("RGB"))


def _exif(orientation: int) -> bytes:
  exif = Image.Exif()
  exif[0x0112] = orientation
  return exif.tobytes()


RGB = image_array(97, 131)
JPEGS = {
    "4:2:0": encode(RGB, "JPEG", quality=90),
    "4:4:4": encode(RGB, "JPEG", quality=90, subsampling=0),
    "progressive": encode(RGB, "JPEG", quality=80, progressive=True),
    "gray": encode(Image.fromarray(RGB).convert("L"), "JPEG"),
    **{f"exif {k}": encode(RGB, "JPEG", exif=_exif(k)) for k in range(1, 9)},
}


@pytest.mark.parametrize("name", sorted(JPEGS))
@pytest.mark.parametrize("draft_hw", [None, (97, 131), (40, 60), (20, 30), (10, 12)])
def test_auto_decodes_jpegs_like_pil(name, draft_hw, monkeypatch):
  """"pil" gives PIL's own pixels exactly; "auto" decodes with libjpeg-turbo at the same
  scale and orientation, within JPEG decoder tolerance (here: bit for bit)."""
  data = JPEGS[name]
  turbo_calls = []
  decode_jpeg = simplejpeg.decode_jpeg
  monkeypatch.setattr(decode.simplejpeg, "decode_jpeg",
                      lambda *a, **k: turbo_calls.append(1) or decode_jpeg(*a, **k))
  pil = open_image(data, decoder="pil")
  transposed = pil.size_hw != Image.open(io.BytesIO(data)).size[::-1]
  want_wh = None if draft_hw is None else (draft_hw[::-1] if not transposed else draft_hw)
  old = pil.load(draft_hw)
  np.testing.assert_array_equal(old, _pil_reference(data, want_wh))
  assert not turbo_calls
  new = open_image(data, decoder="auto").load(draft_hw)
  assert turbo_calls and new.shape == old.shape and new.flags.c_contiguous
  assert np.abs(new.astype(int) - old).max() <= 2


@pytest.mark.parametrize("data, reason", [
    (JPEGS["4:2:0"][:len(JPEGS["4:2:0"]) // 2], "truncated"),
    (JPEGS["4:2:0"][:200] + b"\x00" * 300, "corrupt"),
])
def test_auto_leaves_bad_jpegs_to_pil(data, reason):
  """libjpeg-turbo refuses them; PIL then decides, with the reason it always gave."""
  for decoder in ("pil", "auto"):
    with pytest.raises(DecodeError) as e:
      open_image(data, decoder=decoder).load()
    assert e.value.reason == reason


def test_auto_leaves_cmyk_and_other_formats_to_pil(monkeypatch):
  monkeypatch.setattr(decode.simplejpeg, "decode_jpeg", lambda *a, **k: pytest.fail("used"))
  cmyk = encode(Image.fromarray(RGB).convert("CMYK"), "JPEG", quality=95)
  for data in (cmyk, encode(RGB, "PNG"), encode(RGB, "WEBP")):
    np.testing.assert_array_equal(open_image(data, decoder="auto").load(),
                                  open_image(data, decoder="pil").load())


def test_decoder_is_checked():
  cfg = ml_collections.ConfigDict({"mislabelled": "decode", "decoder": "turbo",
                                   "max_pixels": 0, "min_side": 0, "max_aspect": 0})
  with pytest.raises(ValueError, match=r"config.data.decode.decoder = 'turbo'"):
    decode.check_config(cfg)
  with pytest.raises(ValueError, match="decoder = 'turbo'"):
    open_image(JPEGS["gray"], decoder="turbo")
