"""Explicit vector code for the kernels: LLVM IR built with llvmlite, inside numba intrinsics.

Numba vectorises plain loops well, but not everything a kernel needs: a byte shuffle used as
a 16-entry table, integer dot products of 8-bit values (``vpdpbusd``), a loop whose
accumulators are vectors. Those are written here as IR builders that the type modules and
:mod:`.q8` compose. All take and return ``llvmlite.ir`` values; pointers are ``i8*`` unless
said otherwise.

:func:`udot4` is the one place that looks at the host CPU: with AVX512-VNNI (or AVX-VNNI) it
is one ``vpdpbusd``; elsewhere it is plain IR that LLVM lowers to what the target has
(``pmaddubsw``/``pmaddwd`` on AVX2, ``sdot``/``udot`` on ARM). Numba's disk cache is keyed by
the host CPU and its features, so machine code built for one never runs on the other.
"""

from __future__ import annotations

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils

I8, I16, I32, I64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
F32 = ir.FloatType()
FAST = ("fast",)


def vec(elem, n: int) -> ir.VectorType:
    return ir.VectorType(elem, n)


def const(ty, values):
    """A vector constant of type ``ty`` (a list) or a scalar one."""
    return ir.Constant(ty, list(values) if isinstance(ty, ir.VectorType) else values)


def splat(builder, value, n: int):
    """``value`` (a scalar) in every lane of an ``n``-lane vector."""
    ty = vec(value.type, n)
    v = builder.insert_element(ir.Constant(ty, None), value, I32(0))
    return builder.shuffle_vector(v, v, const(vec(I32, n), [0] * n))


def lanes(builder, v, idx):
    """The lanes ``idx`` of vector ``v``, as a vector."""
    return builder.shuffle_vector(v, v, const(vec(I32, len(idx)), idx))


def concat(builder, a, b):
    """Vectors ``a`` then ``b`` (same type) as one vector of twice the lanes."""
    n = a.type.count
    return builder.shuffle_vector(a, b, const(vec(I32, 2 * n), range(2 * n)))


def item_pointer(context, builder, aryty, ary, index, indty):
    """Pointer to ``ary[index]`` (1-d), no wraparound (typed as the array's element)."""
    a = context.make_array(aryty)(context, builder, ary)
    index = context.cast(builder, index, indty, types.intp)
    return cgutils.get_item_pointer2(context, builder, a.data,
                                     cgutils.unpack_tuple(builder, a.shape),
                                     cgutils.unpack_tuple(builder, a.strides), aryty.layout,
                                     [index])


def at(builder, pointer, offset):
    """``pointer`` + ``offset`` elements (an int or an i64 value)."""
    if isinstance(offset, int):
        if not offset:
            return pointer
        offset = I64(offset)
    return builder.gep(pointer, [offset])


def load(builder, pointer, ty, offset=0):
    """A value of type ``ty`` (scalar or vector) at byte ``offset`` of the ``i8*``
    ``pointer``, unaligned."""
    return builder.load(builder.bitcast(at(builder, pointer, offset), ty.as_pointer()), align=1)


def vector_at(builder, pointer, vty, offset=0):
    """``pointer`` (to an element) + ``offset`` elements, as a pointer to a ``vty`` vector."""
    return builder.bitcast(at(builder, pointer, offset), vty.as_pointer())


def half(builder, pointer, offset=0):
    """The IEEE half at byte ``offset`` of ``pointer``, as float (one ``vcvtph2ps``)."""
    return builder.fpext(load(builder, pointer, ir.HalfType(), offset), F32)


def round_to_half(builder, value):
    """The float ``value`` rounded to the nearest IEEE half, as float (ggml_half fields)."""
    return builder.fpext(builder.fptrunc(value, ir.HalfType()), F32)


def nibbles32(builder, pointer, offset=0):
    """The 16 bytes at ``offset`` as 32 unsigned 4-bit values (<32 x i8>): low nibbles
    first, then high nibbles (the order of ggml's 32-element blocks)."""
    q = load(builder, pointer, vec(I8, 16), offset)
    lo = builder.and_(q, const(vec(I8, 16), [15] * 16))
    hi = builder.lshr(q, const(vec(I8, 16), [4] * 16))
    return concat(builder, lo, hi)


def bits32(builder, word, value: int):
    """<32 x i8>: ``value`` in lane j where bit j of the i32 ``word`` is set, else 0."""
    masks = const(vec(I32, 32), [1 << j for j in range(32)])
    set_ = builder.icmp_unsigned("!=", builder.and_(splat(builder, word, 32), masks),
                                 const(vec(I32, 32), [0] * 32))
    return builder.select(set_, const(vec(I8, 32), [value] * 32), const(vec(I8, 32), [0] * 32))


def lookup16(builder, table, idx):
    """``table[idx[i]]`` for each lane of ``idx`` (<n x i8>, values < 16), ``table`` a
    <16 x i8> constant: a build_vector of extractelements, which LLVM lowers to one variable
    byte shuffle where the target has one (``pshufb``, ``tbl``)."""
    n = idx.type.count
    out = ir.Constant(vec(I8, n), None)
    for i in range(n):
        t = builder.extract_element(table, builder.extract_element(idx, I32(i)))
        out = builder.insert_element(out, t, I32(i))
    return out


def hsum(builder, v):
    """The sum of the lanes of the float vector ``v`` (a tree of halves)."""
    n = v.type.count
    while n > 1:
        n //= 2
        v = builder.fadd(lanes(builder, v, range(n)), lanes(builder, v, range(n, 2 * n)),
                         flags=FAST)
    return builder.extract_element(v, I32(0))


def _host_vnni() -> str | None:
    """The LLVM intrinsic of ``vpdpbusd`` on 256-bit vectors, if this CPU has it."""
    try:
        features = llvm.get_host_cpu_features()
    except RuntimeError:  # not every target reports its features
        return None
    if features.get("avx512vnni") and features.get("avx512vl"):
        return "llvm.x86.avx512.vpdpbusd.256"
    if features.get("avxvnni"):
        return "llvm.x86.avx2.vpdpbusd.256"
    return None


VNNI_DPBUSD = _host_vnni()


def udot4(builder, u, s, start=None):
    """<8 x i32>: lane i = start[i] + sum over j < 4 of u[4 i + j] * s[4 i + j], for <32 x i8>
    ``u`` (unsigned) and ``s`` (signed) and an optional <8 x i32> ``start`` (zeros if None);
    exact (at most 4 * 255 * 128 in magnitude, plus ``start``)."""
    v8 = vec(I32, 8)
    if start is None:
        start = const(v8, [0] * 8)
    if VNNI_DPBUSD:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8, [v8] * 3),
                                            VNNI_DPBUSD)
        return builder.call(fn, [start, builder.bitcast(u, v8), builder.bitcast(s, v8)])
    p = builder.mul(builder.zext(u, vec(I32, 32)), builder.sext(s, vec(I32, 32)))
    parts = [lanes(builder, p, range(k, 32, 4)) for k in range(4)]
    return builder.add(builder.add(builder.add(parts[0], parts[1]),
                                   builder.add(parts[2], parts[3])), start)


def prefetch(builder, pointer, offset):
    """Ask the CPU to bring the line at ``pointer + offset`` into the caches (a hint: never
    faults, so it may lie past the end of the data)."""
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ir.VoidType(), [I8.as_pointer(), I32, I32, I32]),
        "llvm.prefetch.p0")
    builder.call(fn, [at(builder, pointer, offset), I32(0), I32(3), I32(1)])
