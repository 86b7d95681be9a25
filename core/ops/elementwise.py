"""Element-wise ops: binary arithmetic with ggml broadcasting, SCALE, CLAMP, unary and GLU ops, copies."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import ggml
from ..ggml import GluOp, Op, UnaryOp
from . import broadcast_like, op


@op(Op.ADD, Op.SUB, Op.MUL, Op.DIV)
def binary(ctx):
    xp = ctx.xp
    a = ctx.f32(ctx.src(0))
    b = broadcast_like(xp, ctx.f32(ctx.src(1)), a.shape)
    fn = {Op.ADD: xp.add, Op.SUB: xp.subtract, Op.MUL: xp.multiply, Op.DIV: xp.divide}[ctx.node.op]
    ctx.store(fn(a, b))


@op(Op.ADD1)
def add1(ctx):
    a = ctx.f32(ctx.src(0))
    ctx.store(a + ctx.f32(ctx.src(1)).reshape(-1)[0])


@op(Op.SCALE)
def scale(ctx):
    # op_params: scale, bias (floats): y = x*s + b
    ctx.store(ctx.f32(ctx.src(0)) * ctx.param_f32(0) + ctx.param_f32(1))


@op(Op.CLAMP)
def clamp(ctx):
    # ggml: MAX(MIN(x, max), min) with C's ternary MIN/MAX, so min wins when min > max
    # (np.clip would give max) and a NaN becomes max, then max(max, min).
    xp = ctx.xp
    lo, hi = ctx.param_f32(0), ctx.param_f32(1)
    x = ctx.f32(ctx.src(0))
    x = xp.where(x < hi, x, np.float32(hi))
    ctx.store(xp.where(x > lo, x, np.float32(lo)))


@op(Op.SQR, Op.SQRT, Op.LOG, Op.SIN, Op.COS)
def simple_math(ctx):
    xp = ctx.xp
    x = ctx.f32(ctx.src(0))
    fn = {Op.SQR: xp.square, Op.SQRT: xp.sqrt, Op.LOG: xp.log, Op.SIN: xp.sin, Op.COS: xp.cos}
    ctx.store(fn[ctx.node.op](x))


@op(Op.DUP, Op.CPY, Op.CONT)
def copy(ctx):
    """Copy src0 into dst element by element in logical order, converting the type.

    Shapes may differ (ggml only requires equal element counts).
    """
    src, dst = ctx.src(0), ctx.dst
    if src.type.value == dst.type.value:
        # ggml copies the bytes (dup_bytes): no conversion, bit-exact for every type
        if src.type.is_quantized:
            src, dst = _as_bytes(src), _as_bytes(dst)
        ctx.store(ctx.raw(src).reshape(dst.shape), dst)
        return
    ctx.store(ctx.f32(src).reshape(dst.shape))


def _as_bytes(tv):
    """A quantized tensor's rows as I8 rows (blocks are packed along a row in ggml)."""
    return dataclasses.replace(tv, type=ggml.TYPES[ggml.GGMLType.I8],
                               ne=(tv.type.row_size(tv.ne[0]),) + tuple(tv.ne[1:]),
                               nb=(1,) + tuple(tv.nb[1:]))


# erf's Maclaurin coefficients 2/sqrt(pi) * (-1)^n / (n! (2n+1)), n = 0..7
_ERF_TAYLOR = tuple(2.0 / math.sqrt(math.pi) * (-1) ** n / (math.factorial(n) * (2 * n + 1))
                    for n in range(8))
# erfc(z) ~= t * exp(-z^2 + P(t)), t = 1/(1 + z/2): the Chebyshev fit of Numerical Recipes'
# erfcc, relative error < 1.2e-7 for every z >= 0
_ERFC_CHEB = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807,
              -1.13520398, 1.48851587, -0.82215223, 0.17087277)


