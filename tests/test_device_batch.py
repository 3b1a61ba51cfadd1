"""to_global_batch: host rows -> global jax.Arrays with the data sharding (one device)."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from navit_clip.data.batch import BatchSpec
from navit_clip.data.device import to_global_batch


def test_to_global_batch_on_one_device():
  spec = BatchSpec(batch_size=2, seq_len=8, max_images=2, patch_size=2, text_len=4)
  host = spec.zeros()
  host["patches"][:] = np.arange(host["patches"].size, dtype=np.uint8).reshape(
      host["patches"].shape)
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  sharding = NamedSharding(mesh, PartitionSpec("data"))
  out = to_global_batch(host, sharding)
  assert out.keys() == host.keys()
  for name, arr in out.items():
    assert isinstance(arr, jax.Array) and arr.sharding == sharding
    assert arr.dtype == jax.dtypes.canonicalize_dtype(host[name].dtype)  # int64 -> int32
    assert arr.shape == host[name].shape  # unless jax_enable_x64
    np.testing.assert_array_equal(np.asarray(arr), host[name])
  per_field = to_global_batch(host, {k: sharding for k in host})
  np.testing.assert_array_equal(np.asarray(per_field["example_id"]), host["example_id"])
