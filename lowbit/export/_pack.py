"""Bit packing of integer weight codes into ONNX tensors (numpy + onnx only, no torch).

Layouts (ONNX IR spec for INT4/INT2, little end first)::

    INT4: two codes per byte, element 2k in bits 0-3 (low nibble), element 2k+1 in bits 4-7.
    INT2: four codes per byte, element 4k+j in bits 2j..2j+1 (first element in the two LSBs).
    Codes are stored in two's complement; an odd tail is padded with zero bits in the
    high positions of the last byte. Elements are taken in C (row-major) order.

    TRITS (lowbit's base-3 form, below 2 bits per weight): five ternary codes t0..t4 in
    {-1, 0, 1} per uint8 byte, byte = sum_j (t_j + 1) * 3**j (t0 least significant, so
    bytes <= 242); an incomplete last group is padded with t = 0. log2(3^5)/5 = 1.585 bits
    per code would be the limit; five per byte gives 1.6.

For example codes [1, -1, 0, 1, -2] pack as INT2 bytes ``[0b01_00_11_01, 0b00_00_00_10]``
= ``[0x4D, 0x02]`` and as INT4 bytes ``[0xF1, 0x10, 0x0E]``.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from .._backend import SIGNED_OFFSET, UNSIGNED_WEIGHTS
from .._intmath import code_range

# storage name -> (bits per code, smallest code, largest code, ONNX element type)
STORAGE = {name: (bits, *code_range(bits, signed=True), dtype) for name, bits, dtype in
           [("int2", 2, TensorProto.INT2), ("int4", 4, TensorProto.INT4),
            ("int8", 8, TensorProto.INT8)]}


def _check_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    codes = np.asarray(codes)
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be integers, got {codes.dtype}")
    lo, hi = code_range(bits, signed=True)
    if codes.size and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"codes outside the {bits}-bit range [{lo}, {hi}]: "
                         f"min {codes.min()}, max {codes.max()}")
    return codes.reshape(-1).astype(np.int64)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 bytes of unsigned ``bits``-bit ``values`` (C order, 8 / ``bits`` per byte), each
    byte filled from its two least significant bits up; a short tail is padded with zero
    bits. The INT2/INT4 layouts below and MatMulNBits' blocks (``_nbits``) share it."""
    per = 8 // bits
    flat = np.asarray(values).reshape(-1).astype(np.int64)
    u = np.concatenate([flat, np.zeros((-flat.size) % per, np.int64)]) & ((1 << bits) - 1)
    u = u.astype(np.uint8).reshape(-1, per)
    out = np.zeros(len(u), np.uint8)
    for j in range(per):
        out |= u[:, j] << np.uint8(bits * j)
    return out


