"""Sharded safetensors files written one tensor at a time.

The layout (which tensor goes to which file, at which byte offset) is planned from names,
shapes and dtypes before any data exists, so each file's header is written first and every
tensor then streams straight to disk: host memory holds one tensor, never a whole shard.
The files are the ones `transformers` writes: `model.safetensors`, or
`model-0000k-of-0000n.safetensors` plus `model.safetensors.index.json`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import struct
from collections.abc import Sequence

import numpy as np

INDEX_FILE = "model.safetensors.index.json"
# safetensors dtype codes; bfloat16 arrays are ml_dtypes.bfloat16 in numpy.
_CODES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64",
          "int32": "I32", "int64": "I64"}


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(text: str | int) -> int:
    """"5GB", "500MB", "100KB" (powers of 1000, as transformers reads them) or bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", text.upper())
    if not match:
        raise ValueError(f"max_shard_size {text!r} is not a size like '5GB', '500MB' or bytes")
    number, unit = float(match[1]), match[2].rstrip("B")
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}[unit]
    return int(number * scale)


def plan_shards(infos: Sequence[TensorInfo], max_shard_bytes: int) -> list[list[TensorInfo]]:
    """Greedy, in order: a file closes when the next tensor would take it past the limit
    (a tensor bigger than the limit gets a file of its own, as transformers does)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in infos:
        if shards[-1] and size + info.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def remove_stale_weights(out_dir: str) -> None:
    """A single file or shard set from an earlier export would shadow or mix with a new one."""
    for file in os.listdir(out_dir):
        if file == INDEX_FILE or re.fullmatch(r"model(-\d+-of-\d+)?\.safetensors", file):
            os.remove(os.path.join(out_dir, file))


def _header(shard: Sequence[TensorInfo], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for info in shard:
        if info.dtype.name not in _CODES:
            raise ValueError(f"tensor {info.name!r}: dtype {info.dtype.name} has no safetensors "
                             f"code; use one of {', '.join(_CODES)}")
        header[info.name] = {"dtype": _CODES[info.dtype.name], "shape": list(info.shape),
                             "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    data = json.dumps(header, separators=(",", ":")).encode()
    data += b" " * (-len(data) % 8)  # the format pads the header to 8 bytes with spaces
    return struct.pack("<Q", len(data)) + data


class ShardedWriter:
    """Writes the planned tensors, in plan order, one `write` call each.

    Use as a context manager: leaving it without an error checks every planned tensor was
    written and writes the index (when there is more than one file).
    """

    def __init__(self, out_dir: str, infos: Sequence[TensorInfo], max_shard_bytes: int,
                 metadata: dict[str, str] | None = None):
        names = [info.name for info in infos]
        if len(set(names)) != len(names):
            raise ValueError("tensor names repeat in the export plan")
        self.out_dir = out_dir
        self.shards = plan_shards(infos, max_shard_bytes)
        n = len(self.shards)
        self.files = (["model.safetensors"] if n == 1 else
                      [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
        # transformers refuses safetensors files whose metadata lacks format "pt".
        self.metadata = metadata or {"format": "pt"}
        self._order = [(k, info) for k, shard in enumerate(self.shards) for info in shard]
        self._next = 0
        self._file = None
        self._open_shard = -1
        os.makedirs(out_dir, exist_ok=True)
        remove_stale_weights(out_dir)

    def write(self, name: str, array: np.ndarray) -> None:
        if self._next >= len(self._order):
            raise ValueError(f"tensor {name!r} is not in the export plan (all tensors written)")
        k, info = self._order[self._next]
        if name != info.name or tuple(array.shape) != info.shape or array.dtype != info.dtype:
            raise ValueError(f"export wrote {name!r} {tuple(array.shape)} {array.dtype}; the "
                             f"plan expects {info.name!r} {info.shape} {info.dtype}")
        if k != self._open_shard:
            self._close_file()
            self._file = open(os.path.join(self.out_dir, self.files[k]), "wb")  # noqa: SIM115
            self._file.write(_header(self.shards[k], self.metadata))
            self._open_shard = k
        # A byte view, not tobytes(): no second copy of the tensor.
        self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._next += 1

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        self._close_file()
        if self._next != len(self._order):
            missing = [info.name for _, info in self._order[self._next:]]
            raise ValueError(f"export stopped before writing {missing[:3]} "
                             f"({len(missing)} tensors missing)")
        if len(self.files) > 1:
            weight_map = {info.name: self.files[k] for k, info in self._order}
            total = sum(info.nbytes for _, info in self._order)
            with open(os.path.join(self.out_dir, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                          indent=2)

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._close_file()


def tensor_files(hf_dir: str) -> dict[str, str]:
    """HF tensor name -> path of the safetensors file holding it."""
    from safetensors import safe_open

    index = os.path.join(hf_dir, INDEX_FILE)
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
    single = os.path.join(hf_dir, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{hf_dir} has neither model.safetensors nor {INDEX_FILE} "
                                "(only safetensors weights are read)")
    with safe_open(single, framework="np") as f:
        return dict.fromkeys(f.keys(), single)
