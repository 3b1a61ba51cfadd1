"""Model sizes: named ones and explicit "w<width>-d<depth>-m<mlp>-h<heads>" ones."""

import pytest

from navit_clip.variants import SIZES, Size, parse_variant, size_name


def test_explicit_sizes_parse_and_named_sizes_keep_their_names():
  assert parse_variant("w32-d2-m64-h2/8") == (Size(32, 2, 64, 2), 8)
  assert parse_variant("w24-d1-m48-h3") == (Size(24, 1, 48, 3), None)
  assert parse_variant("w768-d12-m3072-h12/16") == parse_variant("B/16")
  assert size_name(SIZES["So400m"]) == "So400m"
  assert size_name(Size(32, 2, 64, 2)) == "w32-d2-m64-h2"
  assert parse_variant(size_name(Size(40, 3, 96, 5))) == (Size(40, 3, 96, 5), None)


@pytest.mark.parametrize("variant,message", [
    ("w32-d0-m64-h2/8", "every dimension >= 1"),
    ("w32-d2-m64/8", "unknown model size 'w32-d2-m64'"),
    ("w32-d2-m64-h2/x", "must be an integer"),
])
def test_bad_variants_are_named(variant, message):
  with pytest.raises(ValueError, match=message):
    parse_variant(variant)
