"""Decoding every supported format and mode to RGB; limits; reduced-scale JPEG decode."""

import numpy as np
import pytest
from PIL import Image

from data_fixtures import decode_image, encode, image_array
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
