"""ggml's quantized blocks on MLX: affine prepared forms for ``mx.quantized_matmul``, and lazy
dequantizers.

Affine forms
------------
MLX's affine quantization stores ``w = scale * q + bias`` per group of ``group_size``
consecutive elements of a row, ``q`` an unsigned ``bits``-bit integer packed into ``uint32``
words as a little-endian bit stream (element ``i`` of a row at bits ``[bits*i, bits*(i+1))``;
checked against ``mx.dequantize``, see tests/test_metal_quantized.py). Several ggml types are
exactly that with groups of 32 (ggml's ``d`` and ``m`` are halves; every product below is exact
in float32):

=======  ====  ================  ==================  ========================================
type     bits  q                 scale               bias
=======  ====  ================  ==================  ========================================
Q4_0     4     the nibble        d                   -8 d
Q4_1     4     the nibble        d                   m
Q5_0     5     nibble | hbit<<4  d                   -16 d
Q5_1     5     nibble | hbit<<4  d                   m
Q8_0     8     int8 q + 128      d                   -128 d
Q4_K     4     the nibble        d * sc (6-bit)      -(dmin * m (6-bit))
Q5_K     5     nibble | hbit<<4  d * sc              -(dmin * m)
=======  ====  ================  ==================  ========================================

Scales and biases are kept as float32: exact for every block (``-8 d`` or ``-128 d`` in
float16 overflows for large ``d``; ``d * sc`` needs 17 bits of mantissa), and of the
activations' dtype, so ``quantized_matmul`` runs on them as they are (with float16 ones MLX
converts them to float32 on every product). :func:`affine_form` builds the form with NumPy
from a weight's bytes, a bounded number of rows at a time.

Types whose groups are 16 elements (Q2_K, Q3_K, Q6_K) or whose values are a lookup table
(IQ4_NL, IQ4_XS, MXFP4, the grid codes) have no affine form.

Dequantizers
------------
:func:`dequantize` widens blocks to float32 with MLX operations, lazily (nothing is computed
until the graph is evaluated, on the device the graph runs on), bit for bit as gguf's NumPy
dequantizers (and ggml's ``to_float``) do. Types it does not cover return None (the caller
then uses gguf's).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from rpcserver.api import GGMLType

GROUP = 32


def _supported_bits() -> frozenset:
    """The widths this MLX build quantizes with groups of 32 (5-bit came after 4- and 8-bit)."""
    ok = set()
    probe = mx.zeros((1, 64), dtype=mx.float32)
    for bits in (4, 5, 8):
        try:
            mx.eval(mx.quantize(probe, group_size=GROUP, bits=bits))
            ok.add(bits)
        except Exception:  # an older MLX: that width is not offered
            pass
    return frozenset(ok)


_BITS = {
    GGMLType.Q4_0: 4, GGMLType.Q4_1: 4, GGMLType.Q8_0: 8, GGMLType.Q4_K: 4,
    GGMLType.Q5_0: 5, GGMLType.Q5_1: 5, GGMLType.Q5_K: 5,
}
_SUPPORTED = _supported_bits()
#: ggml type -> the bits of its affine form on this MLX build
AFFINE_BITS = {int(t): b for t, b in _BITS.items() if b in _SUPPORTED}

#: elements unpacked at once while a form is built (bounds the NumPy temporaries)
_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------- NumPy side

def _f16(lo_hi: np.ndarray) -> np.ndarray:
    """Two bytes per entry (last axis) as float16, widened to float32."""
    return np.ascontiguousarray(lo_hi).view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's split nibbles: byte j holds element j (low) and element j + len (high)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _k_scale_min(sc12: np.ndarray):
    """The eight 6-bit scales and mins of a Q4_K / Q5_K super-block (12 packed bytes)."""
    d, m, m_d = sc12[..., 0:4], sc12[..., 4:8], sc12[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _high_bits32(qh4: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: bit j of the little-endian uint32 ``qh`` is bit 4 of element j."""
    bits = np.unpackbits(qh4, axis=-1, bitorder="little")  # (..., 32), element order
    return bits << 4


def _split_nibbles_packed(qs: np.ndarray) -> np.ndarray:
    """ggml's split nibbles (byte j of ``qs``: element j low, element j + len high) straight
    into MLX's 4-bit packing (byte i: element 2i low, element 2i + 1 high), byte-wise."""
    even, odd = qs[..., 0::2], qs[..., 1::2]
    return np.concatenate([(even & 0x0F) | (odd << 4), (even >> 4) | (odd & 0xF0)], axis=-1)