def _erf(xp, x):
    """erf in float32 within ~3 ulp of a correctly rounded erff (array API only).

    |x| < 0.5: the Maclaurin series; otherwise 1 - erfc(|x|) from a relative-accuracy erfc
    fit, so that 1 + erf(x) in the far negative tail (GELU_ERF) keeps ggml's precision.
    """
    a = xp.abs(x)
    x2 = x * x
    series = _ERF_TAYLOR[-1]
    for c in reversed(_ERF_TAYLOR[:-1]):
        series = series * x2 + c
    z = xp.maximum(a, 0.5)
    t = 1.0 / (1.0 + 0.5 * z)
    poly = _ERFC_CHEB[-1]
    for c in reversed(_ERFC_CHEB[:-1]):
        poly = poly * t + c
    tail = xp.sign(x) * (1.0 - t * xp.exp(poly - z * z))
    return xp.where(a < 0.5, x * series, tail)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_COEF_A = 0.044715
_SQRT_2_INV = 1.0 / math.sqrt(2.0)


def _sigmoid(xp, x):
    return 1.0 / (1.0 + xp.exp(-x))


def gelu(xp, x):
    return 0.5 * x * (1.0 + xp.tanh(_SQRT_2_OVER_PI * x * (1.0 + _GELU_COEF_A * x * x)))


def gelu_erf(xp, x):
    return 0.5 * x * (1.0 + _erf(xp, x * _SQRT_2_INV))


def gelu_quick(xp, x):
    return x * _sigmoid(xp, 1.702 * x)


def silu(xp, x):
    return x * _sigmoid(xp, x)


def _f16_round(xp, x):
    return x.astype(xp.float16).astype(xp.float32)


def _via_f16_table(xp, fn, x, src_type, shortcut):
    """GELU / GELU_QUICK exactly as ggml-cpu computes them for a source of ``src_type``.

    ggml-cpu is built with GGML_GELU_FP16 and GGML_GELU_QUICK_FP16: F32 and F16 inputs go
    through a 65536-entry table indexed by the input rounded to F16, whose entries are
    ``fn`` of that F16 value rounded to F16. On the F32 path GELU (not GELU_QUICK) first
    maps x <= -10 to 0 and x >= 10 to x (``shortcut``). BF16 inputs use the formula directly.
    """
    if src_type == ggml.GGMLType.BF16:
        return fn(xp, x)
    if src_type != ggml.GGMLType.F32 or not shortcut:
        return _f16_round(xp, fn(xp, _f16_round(xp, x)))
    inner = xp.clip(x, -10.0, 10.0)  # the table is only consulted strictly inside (-10, 10)
    y = _f16_round(xp, fn(xp, _f16_round(xp, inner)))
    return xp.where(x <= -10.0, np.float32(0.0), xp.where(x >= 10.0, x, y))


def _round_half_away(xp, x):
    return xp.sign(x) * xp.floor(xp.abs(x) + 0.5)


def _softplus(xp, x):
    # ggml: x > 20 ? x : logf(1 + expf(x))  (not log1p: tiny results round to 0 as in ggml)
    return xp.where(x > 20.0, x, xp.log(1.0 + xp.exp(xp.minimum(x, 20.0))))


def _xielu(ctx, xp, x):
    alpha_n, alpha_p, beta, eps = (ctx.param_f32(i) for i in (1, 2, 3, 4))
    pos = alpha_p * x * x + beta * x
    neg = (xp.expm1(xp.minimum(x, eps)) - x) * alpha_n + beta * x
    return xp.where(x > 0, pos, neg)