def unpack_bits(raw: np.ndarray, count: int, bits: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` unsigned values, as uint8."""
    per = 8 // bits
    raw = np.asarray(raw, np.uint8).reshape(-1)
    return np.stack([(raw >> np.uint8(bits * j)) & np.uint8((1 << bits) - 1)
                     for j in range(per)], axis=1).reshape(-1)[:count]


def _pack(codes: np.ndarray, bits: int) -> bytes:
    return pack_bits(_check_codes(codes, bits), bits).tobytes()


def _unpack(data: bytes, count: int, bits: int) -> np.ndarray:
    per = 8 // bits
    raw = np.frombuffer(data, np.uint8)
    if len(raw) != -(-count // per):
        raise ValueError(f"{len(raw)} bytes cannot hold exactly {count} {bits}-bit codes")
    u = unpack_bits(raw, count, bits).astype(np.int8)
    return np.where(u >= (1 << (bits - 1)), u - (1 << bits), u).astype(np.int8)


def pack_int2(codes: np.ndarray) -> bytes:
    """Pack codes in [-2, 1] four per byte (layout in the module docstring)."""
    return _pack(codes, 2)


def unpack_int2(data: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`pack_int2`: ``count`` int8 codes."""
    return _unpack(data, count, 2)


def pack_int4(codes: np.ndarray) -> bytes:
    """Pack codes in [-8, 7] two per byte, low nibble first."""
    return _pack(codes, 4)


def unpack_int4(data: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`pack_int4`: ``count`` int8 codes."""
    return _unpack(data, count, 4)


def pack_trits(codes: np.ndarray) -> bytes:
    """Pack ternary codes in {-1, 0, 1} five per byte in base 3, first code least significant."""
    flat = np.asarray(codes).reshape(-1).astype(np.int64)
    if flat.size and (flat.min() < -1 or flat.max() > 1):
        raise ValueError(f"trits must be in {{-1, 0, 1}}, got min {flat.min()}, max {flat.max()}")
    digits = np.concatenate([flat + 1, np.ones((-flat.size) % 5, np.int64)]).reshape(-1, 5)
    return (digits @ (3 ** np.arange(5))).astype(np.uint8).tobytes()


def unpack_trits(data: bytes, count: int) -> np.ndarray:
    """Inverse of :func:`pack_trits`: ``count`` int8 codes in {-1, 0, 1}."""
    raw = np.frombuffer(data, np.uint8).astype(np.int64)
    if len(raw) != -(-count // 5):
        raise ValueError(f"{len(raw)} bytes cannot hold exactly {count} trits")
    digits = (raw[:, None] // (3 ** np.arange(5))) % 3
    return (digits.reshape(-1)[:count] - 1).astype(np.int8)


def trits_table() -> np.ndarray:
    """int8 [243, 5]: row b holds the five codes byte b packs (``pack_trits``); the exported
    graph decodes trits with ``Gather(table, bytes)``."""
    return (np.arange(243)[:, None] // (3 ** np.arange(5)) % 3 - 1).astype(np.int8)


def make_tensor(name: str, codes: np.ndarray, storage: str) -> TensorProto:
    """An ONNX initializer holding integer ``codes`` packed as ``storage``: "int2"|"int4"|"int8"
    (shaped like ``codes``), "uint8" (codes + 128, shaped like ``codes``: read with zero point
    128) or "trits" (UINT8 [ceil(n / 5)], see ``pack_trits``).

    Written as raw bytes; ``helper.make_tensor`` with a list would store INT2/INT4 as varints.
    """
    codes = np.asarray(codes)
    if storage == "trits":
        data = pack_trits(codes)
        return TensorProto(name=name, data_type=TensorProto.UINT8, dims=[len(data)],
                           raw_data=data)
    if storage == UNSIGNED_WEIGHTS:
        flat = _check_codes(codes, 8) + SIGNED_OFFSET
        return TensorProto(name=name, data_type=TensorProto.UINT8, dims=list(codes.shape),
                           raw_data=flat.astype(np.uint8).tobytes())
    bits, _, _, dtype = STORAGE[storage]
    t = TensorProto(name=name, data_type=dtype, dims=list(codes.shape))
    flat = _check_codes(codes, bits)
    t.raw_data = _pack(flat, bits) if bits < 8 else flat.astype(np.int8).tobytes()
    return t


def read_tensor(t: TensorProto) -> np.ndarray:
    """int8 codes of a packed INT2/INT4/INT8 or uint8-stored (codes + 128) initializer
    (inverse of :func:`make_tensor`; trits are read with :func:`unpack_trits`)."""
    count = int(np.prod(t.dims, dtype=np.int64))
    if t.data_type == TensorProto.UINT8 and t.HasField("raw_data"):
        raw = np.frombuffer(t.raw_data, np.uint8)[:count].astype(np.int16) - SIGNED_OFFSET
        return raw.astype(np.int8).reshape(tuple(t.dims))
    by_type = {dtype: (storage, bits) for storage, (bits, _, _, dtype) in STORAGE.items()}
    if t.data_type not in by_type or not t.HasField("raw_data"):
        raise ValueError(f"{t.name}: not a raw INT2/INT4/INT8/UINT8 tensor")
    _, bits = by_type[t.data_type]
    flat = (np.frombuffer(t.raw_data, np.int8)[:count] if bits == 8
            else _unpack(t.raw_data, count, bits))
    return flat.reshape(tuple(t.dims))

