"""Raw safetensors reading and writing, bfloat16 included: the one place that touches the format.

The safetensors package's NumPy API cannot handle bfloat16 (NumPy has no such dtype), so we
parse the format ourselves:
  [8-byte little-endian header length N][N bytes of JSON header][data]
  header = {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}, ...,
            "__metadata__": {str: str}}   (offsets are relative to the start of the data)
bfloat16 is the top half of a float32, so it is read as uint16 bits shifted into a float32
and written with round-to-nearest-even on the float32 bits.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..util.files import (PathError, atomic_file, forget_temporary, input_path, out_path, register_temporary,
                          temp_sibling, write_error)
from .layout import WeightsError


# ----------------------------------------------------------------------------- bfloat16

def f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even; NaN stays a (quiet) NaN."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds half to even; finite values near the
    # top round to inf, as IEEE rounding does. Only NaNs could wrap, and they are replaced.
    r = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    if nan.any():
        r = np.where(nan, (u >> np.uint32(16)) | np.uint32(0x0040), r)
    return r.astype(np.uint16)


def bf16_bits_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32, exact."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_to_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values `a` takes after a round trip through `dtype` (float32/float16/bfloat16)."""
    a = np.asarray(a, dtype=np.float32)
    if dtype == "float32":
        return a
    if dtype == "float16":
        return a.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return bf16_bits_to_f32(f32_to_bf16_bits(a)).reshape(a.shape)
    raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")


# ----------------------------------------------------------------------------- raw safetensors

# safetensors dtype code -> NumPy dtype (little-endian). "BF16" is handled apart.
_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?"}
_FLOAT_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_ST_ITEMSIZE = {**{k: np.dtype(v).itemsize for k, v in _ST_DTYPES.items()}, "BF16": 2}
_MAX_HEADER = 100_000_000   # the safetensors spec's own limit on the JSON header
MAX_NDIM = 64 if int(np.__version__.split(".")[0]) >= 2 else 32   # NumPy's limit on an array's dimensions


def _st_code(dtype: np.dtype) -> str | None:
    """safetensors code of a NumPy dtype (either byte order), None when it has none."""
    dt = np.dtype(dtype)
    if dt.byteorder == ">":
        dt = dt.newbyteorder("<")
    return next((code for code, s in _ST_DTYPES.items() if dt == np.dtype(s)), None)


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict, int]:
    """Parse and validate the header: (tensor entries, metadata, offset of the data in the file).

    Checked against the file's real size before any tensor is read: every byte range lies in
    the file, matches its dtype and shape, and no two ranges overlap (the safetensors library
    rejects overlaps too; two tensors sharing bytes would alias silently)."""
    try:
        path = input_path(path, "a safetensors file")
    except PathError as e:
        raise WeightsError(str(e)) from None
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > min(size - 8, _MAX_HEADER):
                raise WeightsError(f"{path}: truncated or corrupt safetensors file "
                                   f"(header claims {n} bytes, file holds {size})")
            raw = f.read(n)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WeightsError(f"{path}: corrupt safetensors header (not valid JSON: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightsError(f"{path}: corrupt safetensors header (__metadata__ must map strings to strings)")
    data_len = size - 8 - n
    ranges = []
    for name, e in header.items():
        try:
            code, shape, (b, end) = e["dtype"], e["shape"], e["data_offsets"]
            if not isinstance(shape, list) or not all(type(d) is int for d in shape) \
                    or type(b) is not int or type(end) is not int or not isinstance(code, str):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt safetensors header entry for tensor {name} "
                               "(needs dtype, an integer shape list and two integer data_offsets)") from None
        if code not in _ST_ITEMSIZE:
            raise WeightsError(f"{path}: tensor {name} has unsupported dtype {code!r}")
        if any(d < 0 for d in shape) or b < 0 or end < b:
            raise WeightsError(f"{path}: corrupt safetensors header: tensor {name} has a negative "
                               f"size or byte range (shape {shape}, data_offsets [{b}, {end}])")
        nbytes = span = _ST_ITEMSIZE[code]    # Python ints: a lying shape cannot overflow
        for d in shape:
            nbytes *= d
            span *= max(d, 1)                 # NumPy refuses non-zero sides spanning 2**63 bytes, even
        if len(shape) > MAX_NDIM or span >= 1 << 63:                     # beside a zero side
            raise WeightsError(f"{path}: corrupt safetensors header: tensor {name} has an impossible shape "
                               f"{str(shape)[:80]} (at most {MAX_NDIM} dimensions spanning under 2**63 bytes)")
        if end - b != nbytes:
            raise WeightsError(f"{path}: corrupt safetensors header: tensor {name} with shape "
                               f"{shape} {code} does not match its byte range [{b}, {end})")
        if end > data_len:
            raise WeightsError(f"{path}: truncated file: tensor {name} ends at byte {end} "
                               f"of the data, the file holds only {data_len}")
        if nbytes:
            ranges.append((b, end, name))
    ranges.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(ranges, ranges[1:]):
        if b1 < e0:
            raise WeightsError(f"{path}: corrupt safetensors header: tensors {n0} [{b0}, {e0}) and "
                               f"{n1} [{b1}, {e1}) share bytes")
    return header, metadata, 8 + n


