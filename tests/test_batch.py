"""The packed-batch contract: which fields stay on the host."""

from navit_clip.data.batch import HOST_ONLY_FIELDS, BatchSpec, device_fields


def test_device_fields_leave_the_host_only_fields_on_the_host():
  batch = BatchSpec(batch_size=2, seq_len=8, max_images=2, patch_size=2, text_len=4).zeros()
  assert HOST_ONLY_FIELDS == ("example_id",) and "example_id" in batch
  sent = device_fields(batch)
  assert sorted(sent) == ["grid_hw", "image_mask", "patches", "positions", "segment_ids",
                          "text_tokens"]
  assert all(sent[k] is batch[k] for k in sent)
  assert "text_tokens" not in device_fields(batch, drop=("text_tokens",))
