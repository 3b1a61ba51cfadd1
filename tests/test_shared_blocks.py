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
  worker, reader = WorkerBlocks(blocks=2), BlockReader()
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


def test_a_free_block_too_small_is_replaced_by_a_larger_one():
  worker, reader = WorkerBlocks(blocks=1), BlockReader()
  small = worker.write(_group(1), (6, 4))
  reader.array(small)  # viewed, then collected: FREE again
  big = [np.full((1 << 20, 5), 7, np.uint8)]  # 5 MiB: more than the first block holds
  ref = worker.write(big, (1 << 20, 5))
  assert ref.name != small.name
  np.testing.assert_array_equal(reader.array(ref)[-3:], 7)


def _worker(conn, groups: int) -> None:
  """Sends `groups` groups through 3 blocks, waiting for a go after each."""
  worker = WorkerBlocks(blocks=3)
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
