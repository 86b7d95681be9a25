"""ggml graphs for one op with given types: the builders behind tests/test_ops_support.py.

:func:`build` makes, with ggml's own constructors (through ``ggml_harness``), a
one-op graph whose node has exactly the requested type combination
(``dst``, ``src0``, ``src1``, ...); :func:`check_combo` runs it on ggml's CPU
backend and on rpcserver's executor and compares the results. The sweep in
test_ops_support.py calls it for every combination rpcserver's type-support
table (:mod:`rpcserver.ops.support`) lists, so nothing is in the table that
has not been checked against ggml.

Shapes are small and fixed per op; rows are 256 elements wherever a source
may be quantized (the largest ggml block). Data is random in [-1, 1] unless the
op needs otherwise (positive for LOG/SQRT, valid indices, distinct values for
sorting).
"""

from __future__ import annotations

import math
import struct
from ctypes import c_bool, c_float, c_int, c_int64, c_size_t, c_uint32, c_void_p

import numpy as np

import ggml_harness as H
from ggml_harness import GgmlCase, T, assert_close, fn
from rpcserver import ggml
from rpcserver.ggml import GGMLType as GT
from rpcserver.ggml import GluOp, Op, UnaryOp

V = c_void_p
F32, F16, BF16 = int(GT.F32), int(GT.F16), int(GT.BF16)
I32, I64 = int(GT.I32), int(GT.I64)
NE0 = 256  # row length: a multiple of every block size

# -- tolerances (test-backend-ops' metric, normalized MSE) --------------------------------------
NMSE_DEFAULT = 1e-7  # test-backend-ops' default
NMSE_F16_DST = 1e-6  # an F16 result one ulp off here and there (transcendental functions)
NMSE_BF16_DST = 2.0 ** -16  # every element one bf16 ulp off at most
NMSE_QUANT_DST = 1e-6  # re-quantized results: see test_ops_basic.NMSE_QUANT_DST
NMSE_MUL_MAT = 5e-4  # test-backend-ops' MUL_MAT / FLASH_ATTN_EXT bound (ggml rounds activations)


class NotConstructible(Exception):
    """ggml's constructors do not produce a node with the requested types."""


def _g(name, *more):
    """ggml constructor ``name(ctx, a, *more)``."""
    return fn(name, V, V, V, *more)


def _f32_bits(x: float) -> int:
    return struct.unpack("<i", struct.pack("<f", x))[0]


def uniform(lo, hi):
    return lambda rng, ne: rng.uniform(lo, hi, int(np.prod(ne)))


def integers(lo, hi):
    return lambda rng, ne: rng.integers(lo, hi, int(np.prod(ne)))


def distinct(rng, ne):
    n = int(np.prod(ne))
    return rng.permutation(n).astype(np.float32) * 0.01 - n * 0.005


def away_from_zero(lo, hi):
    def make(rng, ne):
        n = int(np.prod(ne))
        return rng.uniform(lo, hi, n) * rng.choice([-1.0, 1.0], n)
    return make


def _raw_bytes(rng, ne, type_):
    """Random bytes for a tensor of ``type_`` (types ggml cannot quantize to; copies only)."""
    info = ggml.TYPES[type_]
    n = int(np.prod(ne))
    return rng.integers(0, 256, info.row_size(n), dtype=np.uint8).tobytes()


_QUANTIZABLE_BY_GGML: dict[int, bool] = {}


def _ggml_can_quantize(type_: int) -> bool:
    """Whether ggml_quantize_chunk accepts ``type_`` (ggml-base's quantize switch)."""
    cached = _QUANTIZABLE_BY_GGML.get(type_)
    if cached is None:
        cached = type_ in {int(GT[n]) for n in (
            "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
            "TQ1_0", "TQ2_0", "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ3_S", "IQ2_S", "IQ1_S", "IQ1_M",
            "IQ4_NL", "IQ4_XS", "MXFP4", "NVFP4", "Q1_0", "Q2_0")}
        _QUANTIZABLE_BY_GGML[type_] = cached
    return cached


def leaf(case, type_, ne, fill=None):
    """A new leaf tensor; data ggml cannot produce for ``type_`` is raw random bytes."""
    info = ggml.TYPES[type_]
    if fill is None and info.is_quantized and not _ggml_can_quantize(type_):
        fill = lambda rng, shape: _raw_bytes(rng, shape, type_)  # noqa: E731
    if fill is None and type_ in (int(GT.I8), int(GT.I16), I32, I64):
        fill = integers(-50, 50)
    return case.new_tensor(type_, ne, fill=fill)


