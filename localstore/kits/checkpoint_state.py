"""The layout of a checkpoint's state: numpy arrays as raw bytes, everything else msgpack, compressed.

``encode_state`` and ``decode_state`` are what the telemetry kit stores in
``checkpoint_states.state``. Arrays keep their dtype (byte order included) and
shape exactly, and nothing is pickled. The other values are JSON-like (dict, list,
str, int within 64 bits, float, bool, None; bytes too) and are packed with msgpack,
several times faster than JSON text for a message history. Only that part is
compressed: float arrays barely shrink under zstd, and compressing them would cost
most of the time of a save. States written by earlier versions (JSON plus an
``.npz``) are still read.
"""

from __future__ import annotations

import io
import json
import struct
import threading
from collections.abc import Mapping
from typing import Any

import msgpack
import numpy as np
import zstandard as zstd

import localstore as ls

#: The state layout written by ``encode_state``, and the ``.npz`` one written before it (still read).
_STATE_MAGIC = b"LSC2"
_STATE_MAGIC_NPZ = b"LSCK"
#: Flag: the state's head is a zstd frame.
_STATE_ZSTD = 1
#: Heads shorter than this many bytes are stored as they are.
_STATE_MIN_COMPRESS = 256
#: zstd level for the head of a checkpoint state. Level 1 packs a 25 KB message history to
#: 10.3 KB in ~60% of the time level 3 takes for 9.8 KB (measured with benchmarks/peers.py data).
STATE_ZSTD_LEVEL = 1
_STATE_HEAD = struct.Struct("<4sIB")
_STATE_HEAD_NPZ = struct.Struct("<4sI")
_LOCAL = threading.local()


def encode_state(state: Mapping[str, Any] | None) -> bytes | None:
    """Pack a state dict: numpy arrays as raw bytes (dtype and shape kept, no pickle), the rest with msgpack.

    Layout: ``LSC2``, the head's length and a flag byte, the head (msgpack: the
    non-array values and each array's name, dtype and shape; zstd-compressed when that
    shrinks it), then each array's bytes in C order.
    """
    if state is None:
        return None
    if not isinstance(state, Mapping):
        raise ls.ValidationError(f"checkpoints.state_dict: expected a dict of name -> array or value, got {type(state).__name__}")
    if not all(isinstance(k, str) for k in state):
        raise ls.ValidationError("checkpoints.state_dict: keys must be strings")
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    rest = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    if any(a.dtype.kind in "OV" or a.dtype.fields is not None for a in arrays.values()):
        raise ls.ValidationError("checkpoints.state_dict: arrays must have a plain dtype (not object or structured)")
    specs = [[name, a.dtype.str, list(a.shape)] for name, a in arrays.items()]
    try:
        head = msgpack.packb({"values": rest, "arrays": specs}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ls.ValidationError(
            f"checkpoints.state_dict: a value is neither a numpy array nor a JSON-like value (dict, list, str, "
            f"int within 64 bits, float, bool, None, bytes): {exc}"
        ) from None
    flags = 0
    if len(head) >= _STATE_MIN_COMPRESS:
        packed = _zstd_compressor().compress(head)
        if len(packed) < len(head):
            head, flags = packed, _STATE_ZSTD
    parts = [_STATE_HEAD.pack(_STATE_MAGIC, len(head), flags), head]
    parts += [np.ascontiguousarray(a).tobytes() for a in arrays.values()]
    return b"".join(parts)


def decode_state(blob: Any) -> dict[str, Any] | None:
    """Unpack what ``encode_state`` wrote (also the JSON + ``.npz`` layout of earlier versions)."""
    if blob is None or blob is ls.FORGOTTEN:
        return None
    if bytes(blob[:4]) == _STATE_MAGIC_NPZ:
        return _decode_npz_state(blob)
    try:
        magic, length, flags = _STATE_HEAD.unpack_from(blob)
    except struct.error:
        magic = b""
    if magic != _STATE_MAGIC:
        raise ls.ValidationError("checkpoints.state_dict: not a state written by the telemetry kit")
    start = _STATE_HEAD.size
    head = bytes(blob[start:start + length])
    try:
        if flags & _STATE_ZSTD:
            head = zstd.ZstdDecompressor().decompress(head)
        meta = msgpack.unpackb(head, raw=False, strict_map_key=False)
        out: dict[str, Any] = dict(meta["values"])
        data = bytearray(blob[start + length:])  # one writable buffer that the arrays share
        offset = 0
        for name, dtype_str, shape in meta["arrays"]:
            dtype = np.dtype(dtype_str)
            count = int(np.prod(shape, dtype=np.int64))
            out[name] = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
            offset += count * dtype.itemsize
        if offset != len(data):
            raise ValueError(f"{len(data) - offset} bytes left over after the arrays")
    except (zstd.ZstdError, msgpack.UnpackException, ValueError, TypeError, KeyError) as exc:
        raise ls.CorruptStoreError(f"checkpoints.state_dict: a stored state is damaged ({exc}); restore it from a backup") from None
    return out


def _decode_npz_state(blob: Any) -> dict[str, Any]:
    """Unpack the layout written before ``LSC2``: JSON head, then an ``.npz`` of the arrays."""
    _magic, length = _STATE_HEAD_NPZ.unpack_from(blob)
    start = _STATE_HEAD_NPZ.size
    head = json.loads(blob[start:start + length])
    out: dict[str, Any] = dict(head["json"])
    if head["arrays"]:
        with np.load(io.BytesIO(blob[start + length:]), allow_pickle=False) as npz:
            out.update({name: npz[name] for name in head["arrays"]})
    return out


def _zstd_compressor() -> zstd.ZstdCompressor:
    """One compressor per thread (a ZstdCompressor must not be shared by threads)."""
    compressor: zstd.ZstdCompressor | None = getattr(_LOCAL, "zstd", None)
    if compressor is None:
        compressor = _LOCAL.zstd = zstd.ZstdCompressor(level=STATE_ZSTD_LEVEL)
    return compressor


__all__ = ["STATE_ZSTD_LEVEL", "decode_state", "encode_state"]
