"""Shared-memory blocks that a Grain worker reuses for the patches it sends.

Grain sends each array through a shared-memory segment of its own, created for it. The
kernel allocates and zeroes a new segment's pages as they are first written: for the
patches of a group (about 176 KB an image at S/16 or B/16 sizes) that system time was
0.15 ms an image, 7% of the whole per-example work. So each worker process keeps a few
segments and writes each group into one the main process has released, whose pages are
already there.

Protocol. Byte 0 of a block is its state, FREE or SENT. The worker (`WorkerBlocks.write`,
on any of its threads) claims a FREE block by marking it SENT, copies a group's patches
into it and sends a `BlockRef` (the block's name, the worker's pid, where the patches lie
and their shape). The main process
(`BlockReader.array`) maps the block by name the first time it sees it and unlinks the
name at once, so the segment lives exactly as long as the two processes map it; it hands
out the patches as an array whose views the examples carry, and marks the block FREE when
that array and its last view are gone (weakref.finalize: the views keep the array alive).
A block is therefore rewritten only after the main process is done with it. A worker with
no FREE block that may not make another (BLOCKS made, or the shared-memory filesystem
short of room) returns None from `write`, and the caller sends a fresh Grain segment as
before. A FREE block too small for a group is replaced by a larger one when no more may
be made.
The main process drops the mappings of exited workers (Grain starts new workers after a
`set_state`) once nothing views them.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import threading
import weakref
from collections.abc import Sequence
from multiprocessing import shared_memory

import numpy as np

HEADER_BYTES = 64  # the state byte, padded so that the patches start aligned
# Per worker, at most: blocks are made only while none is FREE, so a worker holds about the
# groups in flight plus those whose examples await packing (a few; more with one worker).
BLOCKS = 32
MIN_BLOCK_BYTES = 4 << 20  # blocks are powers of two from here, 5/4 of the group or more
SHM_DIR = "/dev/shm"  # where Linux keeps POSIX shared memory (a tmpfs of limited size)
FREE, SENT = 0, 1


@dataclasses.dataclass(frozen=True)
class BlockRef:
  """Where a worker wrote a group's patches: uint8 `shape` at byte `offset` of block
  `name`, made by worker process `pid`."""

  name: str
  pid: int
  offset: int
  shape: tuple[int, ...]


class WorkerBlocks:
  """The blocks of one worker process (see the module docstring).

  A block's memory is allocated whole when it is made (posix_fallocate where SHM_DIR
  exists), and only while the shared-memory filesystem keeps four times as much free: a
  full tmpfs would otherwise kill the worker with SIGBUS at the first write past its end.
  """

  def __init__(self, blocks: int = BLOCKS):
    self._max = blocks
    self._blocks: list[shared_memory.SharedMemory] = []
    self._lock = threading.Lock()  # a worker preprocesses groups on several threads
    self._made = 0

  def write(self, arrays: Sequence[np.ndarray], shape: tuple[int, ...]) -> BlockRef | None:
    """Concatenates uint8 `arrays` (along axis 0, `shape` in all) into a FREE block; None
    when there is none and no new one may be made. Thread-safe."""
    block = self._claim(int(np.prod(shape)))
    if block is None:
      return None
    out = np.ndarray(shape, np.uint8, buffer=block.buf, offset=HEADER_BYTES)
    try:
      np.concatenate(arrays, out=out)
    except BaseException:
      block.buf[0] = FREE
      raise
    finally:
      del out  # no export of the buffer outlives the call
    return BlockRef(block.name, os.getpid(), HEADER_BYTES, tuple(shape))

  def _claim(self, nbytes: int) -> shared_memory.SharedMemory | None:
    """A FREE block of at least `nbytes`, marked SENT before another thread can take it."""
    with self._lock:
      free = [b for b in self._blocks if b.buf[0] == FREE]
      block = next((b for b in free if b.size - HEADER_BYTES >= nbytes), None)
      if block is None and free and len(self._blocks) == self._max:
        self._blocks.remove(free[0])  # too small: a larger one takes its place
        free[0].close()
      if block is None and len(self._blocks) < self._max:
        block = self._make(nbytes)
      if block is not None:
        block.buf[0] = SENT  # the main process reads it only once it has been sent
      return block

  def _make(self, nbytes: int) -> shared_memory.SharedMemory | None:
    size = MIN_BLOCK_BYTES
    while size < HEADER_BYTES + nbytes * 5 // 4:
      size *= 2
    if os.path.isdir(SHM_DIR):
      room = os.statvfs(SHM_DIR)
      if room.f_bavail * room.f_frsize < 4 * size:
        return None
    name = f"nvc{os.getpid()}_{self._made}_{secrets.token_hex(3)}"
    block = shared_memory.SharedMemory(name=name, create=True, size=size)
    self._made += 1
    if os.path.isdir(SHM_DIR):
      fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
      try:
        os.posix_fallocate(fd, 0, size)
      except OSError:  # no room after all
        block.close()
        block.unlink()
        return None
      finally:
        os.close(fd)
    self._blocks.append(block)  # a new segment reads as zeros: FREE
    return block


class BlockReader:
  """The main process's side: maps workers' blocks and releases them (see the module
  docstring)."""

  def __init__(self):
    self._mapped: dict[str, tuple[shared_memory.SharedMemory, int]] = {}  # name: (, pid)
    self._viewed: dict[str, int] = {}  # name: arrays handed out and not yet collected
    self._lock = threading.Lock()  # the last view may go in another thread

  def array(self, ref: BlockRef) -> np.ndarray:
    """The patches of `ref`: uint8 `ref.shape`, in the block until it is collected."""
    with self._lock:
      if ref.name not in self._mapped:
        self.drop_exited()
        block = shared_memory.SharedMemory(name=ref.name)
        block.unlink()  # the name goes; the memory stays while either process maps it
        self._mapped[ref.name] = (block, ref.pid)
      block = self._mapped[ref.name][0]
      patches = np.ndarray(ref.shape, np.uint8, buffer=block.buf, offset=ref.offset)
      self._viewed[ref.name] = self._viewed.get(ref.name, 0) + 1
    weakref.finalize(patches, self._release, ref.name)
    return patches

  def _release(self, name: str) -> None:
    with self._lock:
      self._viewed[name] -= 1
      if not self._viewed[name]:
        self._mapped[name][0].buf[0] = FREE

  def drop_exited(self) -> None:
    """Closes the blocks of worker processes that have exited, once nothing views them."""
    for name, (block, pid) in list(self._mapped.items()):
      if not self._viewed.get(name) and not _alive(pid):
        block.close()
        del self._mapped[name]
        self._viewed.pop(name, None)

  def blocks(self) -> int:
    """How many blocks are mapped."""
    return len(self._mapped)


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True
