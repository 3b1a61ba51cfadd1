"""Image sizes and token dropping that fill NaViT rows without shrinking images to them.

Sides stay within the row (a square of side `max_side` is the row's patch count), and the
drop rate rises with the image's patch count (NaViT section 3.3), so large images leave
room for others: about 4 images a row at L=256 and 5 at L=1024 (bench/recipe_packing.py).
"""

MIN_SIDE = 64
MIN_RATE, MAX_RATE = 0.1, 0.7  # drop rate of the smallest / largest images


def sides_within_the_row(data, max_side: int, min_tokens: int, max_tokens: int) -> None:
  """Sets config.data: side ~ U(MIN_SIDE, max_side), resolution-dependent token dropping
  from MIN_RATE at `min_tokens` patches to MAX_RATE at `max_tokens` (the row length)."""
  data.resolution.kind = "uniform_side"
  data.resolution.min_side = MIN_SIDE
  data.resolution.max_side = max_side
  drop = data.token_drop
  drop.kind = "resolution"
  drop.min_rate, drop.max_rate = MIN_RATE, MAX_RATE
  drop.min_tokens, drop.max_tokens = min_tokens, max_tokens
