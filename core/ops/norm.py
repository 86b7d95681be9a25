"""Row normalisations and reductions: NORM, RMS_NORM, L2_NORM, SUM_ROWS, MEAN, SUM."""

from __future__ import annotations

from ..ggml import Op
from . import op


@op(Op.RMS_NORM)
def rms_norm(ctx):
    xp = ctx.xp
    x = ctx.f32(ctx.src(0))
    eps = ctx.param_f32(0)
    # the mean as sum / n: xp.mean computes the same, with more Python around it
    ctx.store(x / xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True) / x.shape[-1] + eps))


@op(Op.NORM)
def norm(ctx):
    xp = ctx.xp
    x = ctx.f32(ctx.src(0))
    eps = ctx.param_f32(0)
    centered = x - xp.mean(x, axis=-1, keepdims=True)
    ctx.store(centered / xp.sqrt(xp.mean(centered * centered, axis=-1, keepdims=True) + eps))


@op(Op.L2_NORM)
def l2_norm(ctx):
    xp = ctx.xp
    x = ctx.f32(ctx.src(0))
    eps = ctx.param_f32(0)
    ctx.store(x / xp.maximum(xp.sqrt(xp.sum(x * x, axis=-1, keepdims=True)), eps))


@op(Op.SUM_ROWS)
def sum_rows(ctx):
    ctx.store(ctx.xp.sum(ctx.f32(ctx.src(0)), axis=-1, keepdims=True))


@op(Op.MEAN)
def mean(ctx):
    ctx.store(ctx.xp.mean(ctx.f32(ctx.src(0)), axis=-1, keepdims=True))


@op(Op.SUM)
def total(ctx):
    ctx.store(ctx.xp.sum(ctx.f32(ctx.src(0))).reshape(1, 1, 1, 1))