# =========================================================================== builders
#
# Each builder: (case, dst, srcs, sub) -> output tensor. ``srcs`` has one entry per source slot
# (None: absent). The builder may ignore ``dst`` when ggml's constructor fixes it; build()
# then checks that the node has the requested types.

BUILDERS: dict[int, object] = {}


def builder(*ops):
    def register(f):
        for o in ops:
            BUILDERS[int(o)] = f
        return f
    return register


@builder(Op.ADD, Op.SUB, Op.MUL, Op.DIV)
def _binary(case, op, dst, srcs, sub):
    s0, s1 = srcs
    fill1 = away_from_zero(0.25, 2.0) if op == Op.DIV else None
    a = leaf(case, s0, (NE0, 3, 2))
    b = leaf(case, s1, (NE0, 3, 2), fill=fill1)
    if dst != s0:
        if op != Op.ADD:
            raise NotConstructible("only ADD has a casting constructor (ggml_add_cast)")
        return fn("ggml_add_cast", V, V, V, V, c_int)(case.ctx, a, b, dst)
    name = {Op.ADD: "ggml_add", Op.SUB: "ggml_sub", Op.MUL: "ggml_mul", Op.DIV: "ggml_div"}[op]
    return _g(name, V)(case.ctx, a, b)


@builder(Op.ADD1)
def _add1(case, op, dst, srcs, sub):
    a = leaf(case, srcs[0], (NE0, 3, 2))
    b = leaf(case, srcs[1], (1,))
    return _g("ggml_add1", V)(case.ctx, a, b)


@builder(Op.ADD_ID)
def _add_id(case, op, dst, srcs, sub):
    a = leaf(case, srcs[0], (NE0, 3, 2))
    b = leaf(case, srcs[1], (NE0, 5))
    ids = leaf(case, srcs[2], (3, 2), fill=integers(0, 5))
    return _g("ggml_add_id", V, V)(case.ctx, a, b, ids)


@builder(Op.ACC, Op.SET)
def _acc_set(case, op, dst, srcs, sub):
    a = leaf(case, srcs[0], (16, 6, 3))
    b = leaf(case, srcs[1], (4, 3, 2))
    g = T(a)
    offset = g.nb[0] * 2 + g.nb[1]
    name = "ggml_acc" if op == Op.ACC else "ggml_set"
    return _g(name, V, c_size_t, c_size_t, c_size_t, c_size_t)(case.ctx, a, b, g.nb[1], g.nb[2],
                                                               g.nb[3], offset)


@builder(Op.SCALE)
def _scale(case, op, dst, srcs, sub):
    return _g("ggml_scale_bias", c_float, c_float)(case.ctx, leaf(case, srcs[0], (NE0, 3, 2)),
                                                   0.75, 0.25)


@builder(Op.CLAMP)
def _clamp(case, op, dst, srcs, sub):
    return _g("ggml_clamp", c_float, c_float)(case.ctx, leaf(case, srcs[0], (NE0, 3, 2)), -0.5, 0.5)


_SIMPLE = {Op.SQR: "ggml_sqr", Op.SQRT: "ggml_sqrt", Op.LOG: "ggml_log", Op.SIN: "ggml_sin",
           Op.COS: "ggml_cos", Op.SUM: "ggml_sum", Op.SUM_ROWS: "ggml_sum_rows",
           Op.MEAN: "ggml_mean", Op.CUMSUM: "ggml_cumsum", Op.DUP: "ggml_dup"}


@builder(*_SIMPLE)
def _simple(case, op, dst, srcs, sub):
    fill = uniform(0.05, 2.0) if op in (Op.SQRT, Op.LOG) else None
    return _g(_SIMPLE[op])(case.ctx, leaf(case, srcs[0], (NE0, 3, 2), fill))


@builder(Op.CONT)
def _cont(case, op, dst, srcs, sub):
    base = leaf(case, srcs[0], (NE0, 2, 3))
    return _g("ggml_cont")(case.ctx, case.permute(base, 0, 2, 1, 3))


