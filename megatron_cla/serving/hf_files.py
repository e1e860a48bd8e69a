"""Hugging Face weight files, one tensor at a time: a lazy reader and a sharded streaming writer.

A 70B model is 140 GB in bf16; neither side ever holds more than the tensors it is working on:

* :class:`HFTensors` maps names to ``model.safetensors`` or the shards its index lists (from each
  file's safetensors header) and reads a tensor, in its stored dtype, only when asked: a rank that
  needs 1/N of the model reads 1/N of the bytes, and nothing stays mapped.
* :class:`ShardWriter` takes tensors in order and writes them into files of at most
  ``max_shard_bytes`` (Hugging Face's 5 GB by default) as they fill, then the index
  (``model.safetensors.index.json``); a model that fits one shard is ``model.safetensors``.
  Several ranks write their own shards; :func:`finish_shards` numbers them across ranks.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any, Iterable, Optional

import torch

__all__ = ["HFTensors", "ShardWriter", "MAX_SHARD_BYTES", "finish_shards"]

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
"""safetensors dtype names (its format specification) -> torch."""
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
MAX_SHARD_BYTES = 5 * 10**9
"""Hugging Face's default shard size (``max_shard_size="5GB"``)."""
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class HFTensors:
    """The tensors of a Hugging Face model directory, read lazily by name."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self._files = self._weight_map()
        self._headers: dict[str, tuple[Path, int, dict[str, Any]]] = {}

    def _weight_map(self) -> dict[str, str]:
        if (self.model_dir / SINGLE).is_file():
            with open(self.model_dir / SINGLE, "rb") as handle:
                size = struct.unpack("<Q", handle.read(8))[0]
                names = json.loads(handle.read(size))
            return {name: SINGLE for name in names if name != "__metadata__"}
        index = self.model_dir / INDEX
        if not index.is_file():
            raise FileNotFoundError(
                f"{self.model_dir} has no {SINGLE} (nor a sharded index {INDEX})"
            )
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index} is not a safetensors index: {err}") from err
        missing = sorted({f for f in weight_map.values() if not (self.model_dir / f).is_file()})
        if missing:
            raise FileNotFoundError(
                f"{self.model_dir} lacks the shard {missing[0]} its index lists"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        return dict(weight_map)

    def names(self) -> set[str]:
        return set(self._files)

    def __contains__(self, name: object) -> bool:
        return name in self._files

    def _header(self, name: str) -> tuple[Path, int, dict[str, Any]]:
        """(file, where its data starts, the file's header) of tensor ``name``."""
        file = self._files[name]
        if file not in self._headers:
            path = self.model_dir / file
            with open(path, "rb") as handle:
                size = struct.unpack("<Q", handle.read(8))[0]
                header = json.loads(handle.read(size))
            self._headers[file] = (path, 8 + size, header)
        return self._headers[file]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._header(name)[2][name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored (``KeyError`` if the model has none), read with plain
        file I/O: safetensors' own reader maps the file, and every page it touches stays in
        the process's resident memory on top of the tensor."""
        if name not in self._files:
            raise KeyError(name)
        path, start, header = self._header(name)
        entry = header[name]
        begin, end = entry["data_offsets"]
        data = bytearray(end - begin)
        with open(path, "rb") as handle:
            handle.seek(start + begin)
            if handle.readinto(data) != len(data):
                raise ValueError(f"{path} ends inside tensor {name}: the file is truncated")
        if not data:
            return torch.empty(entry["shape"], dtype=_DTYPES[entry["dtype"]])
        return torch.frombuffer(data, dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"])


class ShardWriter:
    """Streams tensors into safetensors files of at most ``max_shard_bytes`` each.

    The files are planned from the tensors' names, dtypes and shapes (``entries``, in the order
    they will be written): each file's header is written when its first tensor arrives and every
    tensor's bytes go straight to the file, so the writer holds one tensor at a time."""

    def __init__(
        self,
        out: Path,
        prefix: str,
        entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
        max_shard_bytes: int = MAX_SHARD_BYTES,
    ) -> None:
        self.out, self.prefix = Path(out), prefix
        self._shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = []
        size = 0
        for entry in entries:
            nbytes = _nbytes(entry)
            if not self._shards or (size and size + nbytes > max_shard_bytes):
                self._shards.append([])
                size = 0
            self._shards[-1].append(entry)
            size += nbytes
        self._order = [e[0] for shard in self._shards for e in shard]
        self._written = 0
        self._handle: Any = None
        self.files = [f"{prefix}-{i:05d}.safetensors" for i in range(len(self._shards))]
        self.weight_map = {
            e[0]: f for f, shard in zip(self.files, self._shards, strict=True) for e in shard
        }
        self.total_bytes = sum(_nbytes(e) for e in entries)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append tensor ``name`` (the next one planned, with its planned dtype and shape)."""
        if self._written >= len(self._order) or name != self._order[self._written]:
            raise RuntimeError(f"tensor {name} written out of the planned order")
        file = self.weight_map[name]
        if self._handle is None or self._handle.name != str(self.out / file):
            self._open(self.files.index(file))
        self._handle.write(tensor.contiguous().view(torch.uint8).reshape(-1).numpy().data)
        self._written += 1
        if self._written == len(self._order) or self.weight_map[self._order[self._written]] != file:
            self._handle.close()

    def _open(self, index: int) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in self._shards[index]:
            end = offset + _nbytes((name, dtype, shape))
            header[name] = {
                "dtype": _NAMES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, end],
            }
            offset = end
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        self._handle = open(self.out / self.files[index], "wb")  # noqa: SIM115 (closed in write)
        self._handle.write(struct.pack("<Q", len(text)) + text)

    def close(self) -> None:
        """Check that every planned tensor was written."""
        if self._written != len(self._order):
            raise RuntimeError(f"{len(self._order) - self._written} planned tensors not written")


def _nbytes(entry: tuple[str, torch.dtype, tuple[int, ...]]) -> int:
    _, dtype, shape = entry
    count = 1
    for dim in shape:
        count *= dim
    return count * torch.empty((), dtype=dtype).element_size()


def finish_shards(out: Path, writers: Iterable[dict[str, Any]], mode: int) -> list[str]:
    """Rename every rank's shards (``writers``: each rank's ``files``, ``weight_map`` and
    ``total_bytes``, in rank order) to ``model-0000i-of-0000n.safetensors`` with the index, or
    to ``model.safetensors`` when there is one; files get ``mode``. Returns the file names."""
    writers = list(writers)
    files = [f for w in writers for f in w["files"]]
    final = (
        {files[0]: SINGLE}
        if len(files) == 1
        else {f: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, f in enumerate(files)}
    )
    for old, new in final.items():
        os.replace(out / old, out / new)
        (out / new).chmod(mode)
    if len(files) > 1:
        weight_map = {t: final[f] for w in writers for t, f in w["weight_map"].items()}
        total = sum(w["total_bytes"] for w in writers)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        (out / INDEX).chmod(mode)
    return list(final.values())


def read_all(model_dir: Path, names: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
    """Every tensor (or those ``names``) of a model directory, read at once (small models)."""
    reader = HFTensors(model_dir)
    return {name: reader.get(name) for name in (reader.names() if names is None else names)}
