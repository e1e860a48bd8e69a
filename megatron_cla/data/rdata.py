"""Read character vectors from an R lazy-load database (``Rdata.rdb`` / ``Rdata.rdx``), stdlib only.

R packages store their data sets as an index (``.rdx``: a gzip-compressed R serialization of a
list with ``variables`` = name -> (offset, length)) and a blob file (``.rdb``: at each offset a
4-byte big-endian length followed by a zlib-compressed R serialization of the object). This module
implements the subset of R's XDR serialization format those files use (vectors, pairlists,
symbols, references), which is enough to read the janeaustenr package's novels without R.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

__all__ = ["read_lazyload_db"]

_NIL, _REF, _GLOBALENV, _EMPTYENV, _BASEENV, _BASENS, _MISSING, _UNBOUND = (
    254,
    255,
    253,
    242,
    241,
    247,
    251,
    252,
)
_SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC = 1, 2, 9, 10, 13, 14, 16, 19


class _Reader:
    def __init__(self, data: bytes) -> None:
        if data[:2] != b"X\n":
            raise ValueError("only XDR (binary, big-endian) R serialization is supported")
        self.data, self.pos, self.refs = data, 2, []
        version = self.int()
        self.int(), self.int()  # writer and minimal reader R versions
        if version == 3:
            encoding_length = self.int()  # read first: `pos += int()` would use the old pos
            self.pos += encoding_length

    def int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def item(self) -> Any:
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (_NIL, _GLOBALENV, _EMPTYENV, _BASEENV, _BASENS, _MISSING, _UNBOUND):
            return None
        if kind == _REF:
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if kind == _SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _CHAR:
            length = self.int()
            if length == -1:
                return None
            text = self.data[self.pos : self.pos + length].decode("utf-8", errors="replace")
            self.pos += length
            return text
        if kind == _LIST:
            attrs = self.item() if has_attr else None
            tag = self.item() if has_tag else None
            head, tail = self.item(), self.item()
            del attrs
            return [(tag, head)] + (tail or [])
        value = self._vector(kind)
        if has_attr:
            attributes = dict(self.item() or [])
            if isinstance(value, list) and "names" in attributes:
                return dict(zip(attributes["names"], value, strict=True))
        return value

    def _vector(self, kind: int) -> Any:
        length = self.int()
        if kind in (_LGL, _INT):
            values = struct.unpack_from(f">{length}i", self.data, self.pos)
            self.pos += 4 * length
            return list(values)
        if kind == _REAL:
            values = struct.unpack_from(f">{length}d", self.data, self.pos)
            self.pos += 8 * length
            return list(values)
        if kind in (_STR, _VEC):
            return [self.item() for _ in range(length)]
        raise ValueError(f"unsupported R object type {kind}")


def read_lazyload_db(prefix: Path) -> dict[str, Any]:
    """All objects of ``<prefix>.rdb`` by name (``prefix`` has no extension, e.g. ``.../Rdata``)."""
    index = _Reader(gzip.decompress(Path(f"{prefix}.rdx").read_bytes())).item()
    blob = Path(f"{prefix}.rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        compressed = blob[offset + 4 : offset + length]
        objects[name] = _Reader(zlib.decompress(compressed)).item()
    return objects