@builder(Op.CPY)
def _cpy(case, op, dst, srcs, sub):
    s0 = srcs[0]
    fill = None
    if dst in (I32, I64) or s0 in (I32, I64):
        fill = integers(-50, 50) if s0 in (I32, I64, int(GT.I8), int(GT.I16)) else uniform(-50, 50)
    a = leaf(case, s0, (NE0, 3, 2), fill)
    return fn("ggml_cast", V, V, V, c_int)(case.ctx, a, dst)


@builder(Op.NORM, Op.RMS_NORM, Op.L2_NORM)
def _norm(case, op, dst, srcs, sub):
    name = {Op.NORM: "ggml_norm", Op.RMS_NORM: "ggml_rms_norm", Op.L2_NORM: "ggml_l2_norm"}[op]
    return _g(name, c_float)(case.ctx, leaf(case, srcs[0], (NE0, 3, 2), uniform(-2, 3)), 1e-6)


@builder(Op.GROUP_NORM)
def _group_norm(case, op, dst, srcs, sub):
    return _g("ggml_group_norm", c_int, c_float)(case.ctx, leaf(case, srcs[0], (16, 4, 6, 2)),
                                                 3, 1e-6)


@builder(Op.ARGMAX)
def _argmax(case, op, dst, srcs, sub):
    return _g("ggml_argmax")(case.ctx, leaf(case, srcs[0], (NE0, 5), distinct))


@builder(Op.ARGSORT)
def _argsort(case, op, dst, srcs, sub):
    return _g("ggml_argsort", c_int)(case.ctx, leaf(case, srcs[0], (NE0, 3, 2), distinct), 1)


@builder(Op.TOP_K)
def _top_k(case, op, dst, srcs, sub):
    return _g("ggml_top_k", c_int)(case.ctx, leaf(case, srcs[0], (NE0, 3, 2), distinct), 5)


@builder(Op.COUNT_EQUAL)
def _count_equal(case, op, dst, srcs, sub):
    a = leaf(case, srcs[0], (NE0, 3), integers(0, 3))
    b = leaf(case, srcs[1], (NE0, 3), integers(0, 3))
    return _g("ggml_count_equal", V)(case.ctx, a, b)


@builder(Op.REPEAT)
def _repeat(case, op, dst, srcs, sub):
    a = leaf(case, srcs[0], (NE0, 2, 1))
    return _g("ggml_repeat_4d", c_int64, c_int64, c_int64, c_int64)(case.ctx, a, NE0, 4, 3, 2)


@builder(Op.CONCAT)
def _concat(case, op, dst, srcs, sub):
    a = leaf(case, srcs[0], (NE0, 3, 2))
    b = leaf(case, srcs[1], (NE0, 2, 2))
    return _g("ggml_concat", V, c_int)(case.ctx, a, b, 1)


@builder(Op.FILL)
def _fill(case, op, dst, srcs, sub):
    return _g("ggml_fill", c_float)(case.ctx, leaf(case, srcs[0], (NE0, 3, 2)), 0.625)


@builder(Op.ARANGE)
def _arange(case, op, dst, srcs, sub):
    return fn("ggml_arange", V, V, c_float, c_float, c_float)(case.ctx, -3.0, 7.0, 0.25)


@builder(Op.TIMESTEP_EMBEDDING)
def _timestep(case, op, dst, srcs, sub):
    t = leaf(case, srcs[0], (5,), lambda rng, ne: np.float32([0, 1, 10, 250.5, 999]))
    return _g("ggml_timestep_embedding", c_int, c_int)(case.ctx, t, 32, 10000)


@builder(Op.TRI)
def _tri(case, op, dst, srcs, sub):
    return _g("ggml_tri", c_int)(case.ctx, leaf(case, srcs[0], (9, 9, 2)), 3)


@builder(Op.LEAKY_RELU)
def _leaky_relu(case, op, dst, srcs, sub):
    return _g("ggml_leaky_relu", c_float, c_bool)(case.ctx, leaf(case, srcs[0], (NE0, 3, 2)),
                                                  0.125, False)


@builder(Op.DIAG_MASK_INF, Op.DIAG_MASK_ZERO)
def _diag_mask(case, op, dst, srcs, sub):
    name = "ggml_diag_mask_inf" if op == Op.DIAG_MASK_INF else "ggml_diag_mask_zero"
    return _g(name, c_int)(case.ctx, leaf(case, srcs[0], (9, 9, 2)), 2)