def read_safetensors(path: str | os.PathLike, names: Iterable[str] | None = None
                     ) -> tuple[dict[str, np.ndarray], dict]:
    """Read tensors (all, or `names`) and the metadata. Arrays own their memory (the file is
    not kept mapped); BF16 comes back as float32, every other dtype as itself."""
    path = Path(path)
    header, metadata, start = read_safetensors_header(path)
    want = list(header) if names is None else list(names)
    out: dict[str, np.ndarray] = {}
    if not want:
        return out, metadata
    mm = np.memmap(path, dtype=np.uint8, mode="r")
    try:
        for name in want:
            if name not in header:
                raise WeightsError(f"{path}: no tensor {name} in this file")
            out[name] = _tensor_from(mm, start, header[name], path, name)
    finally:
        del mm
    return out, metadata


def _tensor_from(mm: np.ndarray, start: int, e: dict, path, name: str) -> np.ndarray:
    b, end = e["data_offsets"]
    raw = mm[start + b:start + end]                           # (nbytes,) uint8, still mapped
    if raw.shape[0] != end - b:
        raise WeightsError(f"{path}: tensor {name} lies past the end of the file "
                           "(the file changed or was truncated after it was opened)")
    if e["dtype"] == "BF16":
        arr = bf16_bits_to_f32(raw.view("<u2"))                # a fresh float32 array
    else:
        arr = np.array(raw.view(_ST_DTYPES[e["dtype"]]))       # copy out of the mapping
    return arr.reshape(e["shape"])


def read_tensor(path: str | os.PathLike, start: int, entry: dict, name: str = "tensor") -> np.ndarray:
    """One tensor, given its header entry and the data offset from read_safetensors_header.
    The file is mapped only for this read, so a walk over a large checkpoint does not keep
    the pages it has read resident (they would count in this process's RSS)."""
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: cannot read tensor {name}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return _tensor_from(mm, start, entry, path, name)
    finally:
        del mm


def write_safetensors(path: str | os.PathLike, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None, *,
                      float_dtype: str | None = None) -> int:
    """Write a safetensors file atomically; return its size in bytes.

    float_dtype ("float32" | "float16" | "bfloat16") converts every floating tensor on the
    way out (bfloat16 with round-to-nearest-even); None keeps each array's own dtype.
    """
    path = Path(path)
    if float_dtype is not None and float_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"float_dtype must be one of {', '.join(_FLOAT_DTYPES)}, got {float_dtype!r}")
    meta = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("safetensors metadata must map str to str")
    blobs: list[tuple[str, str, tuple[int, ...], np.ndarray]] = []
    for name, a in tensors.items():
        a = np.asarray(a)
        if float_dtype is not None and a.dtype.kind == "f":
            code = _FLOAT_DTYPES[float_dtype]
            data = (f32_to_bf16_bits(a) if code == "BF16"
                    else np.ascontiguousarray(a, dtype=_ST_DTYPES[code]))
        else:
            code = _st_code(a.dtype)
            if code is None:
                raise ValueError(f"tensor {name}: dtype {a.dtype} cannot be stored in safetensors")
            data = np.ascontiguousarray(a, dtype=_ST_DTYPES[code])
        blobs.append((name, code, tuple(a.shape), data))
    # Larger items first keeps every tensor aligned to its item size, as the reference writer does.
    blobs.sort(key=lambda t: -_ST_ITEMSIZE[t[1]])
    header: dict[str, Any] = {"__metadata__": meta} if meta else {}
    offset = 0
    for name, code, shape, data in blobs:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)                      # data starts 8-byte aligned, per the spec
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(hb)))
        f.write(hb)
        for *_, data in blobs:
            f.write(memoryview(data).cast("B"))
    return 8 + len(hb) + offset


