"""Write a safetensors file one tensor at a time, hashing its bytes as they are written (no second read for sha256).

`safetensors.save_file` needs every tensor in memory at once and the file must then be read again to hash it. The format is
simple enough to stream: 8-byte little-endian header length, a JSON header (dtype, shape, data offsets of every tensor,
padded with spaces to 8 bytes), then the raw tensor bytes in offset order. Since every shape is known before the first
tensor is read, the header is written first and each tensor is appended as it arrives. The file is byte-identical to what
`safetensors.numpy.save` writes for the same tensors (keys sorted, same JSON layout); the tests check that.

Hashing and writing run on one background thread (hashlib and file writes release the GIL), overlapping the next read.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from textmill.errors import UserError

# Our dtype names -> safetensors' dtype codes and item sizes.
DTYPE_CODES = {"float32": ("F32", 4), "float16": ("F16", 2), "bfloat16": ("BF16", 2)}
# Chunk hashed and then written while it is still in the CPU cache (a tensor is up to ~200 MB).
CHUNK = 4 * 1024 * 1024
IN_FLIGHT = 2  # tensors queued for the writer thread: bounds the memory held beyond the one being read


def header(shapes: dict[str, tuple[int, ...]], dtype: str, metadata: dict[str, str]) -> tuple[bytes, int]:
    """(length prefix + JSON header, data bytes) for tensors stored in sorted key order, as safetensors lays them out."""
    code, itemsize = DTYPE_CODES[dtype]
    entries: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for key in sorted(shapes):
        size = math.prod(shapes[key]) * itemsize
        entries[key] = {"dtype": code, "shape": list(shapes[key]), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, offset


class SafetensorsWriter:
    """`with SafetensorsWriter(path, shapes, dtype) as w: w.add(key, raw_bytes_array)` in sorted key order; `w.sha256`.

    `add` takes a C-contiguous array whose bytes are already in the file's dtype (for bfloat16: its uint16 bits) and
    returns at once; the array is hashed and written on the writer thread. The keys, shapes and byte count are checked
    against the header, so the file can never disagree with what it declares.
    """

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], dtype: str, metadata: dict[str, str]):
        self.path, self.shapes, self.dtype = Path(path), shapes, dtype
        self._head, self._data_bytes = header(shapes, dtype, metadata)
        self._order = deque(sorted(shapes))
        self._hash = hashlib.sha256()
        self._pending: deque[Future] = deque()
        self.sha256: str | None = None

    def __enter__(self) -> "SafetensorsWriter":
        # Buffered: small tensors (biases) are batched; a chunk larger than the buffer goes straight to the OS, uncopied.
        self._file = open(self.path, "wb")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-writer")
        try:
            # Reserve the blocks up front: one allocation instead of one per write, and ENOSPC before any work is done.
            os.posix_fallocate(self._file.fileno(), 0, len(self._head) + self._data_bytes)
        except OSError as e:
            if e.errno != errno.EOPNOTSUPP:  # a file system without fallocate just allocates as it goes
                self._close(wait=False)
                if e.errno == errno.ENOSPC:
                    raise UserError(f"{self.path.parent}: no room for {self._data_bytes / 1e9:.2f} GB of weights "
                                    f"({e.strerror}); free some space or choose another destination") from None
                raise
        self._pending.append(self._pool.submit(self._write, self._head))
        return self

    def add(self, key: str, array: np.ndarray) -> None:
        want = self._order.popleft() if self._order else None
        assert key == want, f"safetensors stream: got {key}, expected {want} (tensors must come in sorted key order)"
        code, itemsize = DTYPE_CODES[self.dtype]
        assert tuple(array.shape) == tuple(self.shapes[key]), (key, array.shape, self.shapes[key])
        assert array.itemsize == itemsize and array.flags.c_contiguous, (key, array.dtype, array.flags.c_contiguous)
        self._pending.append(self._pool.submit(self._write, memoryview(array).cast("B")))
        while len(self._pending) > IN_FLIGHT:
            self._pending.popleft().result()  # re-raises a write error (disk full) in the caller

    def _write(self, data: memoryview | bytes) -> None:
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            chunk = view[start:start + CHUNK]
            self._hash.update(chunk)
            self._file.write(chunk)

    def _close(self, wait: bool) -> None:
        try:
            while wait and self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._file.close()

    def __exit__(self, exc_type, exc, tb) -> None:
        self._close(wait=exc_type is None)
        if exc_type is None:
            assert not self._order, f"safetensors stream: {len(self._order)} tensor(s) never written, e.g. {self._order[0]}"
            size = self.path.stat().st_size
            assert size == len(self._head) + self._data_bytes, (size, len(self._head) + self._data_bytes)
            self.sha256 = self._hash.hexdigest()
