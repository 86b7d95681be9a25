"""Element-wise ops: binary arithmetic with ggml broadcasting, SCALE, CLAMP, unary and GLU ops, copies."""

from __future__ import annotations

import math

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
    ctx.store(ctx.xp.clip(ctx.f32(ctx.src(0)), ctx.param_f32(0), ctx.param_f32(1)))


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
    if src.type.value == dst.type.value and not src.type.is_quantized:
        values = ctx.raw(src)  # bit-exact for every plain type, including integers and BF16
    else:
        values = ctx.f32(src)
    ctx.store(values.reshape(dst.shape))


def _erf(xp, x):
    # Abramowitz & Stegun 7.1.26 refined (max abs error 1.5e-7), array-API only.
    sign = xp.sign(x)
    a = xp.abs(x)
    t = 1.0 / (1.0 + 0.3275911 * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return sign * (1.0 - poly * xp.exp(-a * a))


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


def _round_half_away(xp, x):
    return xp.sign(x) * xp.floor(xp.abs(x) + 0.5)


def _softplus(xp, x):
    # ggml: x > 20 ? x : log1p(exp(x))
    return xp.where(x > 20.0, x, xp.log1p(xp.exp(xp.minimum(x, 20.0))))


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
    UnaryOp.EXPM1: lambda xp, x: xp.expm1(x),
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
    limit = ctx.param_f32(2)
    x = xp.minimum(x, limit)
    g = xp.clip(g, -limit, limit)
    return silu(xp, x) * g


GLU = {
    GluOp.REGLU: lambda xp, x, g: xp.maximum(x, 0.0) * g,
    GluOp.GEGLU: lambda xp, x, g: gelu(xp, x) * g,
    GluOp.SWIGLU: lambda xp, x, g: silu(xp, x) * g,
    GluOp.GEGLU_ERF: lambda xp, x, g: gelu_erf(xp, x) * g,
    GluOp.GEGLU_QUICK: lambda xp, x, g: gelu_quick(xp, x) * g,
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
    if kind == GluOp.SWIGLU_OAI:
        ctx.store(_swiglu_oai(ctx, xp, x, g))
    elif kind == GluOp.SWIGLU_CLAMP:
        ctx.store(_swiglu_clamp(ctx, xp, x, g))
    elif kind in GLU:
        ctx.store(GLU[kind](xp, x, g))
    else:
        ctx.fail(f"unknown GLU op {kind}")
