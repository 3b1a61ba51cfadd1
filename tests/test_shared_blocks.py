"""Workers' reused shared-memory blocks: a block is rewritten only once the main process
holds no view of it, and a worker with none free falls back to a fresh segment."""

import gc
import multiprocessing

import numpy as np

from navit_clip.data.shared_blocks import BlockReader, WorkerBlocks


def _group(value: int, rows: int = 6) -> list[np.ndarray]:
  return [np.full((rows // 2, 4), value, np.uint8), np.full((rows - rows // 2, 4), value,
                                                            np.uint8)]


def test_a_block_is_reused_only_after_its_last_view_is_gone():
  worker, reader = WorkerBlocks(blocks=2, block_bytes=4096), BlockReader()
  first = worker.write(_group(1), (6, 4))
  second = worker.write(_group(2), (6, 4))
  assert first.name != second.name
  a, b = reader.array(first), reader.array(second)
  assert worker.write(_group(3), (6, 4)) is None  # both viewed: the caller sends a segment
  view = a[2:5]  # an example's patches: keeps the block viewed
  del a
  gc.collect()
  assert worker.write(_group(3), (6, 4)) is None
  np.testing.assert_array_equal(view, 1)
  del view
  gc.collect()
  again = worker.write(_group(3), (6, 4))  # the first block, free now
  assert again.name == first.name
  np.testing.assert_array_equal(reader.array(again), 3)
  np.testing.assert_array_equal(b, 2)  # the other block was not touched
  assert reader.blocks() == 2


def test_a_group_larger_than_a_block_is_refused():
  assert WorkerBlocks(blocks=1, block_bytes=128).write(_group(1, rows=40), (40, 4)) is None


def _worker(conn, groups: int) -> None:
  """Sends `groups` groups through 3 blocks, waiting for a go after each."""
  worker = WorkerBlocks(blocks=3, block_bytes=1 << 16)
  for g in range(groups):
    ref = worker.write(_group(g % 251, rows=200), (200, 4))
    conn.send(ref)
    conn.recv()
  conn.close()


def test_blocks_cross_processes_and_are_recycled():
  """A spawned worker and this process: 40 groups in 3 blocks, the data of each group as
  written, while the process holds the views of the last two groups."""
  ctx = multiprocessing.get_context("spawn")
  here, there = ctx.Pipe()
  process = ctx.Process(target=_worker, args=(there, 40))
  process.start()
  reader, held, names = BlockReader(), [], set()
  for g in range(40):
    ref = here.recv()
    assert ref is not None  # never more than 3 blocks viewed at once
    names.add(ref.name)
    patches = reader.array(ref)
    np.testing.assert_array_equal(patches, g % 251)
    held = [*held[-1:], patches[10:20]]  # an example of this group and of the one before
    for k, view in enumerate(held):
      np.testing.assert_array_equal(view, (g - len(held) + 1 + k) % 251)
    here.send("go")
  process.join(30)
  assert process.exitcode == 0 and len(names) == 3
  assert reader.blocks() == 3
  reader.drop_exited()
  assert reader.blocks() == 2  # the blocks of the last two groups are still viewed
  del held, patches, view
  gc.collect()
  reader.drop_exited()
  assert reader.blocks() == 0  # the worker has exited and nothing views its blocks