@builder(Op.PAD)
def _pad(case, op, dst, srcs, sub):
    return _g("ggml_pad_ext", *([c_int] * 8))(case.ctx, leaf(case, srcs[0], (8, 4, 3, 2)),
                                             1, 2, 0, 1, 2, 0, 0, 1)


@builder(Op.ROLL)
def _roll(case, op, dst, srcs, sub):
    return _g("ggml_roll", c_int, c_int, c_int, c_int)(case.ctx, leaf(case, srcs[0], (6, 4, 3, 2)),
                                                       2, -1, 1, 0)


@builder(Op.UPSCALE)
def _upscale(case, op, dst, srcs, sub):
    a = leaf(case, srcs[0], (5, 6, 3, 2))
    return _g("ggml_interpolate", c_int64, c_int64, c_int64, c_int64, c_uint32)(
        case.ctx, a, 10, 9, 3, 2, 1)  # bilinear


@builder(Op.GET_ROWS)
def _get_rows(case, op, dst, srcs, sub):
    table = leaf(case, srcs[0], (NE0, 10, 3))
    idx = leaf(case, srcs[1], (7, 3), integers(0, 10))
    return _g("ggml_get_rows", V)(case.ctx, table, idx)


@builder(Op.GET_ROWS_BACK)
def _get_rows_back(case, op, dst, srcs, sub):
    grad = leaf(case, srcs[0], (12, 9))
    rows = leaf(case, srcs[1], (9,), lambda rng, ne: np.array([0, 3, 3, 5, 1, 3, 0, 6, 5]))
    shape_of = leaf(case, F32, (12, 7))  # only its shape matters (not a source of the node)
    return _g("ggml_get_rows_back", V, V)(case.ctx, grad, rows, shape_of)


@builder(Op.SET_ROWS)
def _set_rows(case, op, dst, srcs, sub):
    s0, s1, s2 = srcs
    target = leaf(case, s2, (NE0, 10, 2))
    values = leaf(case, s0, (NE0, 4, 2))
    idx = leaf(case, s1, (4, 2), lambda rng, ne: np.concatenate(
        [rng.permutation(10)[:4] for _ in range(2)]))
    return _g("ggml_set_rows", V, V)(case.ctx, target, values, idx)


@builder(Op.MUL_MAT)
def _mul_mat(case, op, dst, srcs, sub):
    a = leaf(case, srcs[0], (NE0, 16, 2))
    b = leaf(case, srcs[1], (NE0, 8, 2))
    return _g("ggml_mul_mat", V)(case.ctx, a, b)


@builder(Op.MUL_MAT_ID)
def _mul_mat_id(case, op, dst, srcs, sub):
    n_expert, n_used, n_tokens = 4, 2, 3
    as_ = leaf(case, srcs[0], (NE0, 16, n_expert))
    b = leaf(case, srcs[1], (NE0, n_used, n_tokens))
    ids = leaf(case, srcs[2], (n_used, n_tokens), lambda rng, ne: np.concatenate(
        [rng.permutation(n_expert)[:n_used] for _ in range(n_tokens)]))
    return _g("ggml_mul_mat_id", V, V)(case.ctx, as_, b, ids)


@builder(Op.SOFT_MAX)
def _soft_max(case, op, dst, srcs, sub):
    srcs = list(srcs) + [None] * (3 - len(srcs))
    a = leaf(case, srcs[0], (32, 6, 4))
    mask = leaf(case, srcs[1], (32, 6)) if srcs[1] is not None else None
    out = fn("ggml_soft_max_ext", V, V, V, V, c_float, c_float)(case.ctx, a, mask, 0.5, 0.0)
    if srcs[2] is not None:
        sinks = leaf(case, srcs[2], (4,), uniform(-2, 2))
        fn("ggml_soft_max_add_sinks", None, V, V)(out, sinks)
    return out


_ROPE_ARGS = (c_int, c_int, c_int, c_float, c_float, c_float, c_float, c_float, c_float)