UNARY = {
    UnaryOp.ABS: lambda xp, x: xp.abs(x),
    UnaryOp.SGN: lambda xp, x: xp.sign(x),
    UnaryOp.NEG: lambda xp, x: -x,
    UnaryOp.STEP: lambda xp, x: (x > 0).astype(xp.float32),
    UnaryOp.TANH: lambda xp, x: xp.tanh(x),
    UnaryOp.ELU: lambda xp, x: xp.where(x > 0, x, xp.expm1(xp.minimum(x, 0.0))),
    UnaryOp.RELU: lambda xp, x: xp.maximum(x, 0.0),
    UnaryOp.SIGMOID: _sigmoid,
    UnaryOp.GELU: gelu,
    UnaryOp.GELU_QUICK: gelu_quick,
    UnaryOp.SILU: silu,
    UnaryOp.HARDSWISH: lambda xp, x: x * xp.clip((x + 3.0) / 6.0, 0.0, 1.0),
    UnaryOp.HARDSIGMOID: lambda xp, x: xp.clip((x + 3.0) / 6.0, 0.0, 1.0),
    UnaryOp.EXP: lambda xp, x: xp.exp(x),
    UnaryOp.EXPM1: lambda xp, x: xp.exp(x) - 1.0,  # ggml's EXPM1 is expf(x) - 1, not expm1f
    UnaryOp.SOFTPLUS: _softplus,
    UnaryOp.GELU_ERF: gelu_erf,
    UnaryOp.FLOOR: lambda xp, x: xp.floor(x),
    UnaryOp.CEIL: lambda xp, x: xp.ceil(x),
    UnaryOp.ROUND: _round_half_away,
    UnaryOp.TRUNC: lambda xp, x: xp.trunc(x),
}


@op(Op.UNARY)
def unary(ctx):
    kind = ctx.param_i32(0)
    x = ctx.f32(ctx.src(0))
    if kind == UnaryOp.XIELU:
        ctx.store(_xielu(ctx, ctx.xp, x))
        return
    if kind in (UnaryOp.GELU, UnaryOp.GELU_QUICK):
        fn = gelu if kind == UnaryOp.GELU else gelu_quick
        ctx.store(_via_f16_table(ctx.xp, fn, x, ctx.src(0).type.value, kind == UnaryOp.GELU))
        return
    fn = UNARY.get(kind)
    if fn is None:
        ctx.fail(f"unknown unary op {kind}")
    ctx.store(fn(ctx.xp, x))


def _swiglu_oai(ctx, xp, x, g):
    alpha, limit = ctx.param_f32(2), ctx.param_f32(3)
    x = xp.minimum(x, limit)
    g = xp.clip(g, -limit, limit)
    return x * _sigmoid(xp, alpha * x) * (g + 1.0)


def _swiglu_clamp(ctx, xp, x, g):
    limit = ctx.param_f32(3)  # ggml_swiglu_clamp stores the limit in op_params[3] (2 is unused)
    x = xp.minimum(x, limit)
    g = xp.clip(g, -limit, limit)
    return silu(xp, x) * g


GLU = {  # GEGLU and GEGLU_QUICK are handled in glu() (they depend on the source type)
    GluOp.REGLU: lambda xp, x, g: xp.maximum(x, 0.0) * g,
    GluOp.SWIGLU: lambda xp, x, g: silu(xp, x) * g,
    GluOp.GEGLU_ERF: lambda xp, x, g: gelu_erf(xp, x) * g,
}


@op(Op.GLU)
def glu(ctx):
    """Gated linear units. One source: its rows hold [x | gate] halves (swapped: [gate | x]).
    Two sources: x = src0, gate = src1."""
    xp = ctx.xp
    kind, swapped = ctx.param_i32(0), ctx.param_i32(1)
    a = ctx.f32(ctx.src(0))
    if ctx.has_src(1):
        x, g = a, ctx.f32(ctx.src(1))
    else:
        n = ctx.dst.ne[0]
        x, g = a[..., :n], a[..., n:2 * n]
        if swapped:
            x, g = g, x
    if kind in (GluOp.GEGLU, GluOp.GEGLU_QUICK):
        # the GELU part goes through ggml's F16 table exactly like the unary op
        fn = gelu if kind == GluOp.GEGLU else gelu_quick
        ctx.store(_via_f16_table(xp, fn, x, ctx.src(0).type.value, kind == GluOp.GEGLU) * g)
    elif kind == GluOp.SWIGLU_OAI:
        ctx.store(_swiglu_oai(ctx, xp, x, g))
    elif kind == GluOp.SWIGLU_CLAMP:
        ctx.store(_swiglu_clamp(ctx, xp, x, g))
    elif kind in GLU:
        ctx.store(GLU[kind](xp, x, g))
    else:
        ctx.fail(f"unknown GLU op {kind}")