def affine_parts(blocks: np.ndarray, type_value: int):
    """Blocks of one type, shape (rows, n_blocks, type_size) uint8 -> ``(packed, scale, bias)``:
    ``packed`` the values in MLX's packing, uint8 (rows, n_groups, 4 * bits), ``scale`` and
    ``bias`` float32 (rows, n_groups)."""
    t = type_value
    rows, nb = blocks.shape[:2]
    with np.errstate(all="ignore"):  # NaN or infinite halves stay what they are
        if t == GGMLType.Q4_0:
            d = _f16(blocks[..., 0:2])
            return _split_nibbles_packed(blocks[..., 2:18]), d, -8.0 * d
        if t == GGMLType.Q4_1:
            return (_split_nibbles_packed(blocks[..., 4:20]), _f16(blocks[..., 0:2]),
                    _f16(blocks[..., 2:4]))
        if t == GGMLType.Q8_0:
            d = _f16(blocks[..., 0:2])
            return blocks[..., 2:34] ^ np.uint8(0x80), d, -128.0 * d
        if t == GGMLType.Q5_0:
            d = _f16(blocks[..., 0:2])
            q = _nibbles(blocks[..., 6:22]) | _high_bits32(blocks[..., 2:6])
            return pack(q, 5).view(np.uint8), d, -16.0 * d
        if t == GGMLType.Q5_1:
            q = _nibbles(blocks[..., 8:24]) | _high_bits32(blocks[..., 4:8])
            return pack(q, 5).view(np.uint8), _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
        if t in (GGMLType.Q4_K, GGMLType.Q5_K):
            d = _f16(blocks[..., 0:2])[..., None]
            dmin = _f16(blocks[..., 2:4])[..., None]
            sc, mn = _k_scale_min(blocks[..., 4:16])
            scale, bias = (d * sc).reshape(rows, -1), -(dmin * mn).reshape(rows, -1)
            off = 16 if t == GGMLType.Q4_K else 48
            qs = blocks[..., off:off + 128].reshape(rows, nb, 4, 32)  # groups 2c (low), 2c+1 (high)
            if t == GGMLType.Q4_K:
                return _split_nibbles_packed(qs).reshape(rows, nb * 8, 16), scale, bias
            q = ((qs[..., None, :] >> np.array([0, 4], np.uint8).reshape(2, 1)) & 0x0F)
            q = q.reshape(rows, nb, 8, 32)
            qh = blocks[..., 16:48].reshape(rows, nb, 1, 32)
            q = q | (((qh >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1) << 4)
            return pack(q.reshape(rows, nb * 8, 32), 5).view(np.uint8), scale, bias
    raise ValueError(f"type {t} has no affine form")


def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned ``bits``-bit values (uint8, last axis a multiple of 32) in MLX's packing:
    a little-endian bit stream, as uint32 words."""
    q = np.ascontiguousarray(q)
    if bits == 8:
        return q.view("<u4")
    if bits == 4:
        return np.ascontiguousarray(q[..., 0::2] | (q[..., 1::2] << 4)).view("<u4")
    # 8 values -> ``bits`` bytes: assemble them in a uint64, keep its low ``bits`` bytes
    lead = q.shape[:-1]
    octets = q.reshape(lead + (-1, 8)).astype(np.uint64)
    word = np.zeros(octets.shape[:-1], np.uint64)
    for j in range(8):
        word |= octets[..., j] << np.uint64(bits * j)
    raw = word[..., None].view(np.uint8)[..., :bits]  # little-endian bytes of each word
    return np.ascontiguousarray(raw).reshape(lead + (-1,)).view("<u4")


def affine_form(raw_rows, n_rows: int, k: int, type_value: int, type_size: int, block_size: int):
    """The affine form ``(w_q, scales, biases)`` (MLX arrays) of a weight whose row ``r`` is
    ``raw_rows(start, stop)`` (a NumPy uint8 array (stop - start, row bytes)); with its byte count.

    Built a bounded number of rows at a time; the result is one uint32 array (rows, k*bits/32)
    and two float32 arrays (rows, k/32).
    """
    bits = AFFINE_BITS[type_value]
    n_blocks = k // block_size
    wq = np.empty((n_rows, k * bits // 32), np.uint32)
    scales = np.empty((n_rows, k // GROUP), np.float32)
    biases = np.empty((n_rows, k // GROUP), np.float32)
    step = max(1, _CHUNK_ELEMENTS // max(1, k))
    for start in range(0, n_rows, step):
        stop = min(n_rows, start + step)
        blocks = raw_rows(start, stop).reshape(stop - start, n_blocks, type_size)
        packed, s, b = affine_parts(blocks, type_value)
        wq[start:stop] = np.ascontiguousarray(packed).reshape(stop - start, -1).view("<u4")
        scales[start:stop] = s.reshape(stop - start, -1)
        biases[start:stop] = b.reshape(stop - start, -1)
    form = (mx.array(wq), mx.array(scales), mx.array(biases))
    mx.eval(form)
    return form, wq.nbytes + scales.nbytes + biases.nbytes


# ---------------------------------------------------------------------------- MLX side

def _half(b, at: int):
    """The little-endian float16 at byte ``at`` of every block, as float32."""
    bits = b[..., at].astype(mx.uint16) | (b[..., at + 1].astype(mx.uint16) << 8)
    return bits.view(mx.float16).astype(mx.float32)


def _shifts(*amounts, dtype=mx.uint8):
    """A column of shift amounts, to unpack several fields of each byte by broadcasting."""
    return mx.array(np.array(amounts)).astype(dtype).reshape(len(amounts), 1)


# Written to keep MLX's intermediates few and narrow (uint8 until the last step, gathers
# indexed by uint8, fields unpacked by broadcasting shifts rather than concatenation): the
# product of a tile waits for these, and what they hold at once is the tile's real footprint.

def _nib(qs):
    """ggml's split nibbles (byte j: element j low, element j + len high), uint8."""
    lead = qs.shape[:-1]
    return ((qs[..., None, :] >> _shifts(0, 4)) & 0x0F).reshape(lead + (2 * qs.shape[-1],))


def _qh_bits(b, at: int):
    """Q5_0/Q5_1: bit j of the 4 bytes at ``at`` (little-endian) as 0/1 uint8, j = 0..31."""
    lead = b.shape[:-1]
    return ((b[..., at:at + 4][..., None] >> mx.arange(8, dtype=mx.uint8)) & 1).reshape(lead + (32,))


def _k_sc_min(b, at: int):
    s = b[..., at:at + 12]
    d, m, m_d = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = mx.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = mx.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.astype(mx.float32), mn.astype(mx.float32)


def _table(values):
    return mx.array(np.array(values, np.float32))


_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_MXFP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def _q4_0(b):
    # gguf: d * float32(int8(q) - 8); q - 8 is exact in float32 either way
    return _half(b, 0)[..., None] * (_nib(b[..., 2:18]).astype(mx.float32) - 8.0)


def _q4_1(b):
    q = _nib(b[..., 4:20]).astype(mx.float32)
    return _half(b, 0)[..., None] * q + _half(b, 2)[..., None]


def _q5_0(b):
    q = _nib(b[..., 6:22]) | (_qh_bits(b, 2) << 4)
    return _half(b, 0)[..., None] * (q.astype(mx.float32) - 16.0)


def _q5_1(b):
    q = (_nib(b[..., 8:24]) | (_qh_bits(b, 4) << 4)).astype(mx.float32)
    return _half(b, 0)[..., None] * q + _half(b, 2)[..., None]


def _q8_0(b):
    return b[..., 2:34].view(mx.int8).astype(mx.float32) * _half(b, 0)[..., None]


def _q2_k(b):
    lead = b.shape[:-1]
    scales = b[..., 0:16]
    d, dmin = _half(b, 80)[..., None], _half(b, 82)[..., None]
    dl = (d * (scales & 0x0F).astype(mx.float32))[..., None]      # (..., 16, 1)
    ml = (dmin * (scales >> 4).astype(mx.float32))[..., None]
    qs = b[..., 16:80].reshape(lead + (2, 1, 32))
    q = ((qs >> _shifts(0, 2, 4, 6)) & 3).reshape(lead + (16, 16))
    return (dl * q.astype(mx.float32) - ml).reshape(lead + (256,))


def _q3_k(b):
    lead = b.shape[:-1]
    hmask, qs, sc = b[..., 0:32], b[..., 32:96], b[..., 96:108]
    d = _half(b, 108)[..., None]
    lo = (sc[..., None, 0:8] >> _shifts(0, 4)).reshape(lead + (16,)) & 0x0F
    hi = (sc[..., None, 8:12] >> _shifts(0, 2, 4, 6)).reshape(lead + (16,)) & 0x03
    scales = (lo | (hi << 4)).astype(mx.int8) - 32
    dl = (d * scales.astype(mx.float32))[..., None]                # (..., 16, 1)
    ql = (qs.reshape(lead + (2, 1, 32)) >> _shifts(0, 2, 4, 6)) & 3
    qh = (hmask.reshape(lead + (1, 32)) >> mx.arange(8, dtype=mx.uint8).reshape(8, 1)) & 1
    # a clear bit of hmask subtracts 4 (gguf: int8(ql) - int8((qh ^ 1) << 2))
    q = ql.reshape(lead + (16, 16)).astype(mx.float32) - ((qh.reshape(lead + (16, 16)) ^ 1) << 2)
    return (dl * q).reshape(lead + (256,))


def _q45_k(b, five: bool):
    lead = b.shape[:-1]
    d, dmin = _half(b, 0)[..., None], _half(b, 2)[..., None]
    sc, mn = _k_sc_min(b, 4)
    dl = (d * sc)[..., None]                                        # (..., 8, 1)
    dm = (dmin * mn)[..., None]
    off = 48 if five else 16
    q = (b[..., off:off + 128].reshape(lead + (4, 1, 32)) >> _shifts(0, 4)) & 0x0F
    q = q.reshape(lead + (8, 32))
    if five:
        qh = b[..., 16:48].reshape(lead + (1, 32))
        q = q | (((qh >> mx.arange(8, dtype=mx.uint8).reshape(8, 1)) & 1) << 4)
    return (dl * q.astype(mx.float32) - dm).reshape(lead + (256,))


def _q6_k(b):
    lead = b.shape[:-1]
    ql, qh, sc = b[..., 0:128], b[..., 128:192], b[..., 192:208]
    d = _half(b, 208)[..., None]
    dl = (d * sc.view(mx.int8).astype(mx.float32))[..., None]      # (..., 16, 1)
    lo = ((ql.reshape(lead + (2, 1, 64)) >> _shifts(0, 4)) & 0x0F).reshape(lead + (8, 32))
    hi = ((qh.reshape(lead + (2, 1, 32)) >> _shifts(0, 2, 4, 6)) & 0x03).reshape(lead + (8, 32))
    q = (lo | (hi << 4)).reshape(lead + (16, 16)).astype(mx.float32) - 32.0
    return (dl * q).reshape(lead + (256,))


def _iq4_nl(b):
    return _half(b, 0)[..., None] * _table(_IQ4NL)[_nib(b[..., 2:18])]


def _iq4_xs(b):
    lead = b.shape[:-1]
    d = _half(b, 0)[..., None]
    sh = (b[..., 2].astype(mx.uint16) | (b[..., 3].astype(mx.uint16) << 8))[..., None]
    sl = (b[..., 4:8][..., None] >> mx.array([0, 4], dtype=mx.uint8)).reshape(lead + (8,)) & 0x0F
    shi = ((sh >> mx.arange(0, 16, 2, dtype=mx.uint16)) & 3).astype(mx.uint8)
    scales = (sl | (shi << 4)).astype(mx.int8) - 32
    dl = (d * scales.astype(mx.float32))[..., None]                 # (..., 8, 1)
    q = _table(_IQ4NL)[_nib(b[..., 8:136].reshape(lead + (8, 16)))]
    return (dl * q).reshape(lead + (256,))


def _mxfp4(b):
    e = b[..., 0].astype(mx.uint32)
    bits = mx.where(e < 2, mx.array(0x00200000, dtype=mx.uint32) << e, (e - 1) << 23)
    return bits.view(mx.float32)[..., None] * _table(_MXFP4)[_nib(b[..., 1:17])]


_DEQUANT = {
    GGMLType.Q4_0: _q4_0, GGMLType.Q4_1: _q4_1, GGMLType.Q5_0: _q5_0, GGMLType.Q5_1: _q5_1,
    GGMLType.Q8_0: _q8_0, GGMLType.Q2_K: _q2_k, GGMLType.Q3_K: _q3_k,
    GGMLType.Q4_K: lambda b: _q45_k(b, False), GGMLType.Q5_K: lambda b: _q45_k(b, True),
    GGMLType.Q6_K: _q6_k, GGMLType.IQ4_NL: _iq4_nl, GGMLType.IQ4_XS: _iq4_xs,
    GGMLType.MXFP4: _mxfp4,
}
#: the types :func:`dequantize` widens with MLX operations
NATIVE_DEQUANT = frozenset(int(t) for t in _DEQUANT)


def dequantize(raw, type_info):
    """Quantized rows (MLX uint8, last axis = row bytes) -> float32 (last axis = elements),
    lazily with MLX operations; None for a type not covered here."""
    fn = _DEQUANT.get(type_info.value)
    if fn is None:
        return None
    lead = tuple(raw.shape[:-1])
    n_blocks = raw.shape[-1] // type_info.type_size
    blocks = raw.reshape(lead + (n_blocks, type_info.type_size))
    return fn(blocks).reshape(lead + (n_blocks * type_info.block_size,))
