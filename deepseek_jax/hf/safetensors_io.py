"""Minimal reader/writer of the safetensors container with ``ml_dtypes`` dtypes.

The ``safetensors`` package's NumPy/Flax front-ends cannot return ``float8_e4m3fn`` or ``bfloat16``
arrays (NumPy lacks those dtypes), which DeepSeek checkpoints are made of. The format is simple and
specified (8-byte little-endian header length, a JSON header of ``{name: {dtype, shape,
data_offsets}}``, then raw little-endian bytes), so tensors are read here one at a time from a
memory map and written with the same layout ``safetensors`` itself produces.
"""

from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

__all__ = ["SafetensorsFile", "write_safetensors", "DTYPES"]

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsFile:
    """Lazy, memory-mapped access to one ``.safetensors`` file: ``names()``, ``shape(n)``, ``dtype(n)``, ``get(n)``."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        self._header = header
        self._start = 8 + n
        self._file = open(self.path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self._file.seek(0, 2) else None

    def names(self) -> list[str]:
        return list(self._header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        code = self._header[name]["dtype"]
        if code not in DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {code}")
        return DTYPES[code]

    def get(self, name: str) -> np.ndarray:
        """A copy of tensor ``name`` (only this tensor's bytes are read)."""
        info = self._header[name]
        a, b = info["data_offsets"]
        dtype = self.dtype(name)
        arr = np.frombuffer(self._map, dtype=dtype, count=(b - a) // dtype.itemsize, offset=self._start + a)
        return arr.reshape(info["shape"]).copy()

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_safetensors(path: str | Path, tensors: Mapping[str, np.ndarray] | Iterator[tuple[str, np.ndarray]],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` (name -> array) to ``path`` in the safetensors layout (8-byte aligned header)."""
    items = list(tensors.items() if isinstance(tensors, Mapping) else tensors)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, arr in items:
        dt = np.dtype(arr.dtype)
        if dt not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {dt} cannot be stored in safetensors")
        header[name] = {"dtype": _NAMES[dt], "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, arr in items:
            f.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
    tmp.replace(path)
