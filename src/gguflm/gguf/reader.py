"""Hardened GGUF reader: the trust boundary.

GGUF files come from the internet. Everything read here is checked before it is
used or allocated: magic, version, counts and lengths against the bytes that
remain, nesting depth, value/element types, UTF-8, tensor dims, types, offsets,
alignment, overlap. Every violation raises :class:`gguflm.GGUFError` naming the
field and the value; nothing else escapes, nothing is allocated beyond a small
multiple of the file's size.

File layout (GGUF v2/v3, little-endian)::

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv      x  (string key, u32 value_type, value)
    n_tensors x  (string name, u32 n_dims, u64 ne[n_dims], u32 ggml_type, u64 offset)
    padding to general.alignment (default 32)
    data section: tensor bytes at their offsets (each a multiple of the alignment)

A string is a u64 byte length followed by UTF-8 bytes; an array is a u32 element
type, a u64 count and the elements.
"""

from __future__ import annotations

import enum
import mmap
import os
import stat
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gguflm.errors import GGUFError
from gguflm.gguf.types import GGMLType, layout

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_ALIGNMENT = 1 << 20
MAX_DIMS = 4
MAX_NESTING = 4
MAX_KEY_BYTES = 1 << 16
INT64_MAX = (1 << 63) - 1


class ValueType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Scalar value types: (struct format, numpy dtype). STRING and ARRAY are handled apart.
_SCALARS: dict[ValueType, tuple[str, str]] = {
    ValueType.UINT8: ("<B", "u1"),
    ValueType.INT8: ("<b", "i1"),
    ValueType.UINT16: ("<H", "<u2"),
    ValueType.INT16: ("<h", "<i2"),
    ValueType.UINT32: ("<I", "<u4"),
    ValueType.INT32: ("<i", "<i4"),
    ValueType.FLOAT32: ("<f", "<f4"),
    ValueType.BOOL: ("<B", "u1"),
    ValueType.UINT64: ("<Q", "<u8"),
    ValueType.INT64: ("<q", "<i8"),
    ValueType.FLOAT64: ("<d", "<f8"),
}
_MIN_VALUE_BYTES = {**{t: struct.calcsize(f) for t, (f, _) in _SCALARS.items()},
                    ValueType.STRING: 8, ValueType.ARRAY: 12}


class MetadataArray(Sequence):
    """A numeric metadata array: a read-only numpy view over the file's mapping, so that
    parsing a large array costs no memory. It behaves as a sequence of Python numbers
    (indexing gives ``int``/``float``/``bool``, slicing and :meth:`tolist` give lists, it
    compares equal to a list with the same items); ``np.asarray(a)`` or :attr:`array` is
    the zero-copy view (uint8 for BOOL arrays, whose items are checked to be 0 or 1)."""

    __slots__ = ("array", "_bool")

    def __init__(self, array: np.ndarray, is_bool: bool = False):
        self.array, self._bool = array, is_bool

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return self._py(self.array[i])
        v = self.array[i].item()
        return bool(v) if self._bool else v

    def __iter__(self) -> Iterator:
        return iter(self.tolist())

    def tolist(self) -> list:
        """The items as a list of Python numbers (allocates: the whole array)."""
        return self._py(self.array)

    def _py(self, a: np.ndarray) -> list:
        return a.astype(bool).tolist() if self._bool else a.tolist()

    def __array__(self, dtype=None, copy=None):
        a = self.array.astype(bool) if self._bool else self.array
        return a if dtype is None else a.astype(dtype)

    def __eq__(self, other) -> bool:
        if isinstance(other, MetadataArray):
            return self._bool == other._bool and np.array_equal(self.array, other.array)
        if isinstance(other, (list, tuple)):
            return len(other) == len(self) and self.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        kind = "BOOL" if self._bool else self.array.dtype.name
        head = self._py(self.array[:8])
        more = ", ..." if len(self) > 8 else ""
        return f"MetadataArray({kind} x {len(self)}: {str(head)[1:-1]}{more})"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's header. ``shape`` is in ggml order (ne0 first, ne0 contiguous);
    ``offset`` is relative to the data section, ``file_offset`` absolute."""

    name: str
    ggml_type: GGMLType
    shape: tuple[int, ...]
    offset: int
    file_offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class _Cursor:
    """Bounds-checked little-endian reads over a buffer."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: memoryview, pos: int = 0):
        self.buf, self.pos, self.end = buf, pos, len(buf)

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def need(self, n: int, what: str) -> None:
        if n < 0 or n > self.end - self.pos:
            raise GGUFError(f"truncated file: {what} needs {n} bytes at offset {self.pos}, "
                            f"{self.end - self.pos} remain")

    def unpack(self, fmt: str, size: int, what: str):
        self.need(size, what)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def u32(self, what: str) -> int:
        return self.unpack("<I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", 8, what)

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.u64(f"length of {what}")
        if limit is not None and n > limit:
            raise GGUFError(f"{what} is {n} bytes long, more than the limit of {limit}")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{what} at offset {self.pos - n} is not valid UTF-8 ({e.reason})") from None