class SafetensorsWriter:
    """write_safetensors one tensor at a time, for files larger than memory.

    The header (byte offsets) must precede the data, but a converter knows its last tensors
    and the metadata only at the end. So each tensor goes to a spill file for its item size as
    it comes (larger items first keeps every tensor aligned, as write_safetensors orders them),
    and finish() writes the header and then copies the spill files behind it, in the kernel
    (os.copy_file_range) where it can: memory stays at one tensor, disk at the file plus its
    largest spill. Same tensors in the same order give exactly write_safetensors' bytes. The
    result appears atomically (util/files.atomic_file); abort(), an exception inside `with`,
    or SIGTERM/SIGHUP remove every temporary.

        with SafetensorsWriter(path) as w:
            w.add("a", array); ...
            size = w.finish(metadata)
    """

    def __init__(self, path: str | os.PathLike, flag: str = "output"):
        self.path = out_path(path, flag)
        self.flag = flag
        self._spills: dict[int, tuple[Path, Any]] = {}       # item size -> (temporary, open file)
        self._entries: list[tuple[str, str, tuple[int, ...], int, int]] = []  # name, code, shape, size, bytes
        self._names: set[str] = set()
        self.done = False

    def add(self, name: str, a: np.ndarray, float_dtype: str | None = None) -> None:
        """Append one tensor (converted like write_safetensors' float_dtype)."""
        if self.done:
            raise ValueError(f"{self.path}: the file is already finished")
        if name in self._names:
            raise ValueError(f"tensor {name} added twice")
        a = np.asarray(a)
        if float_dtype is not None and a.dtype.kind == "f":
            if float_dtype not in _FLOAT_DTYPES:
                raise ValueError(f"float_dtype must be one of {', '.join(_FLOAT_DTYPES)}, got {float_dtype!r}")
            code = _FLOAT_DTYPES[float_dtype]
            data = (f32_to_bf16_bits(a) if code == "BF16" else np.ascontiguousarray(a, dtype=_ST_DTYPES[code]))
        else:
            code = _st_code(a.dtype)
            if code is None:
                raise ValueError(f"tensor {name}: dtype {a.dtype} cannot be stored in safetensors")
            data = np.ascontiguousarray(a, dtype=_ST_DTYPES[code])
        size = _ST_ITEMSIZE[code]
        if size not in self._spills:
            tmp = temp_sibling(self.path)
            register_temporary(tmp)
            try:
                self._spills[size] = (tmp, open(tmp, "xb"))
            except OSError as e:
                forget_temporary(tmp)
                raise write_error(self.path, e, self.flag, creating=True) from None
        try:
            self._spills[size][1].write(memoryview(data).cast("B"))
        except OSError as e:
            raise write_error(self.path, e, self.flag) from None
        self._names.add(name)
        self._entries.append((name, code, tuple(a.shape), size, data.nbytes))

    def finish(self, metadata: dict[str, str] | None = None) -> int:
        """Write the file (header, then the spilled data) atomically; return its size in bytes."""
        meta = dict(metadata or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
            raise ValueError("safetensors metadata must map str to str")
        try:
            order = sorted(self._entries, key=lambda t: -t[3])          # stable: as write_safetensors
            header: dict[str, Any] = {"__metadata__": meta} if meta else {}
            offset = 0
            for name, code, shape, _, nbytes in order:
                header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
            hb += b" " * (-len(hb) % 8)
            for _, f in self._spills.values():
                f.close()
            with atomic_file(self.path, flag=self.flag) as out:
                out.write(struct.pack("<Q", len(hb)))
                out.write(hb)
                out.flush()
                for size in sorted(self._spills, reverse=True):
                    tmp, _ = self._spills.pop(size)
                    _append(out, tmp)
                    os.unlink(tmp)
                    forget_temporary(tmp)
            self.done = True
            return 8 + len(hb) + offset
        finally:
            self.abort()

    def abort(self) -> None:
        """Remove every temporary (a no-op after finish)."""
        for tmp, f in self._spills.values():
            f.close()
            try:
                os.unlink(tmp)
            except OSError:
                pass
            forget_temporary(tmp)
        self._spills.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.abort()
        return False


def _append(out, src: Path) -> None:
    """Copy the file `src` to the end of the open file `out` without reading it into memory."""
    n = src.stat().st_size
    with open(src, "rb") as f:
        try:
            while n > 0:
                k = os.copy_file_range(f.fileno(), out.fileno(), min(n, 1 << 30))
                if k == 0:
                    break
                n -= k
            if n == 0:
                out.seek(0, os.SEEK_END)                 # the buffered writer's idea of the position
                return
        except (AttributeError, OSError):
            pass
        f.seek(src.stat().st_size - n)
        out.seek(0, os.SEEK_END)
        shutil.copyfileobj(f, out, 16 << 20)