@builder(Op.ROPE, Op.ROPE_BACK)
def _rope(case, op, dst, srcs, sub):
    srcs = list(srcs) + [None] * (3 - len(srcs))
    n_tok = 5
    a = leaf(case, srcs[0], (NE0, 2, n_tok))
    pos = leaf(case, srcs[1], (n_tok,), integers(0, 100))
    ff = leaf(case, srcs[2], (NE0 // 2,), uniform(1.0, 2.0)) if srcs[2] is not None else None
    name = "ggml_rope_ext_back" if op == Op.ROPE_BACK else "ggml_rope_ext"
    return fn(name, V, V, V, V, V, *_ROPE_ARGS)(case.ctx, a, pos, ff, NE0, 2, 4096, 10000.0, 1.0,
                                                0.0, 1.0, 32.0, 1.0)


@builder(Op.FLASH_ATTN_EXT)
def _flash_attn(case, op, dst, srcs, sub):
    srcs = list(srcs) + [None] * (5 - len(srcs))
    n_q, n_kv, n_head, n_head_kv = 7, 32, 4, 2
    q = leaf(case, srcs[0], (NE0, n_q, n_head))
    k = leaf(case, srcs[1], (NE0, n_kv, n_head_kv))
    v = leaf(case, srcs[2], (NE0, n_kv, n_head_kv))
    mask = None
    if srcs[3] is not None:
        def causal(rng, ne):
            m = rng.uniform(-1, 1, (ne[3], ne[2], ne[1], ne[0])).astype(np.float32)
            for i in range(ne[1]):
                m[..., i, n_kv - n_q + i + 1:] = -np.inf
            return m
        mask = leaf(case, srcs[3], (n_kv, n_q), causal)
    out = fn("ggml_flash_attn_ext", V, V, V, V, V, V, c_float, c_float, c_float)(
        case.ctx, q, k, v, mask, 1.0 / math.sqrt(NE0), 0.0, 0.0)
    if srcs[4] is not None:
        sinks = leaf(case, srcs[4], (n_head,), uniform(-2, 2))
        fn("ggml_flash_attn_ext_add_sinks", None, V, V)(out, sinks)
    fn("ggml_prec_set_acc", c_bool, V, c_int)(out, 10)  # GGML_PREC_F32
    return out


_UNARY_FILL = {UnaryOp.FLOOR: uniform(-10, 10), UnaryOp.CEIL: uniform(-10, 10),
               UnaryOp.ROUND: uniform(-10, 10), UnaryOp.TRUNC: uniform(-10, 10),
               UnaryOp.EXP: uniform(-4, 4), UnaryOp.EXPM1: uniform(-4, 4)}
XIELU_PARAMS = (0.8, 0.8, 0.5, -1e-6)


@builder(Op.UNARY)
def _unary(case, op, dst, srcs, sub):
    a = leaf(case, srcs[0], (NE0, 3, 2), _UNARY_FILL.get(sub, uniform(-3, 3)))
    if sub == UnaryOp.XIELU:
        return _g("ggml_xielu", c_float, c_float, c_float, c_float)(case.ctx, a, *XIELU_PARAMS)
    return _g("ggml_unary", c_int)(case.ctx, a, int(sub))


OAI_ALPHA, OAI_LIMIT, CLAMP_LIMIT = 1.702, 7.0, 5.0


@builder(Op.GLU)
def _glu(case, op, dst, srcs, sub):
    srcs = list(srcs) + [None] * (2 - len(srcs))
    fill = uniform(-12, 12)
    if srcs[1] is not None:
        a = leaf(case, srcs[0], (NE0, 3, 2), fill)
        b = leaf(case, srcs[1], (NE0, 3, 2), fill)
    else:
        a = leaf(case, srcs[0], (2 * NE0, 3, 2), fill)
        b = None
    if sub == GluOp.SWIGLU_OAI:
        return fn("ggml_swiglu_oai", V, V, V, V, c_float, c_float)(case.ctx, a, b, OAI_ALPHA,
                                                                   OAI_LIMIT)
    if sub == GluOp.SWIGLU_CLAMP:
        return fn("ggml_swiglu_clamp", V, V, V, V, c_float)(case.ctx, a, b, CLAMP_LIMIT)
    if b is not None:
        return fn("ggml_glu_split", V, V, V, V, c_int)(case.ctx, a, b, int(sub))
    return fn("ggml_glu", V, V, V, c_int, c_bool)(case.ctx, a, int(sub), False)


# =========================================================================== running one combination

def node_types(t: int):
    """(dst, srcs) of ggml tensor ``t``, trailing absent sources dropped."""
    g = T(t)
    srcs = [T(s).type if s else None for s in g.src]
    while srcs and srcs[-1] is None:
        srcs.pop()
    return g.type, tuple(srcs)


def build(case, op: int, sub, dst: int, srcs) -> int:
    """The op's node with these types, or NotConstructible."""
    fn_ = BUILDERS.get(int(op))
    if fn_ is None:
        raise NotConstructible(f"no builder for {ggml.op_name(op)}")
    out = fn_(case, Op(op), dst, tuple(srcs), sub)
    got = node_types(out)
    if dst is None:  # whatever the constructor makes (for exploring)
        dst = got[0]
    want = (dst, tuple(srcs))
    want_srcs = list(want[1])
    while want_srcs and want_srcs[-1] is None:
        want_srcs.pop()
    if got != (want[0], tuple(want_srcs)):
        raise NotConstructible(f"ggml built {describe(op, sub, *got)}")
    return out


def describe(op, sub, dst, srcs) -> str:
    name = ggml.op_name(op)
    if sub is not None:
        name += f"({(ggml.UNARY_OPS if op == Op.UNARY else ggml.GLU_OPS)[sub]})"
    names = ", ".join(f"src{i}={ggml.TYPES[s].name if s is not None else '-'}"
                      for i, s in enumerate(srcs))
    return f"{name} dst={ggml.TYPES[dst].name}" + (f", {names}" if names else "")


def tolerance(op, sub, dst: int, srcs) -> float:
    """The NMSE a combination is held to."""
    limit = NMSE_DEFAULT
    if op in (Op.MUL_MAT, Op.MUL_MAT_ID, Op.FLASH_ATTN_EXT) and any(
            s is not None and s != F32 for s in srcs[:3]):
        limit = NMSE_MUL_MAT  # ggml rounds activations to the weights' vec_dot type
    if ggml.TYPES[dst].is_quantized:
        limit = max(limit, NMSE_QUANT_DST)  # re-quantized: ties rounded differently
    if dst == F16:
        limit = max(limit, NMSE_F16_DST)
    if dst == BF16:
        limit = max(limit, NMSE_BF16_DST)
    return limit


def _byte_exact(op, dst, srcs) -> bool:
    """Results compared byte for byte: same-type copies and integer outputs."""
    if op in (Op.DUP, Op.CONT, Op.CPY) and srcs[0] == dst:
        return True
    if op in (Op.CONCAT, Op.REPEAT, Op.GET_ROWS, Op.SET_ROWS, Op.ROLL) and srcs and srcs[0] == dst:
        return True
    return not ggml.TYPES[dst].is_quantized and dst not in (F32, F16, BF16, int(GT.F64))


def check_combo(op: int, sub, dst: int, srcs, *, seed: int = 0, isolate=None) -> float:
    """Build, run on ggml and rpcserver, compare. Returns the NMSE (0.0 for byte compares)."""
    srcs = tuple(srcs)
    with GgmlCase(seed=seed, isolate=isolate) as case:
        out = case.mark_output(build(case, op, sub, dst, srcs))
        dst = T(out).type
        what = describe(op, sub, dst, srcs)
        exact = _byte_exact(op, dst, srcs)
        ref = case.run([out]) if not exact else _run_native(case, out)
        ours = case.run_ours(native=exact)
        if exact:
            r, o = ref.array(out, native=True), ours.arrays[0]
            if not np.array_equal(r, o):
                bad = np.argwhere(r != o)
                raise AssertionError(f"{what}: {len(bad)} element(s) differ from ggml, first at "
                                     f"{tuple(bad[0])}: ref {r[tuple(bad[0])]!r} ours "
                                     f"{o[tuple(bad[0])]!r}")
            return 0.0
        return assert_close(ref.arrays[0], ours.arrays[0], tolerance(op, sub, dst, srcs),
                            what=what, allow_nan=(op == Op.DIAG_MASK_INF))


def _run_native(case, out):
    """case.run() for outputs that need not (or cannot) be converted to float by ggml."""
    original = H.RefRun.array

    def array(self, t, *, native=False):
        return original(self, t, native=True)

    H.RefRun.array = array
    try:
        return case.run([out])
    finally:
        H.RefRun.array = original