def _map_regular_file(path: Path) -> tuple[mmap.mmap, int]:
    """A read-only mapping of ``path`` and its size. Only regular files are opened for good:
    the file is opened non-blocking (a named pipe must not wait for a writer) and checked
    with fstat before it is mapped. A missing or unreadable file raises FileNotFoundError /
    PermissionError; any other failure (a directory, a pipe or device, a symlink loop, a
    file that cannot be mapped such as a sysfs attribute) a GGUFError naming the file."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except (FileNotFoundError, PermissionError):
        raise
    except IsADirectoryError:
        raise GGUFError(f"{path}: is a directory, not a GGUF file") from None
    except OSError as e:
        raise GGUFError(f"{path}: cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise GGUFError(f"{path}: is a directory, not a GGUF file")
        if not stat.S_ISREG(st.st_mode):
            raise GGUFError(f"{path}: not a regular file (a pipe, socket or device), not a GGUF file")
        if st.st_size == 0:
            raise GGUFError(f"{path}: empty file, not a GGUF file")
        try:
            return mmap.mmap(fd, 0, access=mmap.ACCESS_READ), st.st_size
        except (OSError, ValueError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise GGUFError(f"{path}: cannot be memory-mapped ({why}), not a GGUF file") from None
    finally:
        os.close(fd)


class GGUFFile:
    """A memory-mapped GGUF file.

    ``metadata`` maps keys to plain Python values; arrays of strings or arrays are lists,
    numeric arrays :class:`MetadataArray` (a lazy sequence over the mapping: parsing
    memory is a small constant plus the tensor table, whatever the arrays' sizes);
    ``metadata_types`` maps keys to their value type (and element type for arrays);
    ``tensors`` is an ordered mapping name -> :class:`TensorInfo`;
    :meth:`tensor_data` returns a tensor's bytes as a zero-copy numpy uint8 view.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._mmap, self.file_size = _map_regular_file(self.path)
        self.metadata: dict[str, Any] = {}
        self.metadata_types: dict[str, tuple[ValueType, ...]] = {}
        self.tensors: dict[str, TensorInfo] = {}
        try:
            self._parse(memoryview(self._mmap))
        except GGUFError as e:
            self.close()
            raise GGUFError(f"{self.path}: {e}") from None
        except (struct.error, ValueError, OverflowError, MemoryError) as e:  # defensive: never leak
            self.close()
            raise GGUFError(f"{self.path}: malformed GGUF ({type(e).__name__}: {e})") from None

    # -- parsing ---------------------------------------------------------------------------
    def _parse(self, buf: memoryview) -> None:
        cur = _Cursor(buf)
        magic = bytes(buf[0:4])
        if magic != GGUF_MAGIC:
            raise GGUFError(f"bad magic {magic!r}: not a GGUF file (expected {GGUF_MAGIC!r})")
        cur.pos = 4
        version = cur.u32("version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            hint = " (a big-endian GGUF file, not supported)" if swapped in SUPPORTED_VERSIONS else ""
            raise GGUFError(f"unsupported GGUF version {version}{hint}; supported: 2, 3")
        self.version = version
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # Each kv needs at least key length (8) + 1 key byte + type (4) + 1 value byte; each
        # tensor info at least name length (8) + n_dims (4) + type (4) + offset (8).
        if n_kv * 14 > cur.remaining:
            raise GGUFError(f"metadata count {n_kv} cannot fit in the {cur.remaining} bytes that remain")
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}", MAX_KEY_BYTES)
            if not key:
                raise GGUFError(f"metadata key #{i} is empty")
            if key in self.metadata:
                raise GGUFError(f"duplicate metadata key {key!r}")
            vtype = self._value_type(cur.u32(f"type of {key!r}"), key)
            value, types = self._read_value(cur, vtype, key, depth=0)
            self.metadata[key] = value
            self.metadata_types[key] = types

        if n_tensors * 24 > cur.remaining:
            raise GGUFError(f"tensor count {n_tensors} cannot fit in the {cur.remaining} bytes that remain")
        self.alignment = self._alignment()
        raw_infos = []
        for i in range(n_tensors):
            raw_infos.append(self._read_tensor_info(cur, i))
        data_start = -(-cur.pos // self.alignment) * self.alignment
        if n_tensors and data_start > self.file_size:
            raise GGUFError(f"data section would start at {data_start}, past the end of the file "
                            f"({self.file_size} bytes)")
        self.data_offset = data_start
        self._place_tensors(raw_infos, data_start)

    @staticmethod
    def _value_type(raw: int, where: str) -> ValueType:
        try:
            return ValueType(raw)
        except ValueError:
            raise GGUFError(f"unknown value type {raw} for {where!r}") from None

    def _read_value(self, cur: _Cursor, vtype: ValueType, key: str, depth: int):
        if vtype in _SCALARS:
            fmt, _ = _SCALARS[vtype]
            v = cur.unpack(fmt, struct.calcsize(fmt), f"value of {key!r}")
            if vtype == ValueType.BOOL:
                if v > 1:
                    raise GGUFError(f"bool value of {key!r} is {v}, not 0 or 1")
                v = bool(v)
            return v, (vtype,)
        if vtype == ValueType.STRING:
            return cur.string(f"string value of {key!r}"), (vtype,)
        # ARRAY
        if depth >= MAX_NESTING:
            raise GGUFError(f"array nesting of {key!r} deeper than {MAX_NESTING}")
        etype = self._value_type(cur.u32(f"element type of {key!r}"), key)
        count = cur.u64(f"array length of {key!r}")
        if count * _MIN_VALUE_BYTES[etype] > cur.remaining:
            raise GGUFError(f"array length {count} of {key!r} ({etype.name}) exceeds the "
                            f"{cur.remaining} bytes that remain")
        if etype in _SCALARS:
            fmt, dtype = _SCALARS[etype]
            n = count * np.dtype(dtype).itemsize
            arr = np.frombuffer(cur.buf, dtype=dtype, count=count, offset=cur.pos)
            cur.pos += n
            if etype == ValueType.BOOL and count and int(arr.max()) > 1:
                raise GGUFError(f"bool array {key!r} holds a value other than 0 or 1")
            return MetadataArray(arr, etype == ValueType.BOOL), (vtype, etype)
        if etype == ValueType.STRING:
            out = [cur.string(f"element {j} of {key!r}") for j in range(count)]
            return out, (vtype, etype)
        items, sub = [], (etype,)
        for j in range(count):
            v, sub = self._read_value(cur, etype, f"{key}[{j}]", depth + 1)
            items.append(v)
        return items, (vtype, *sub)

    def _alignment(self) -> int:
        if "general.alignment" not in self.metadata:
            return DEFAULT_ALIGNMENT
        a, t = self.metadata["general.alignment"], self.metadata_types["general.alignment"]
        if t != (ValueType.UINT32,):
            raise GGUFError(f"general.alignment must be a UINT32, got {t[0].name}")
        if a <= 0 or a & (a - 1) or a > MAX_ALIGNMENT:
            raise GGUFError(f"general.alignment {a} is not a power of two in 1..{MAX_ALIGNMENT}")
        return a

    def _read_tensor_info(self, cur: _Cursor, i: int):
        name = cur.string(f"name of tensor #{i}", MAX_KEY_BYTES)
        if not name:
            raise GGUFError(f"tensor #{i} has an empty name")
        if name in self.tensors:
            raise GGUFError(f"duplicate tensor name {name!r}")
        n_dims = cur.u32(f"n_dims of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"tensor {name!r} has n_dims {n_dims}, must be 1..{MAX_DIMS}")
        shape = tuple(cur.u64(f"dim {d} of {name!r}") for d in range(n_dims))
        n = 1
        for d in shape:
            if d == 0 or d > INT64_MAX:
                raise GGUFError(f"tensor {name!r} has invalid dimension {d} in shape {list(shape)}")
            n *= d
            if n > INT64_MAX:
                raise GGUFError(f"tensor {name!r} element count overflows int64 (shape {list(shape)})")
        raw_type = cur.u32(f"type of {name!r}")
        try:
            gtype = GGMLType(raw_type)
        except ValueError:
            raise GGUFError(f"tensor {name!r} has unknown ggml type id {raw_type}") from None
        lay = layout(gtype)
        if shape[0] % lay.block_size:
            raise GGUFError(f"tensor {name!r}: ne0 = {shape[0]} is not a multiple of {gtype.name}'s "
                            f"block size {lay.block_size}")
        nbytes = n // lay.block_size * lay.type_size
        offset = cur.u64(f"offset of {name!r}")
        if offset % self.alignment:
            raise GGUFError(f"tensor {name!r} offset {offset} is not a multiple of the alignment "
                            f"{self.alignment}")
        # placeholder entry keeps duplicate detection in one dict; replaced in _place_tensors
        self.tensors[name] = None  # type: ignore[assignment]
        return name, gtype, shape, offset, nbytes

    def _place_tensors(self, infos, data_start: int) -> None:
        data_size = self.file_size - data_start
        for name, gtype, shape, offset, nbytes in infos:
            if offset + nbytes > data_size:
                raise GGUFError(f"tensor {name!r} ({nbytes} bytes at data offset {offset}) extends past "
                                f"the end of the file (data section is {data_size} bytes)")
            self.tensors[name] = TensorInfo(name, gtype, shape, offset, data_start + offset, nbytes)
        spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in self.tensors.values())
        for (s0, e0, n0), (s1, _, n1) in zip(spans, spans[1:]):
            if s1 < e0:
                raise GGUFError(f"tensors {n0!r} and {n1!r} overlap in the data section")

    # -- access ----------------------------------------------------------------------------
    def tensor_data(self, name: str) -> np.ndarray:
        """The tensor's raw bytes: a read-only, zero-copy numpy uint8 view of the mapping."""
        try:
            t = self.tensors[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in {self.path}") from None
        return np.frombuffer(self._mmap, dtype=np.uint8, count=t.nbytes, offset=t.file_offset)

    def release(self, name: str) -> None:
        """Unmap this process's resident pages of tensor ``name`` (the pages it shares
        with neighbours included): a later read maps them again from the page cache. For a
        process that copied what it needs of a tensor and should not keep the rest."""
        t = self.tensors[name]
        page = mmap.PAGESIZE
        start = t.file_offset // page * page
        self._mmap.madvise(mmap.MADV_DONTNEED, start, t.file_offset + t.nbytes - start)

    def release_header(self) -> None:
        """Unmap this process's resident pages of the header (metadata and tensor infos,
        parsed into Python objects at open), up to the page where tensor data begins: a later
        read maps them again from the page cache."""
        end = min(self.data_offset, self.file_size) // mmap.PAGESIZE * mmap.PAGESIZE
        if end:
            self._mmap.madvise(mmap.MADV_DONTNEED, 0, end)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def architecture(self) -> str | None:
        a = self.metadata.get("general.architecture")
        return a if isinstance(a, str) else None

    def close(self) -> None:
        mm = getattr(self, "_mmap", None)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # zero-copy views still alive; the mapping goes with them
                pass

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, v{self.version}, {len(self.metadata)} keys, "
                f"{len(self.tensors)} tensors)")
