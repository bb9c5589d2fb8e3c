"""Streaming safetensors reading and writing with bf16 support and bounded memory.

The ``safetensors`` package's numpy frontend cannot read bfloat16 and its writers need every
tensor in memory at once, so the format (8-byte little-endian header length, JSON header,
raw little-endian data) is handled here directly: reads are memory-mapped one tensor at a
time, writes stream one tensor at a time after a header computed up front.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Iterable, Iterator

import ml_dtypes
import numpy as np

from mogu_jax.errors import MoguError

ST_TO_NP = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
NP_TO_ST = {v: k for k, v in ST_TO_NP.items()}

_MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One .safetensors file: parsed and validated header, tensors memory-mapped on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        size = os.path.getsize(self.path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise MoguError(f"corrupt safetensors file {self.path}: shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise MoguError(f"corrupt safetensors file {self.path}: header length {n} exceeds the file size")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise MoguError(f"corrupt safetensors file {self.path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise MoguError(f"corrupt safetensors file {self.path}: header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.entries: dict[str, tuple[np.dtype, tuple, int, int]] = {}
        for name, info in header.items():
            try:
                dtype = ST_TO_NP[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise MoguError(f"corrupt safetensors file {self.path}: bad entry for tensor {name!r}") from None
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if not (0 <= begin <= end <= data_len) or end - begin != nbytes:
                raise MoguError(
                    f"corrupt safetensors file {self.path}: tensor {name!r} data offsets [{begin}, {end}) do not fit "
                    f"its shape {list(shape)} / dtype or the file's {data_len} data bytes (truncated file?)"
                )
            self.entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple:
        return self.entries[key][1]

    def dtype(self, key: str) -> np.dtype:
        return self.entries[key][0]

    def get(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[key]
        if end == begin:
            return np.zeros(shape, dtype)
        mm = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self.data_start + begin, shape=(end - begin,))
        # copy: the caller owns the array and the file can be closed / replaced
        return np.array(mm.view(dtype).reshape(shape))


def tensor_nbytes(shape: Iterable[int], dtype) -> int:
    return int(np.prod(tuple(shape), dtype=np.int64)) * np.dtype(dtype).itemsize


def write_safetensors(path: str | os.PathLike, specs: list[tuple[str, tuple, np.dtype]],
                      produce: Callable[[str], np.ndarray], metadata: dict | None = None) -> None:
    """Write tensors ``specs`` = [(name, shape, dtype)] in order, asking ``produce(name)`` for each one
    only when it is written, so memory stays near one tensor. Shapes/dtypes are checked."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, shape, dtype in specs:
        dtype = np.dtype(dtype)
        if dtype not in NP_TO_ST:
            raise MoguError(f"cannot write tensor {name!r} of dtype {dtype} to safetensors")
        nb = tensor_nbytes(shape, dtype)
        header[name] = {"dtype": NP_TO_ST[dtype], "shape": list(shape), "data_offsets": [offset, offset + nb]}
        offset += nb
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((8 - len(blob) % 8) % 8)  # align the data section
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in specs:
            arr = np.asarray(produce(name))
            if tuple(arr.shape) != tuple(shape) or arr.dtype != np.dtype(dtype):
                raise MoguError(f"tensor {name!r}: produced {arr.dtype}{list(arr.shape)}, "
                                f"expected {np.dtype(dtype)}{list(shape)}")
            f.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())


def plan_shards(specs: list[tuple[str, tuple, np.dtype]], max_shard_bytes: int) -> list[list]:
    """Split tensor specs into consecutive shards of at most ``max_shard_bytes`` (a bigger tensor gets its own)."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nb = tensor_nbytes(spec[1], spec[2])
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nb
    return shards


def iter_items(f: SafetensorsFile) -> Iterator[tuple[str, np.ndarray]]:
    for k in f.keys():
        yield k, f.get(k)
