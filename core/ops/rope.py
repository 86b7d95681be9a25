"""Rotary position embeddings: ROPE and ROPE_BACK, every mode ggml's CPU backend knows.

Layout (ggml-cpu/ops.cpp, ggml_compute_forward_rope_flt): src0 is
``[ne0 = head dim, ne1 = heads, ne2 = tokens, ne3]``, src1 the I32 positions
(one per token, indexed by dim 2; four per token for the multi-section modes:
stream ``x`` of token ``t`` is ``pos[t + x*ne2]``), src2 optional F32 frequency
factors. op_params (ggml_rope_impl): [1] n_dims, [2] mode, [4] n_ctx_orig,
[5..10] freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow
(floats), [11..14] the M-RoPE sections, [15] n_offs (first rotated channel).

Pair ``k`` (0 <= k < n_dims/2) rotates by ``theta_k`` where ggml builds
``theta`` iteratively in float32: ``theta_0 = p``, ``theta_{k+1} = theta_k *
freq_base^(-2/n_dims)``. The iteration's rounding is reproduced exactly with a
float32 cumulative product. Then ``theta /= freq_factor[k]`` and YaRN
(``rope_yarn``): ``theta = freq_scale*theta`` blended with the unscaled theta by
``ext_factor * ramp(k)`` between the correction dims, and cos/sin scaled by
``attn_factor`` (times ``1 + 0.1*ln(1/freq_scale)`` when ext_factor != 0).

Modes: NORMAL (0) rotates adjacent pairs (2k, 2k+1); NEOX (2), MROPE (8) and
IMROPE (40) rotate (k, k + n_dims/2); VISION (24) rotates (k, k + n_dims) over
the whole row (n_dims == ne0/2). Channels outside [n_offs, n_offs + n_dims)
pass through unchanged (not for VISION, which rotates everything). The
multi-section modes pick, per pair, which position stream drives theta
(sections t/h/w/e, interleaved for IMROPE); VISION restarts the power series
at each section boundary. ROPE_BACK is the inverse rotation (sin negated).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..ggml import GGMLType, Op
from . import op

MODE_NORMAL, MODE_NEOX, MODE_MROPE, MODE_VISION, MODE_IMROPE = 0, 2, 8, 24, 40
_MODES = (MODE_NORMAL, MODE_NEOX, MODE_MROPE, MODE_VISION, MODE_IMROPE)

_f32 = np.float32


def _fmax(a, b):
    """C's MAX(a, b) macro: ``a > b ? a : b`` (NaN handling included)."""
    return a if a > b else b


def _fmin(a, b):
    return a if a < b else b


def _fma(xp, a, b, c):
    """float32 ``a*b + c`` rounded once, like the fused multiply-adds ggml's compiled rope uses.

    The float32 product is exact in float64, so only the final sum rounds (twice, which
    differs from a true FMA in vanishingly rare ties).
    """
    return (xp.asarray(a, dtype=xp.float64) * xp.asarray(b, dtype=xp.float64)
            + xp.asarray(c, dtype=xp.float64)).astype(xp.float32)


def _logf(x):
    """logf, correctly rounded (as glibc's is) by way of the double logarithm."""
    with np.errstate(all="ignore"):
        return _f32(np.log(np.float64(_f32(x))))


def yarn_corr_dims(n_dims: int, n_ctx_orig: int, freq_base, beta_fast, beta_slow):
    """ggml_rope_yarn_corr_dims, in float32 like ggml."""
    def corr_dim(n_rot):
        with np.errstate(all="ignore"):
            two_pi_rot = _f32(n_rot) * _f32(2) * _f32(math.pi)
            ratio = _f32(n_ctx_orig) / two_pi_rot
            return _f32(n_dims) * _logf(ratio) / (_f32(2) * _logf(freq_base))

    with np.errstate(all="ignore"):
        start = np.floor(corr_dim(beta_fast))
        end = np.ceil(corr_dim(beta_slow))
    return _f32(_fmax(_f32(0), start)), _f32(_fmin(_f32(n_dims - 1), end))


def _pair_sources(mode: int, n_pairs: int, sections) -> tuple[list[int], list[int]]:
    """For each pair k: (position stream 0..3, number of theta_scale steps).

    Mirrors ggml_mrope_cache_init's selection (and VISION's per-section restarts)
    on plain ints; the float work is done vectorized afterwards.
    """
    if not mode & MODE_MROPE:
        return [0] * n_pairs, list(range(n_pairs))
    s0, s1, s2, s3 = sections
    sect_dims = s0 + s1 + s2 + s3
    sec_w = s0 + s1
    sec_e = sec_w + s2
    is_imrope = mode == MODE_IMROPE
    indep = mode == MODE_VISION
    steps = [0, 0, 0, 0]  # multiplications since each stream's theta was (re)set
    streams, powers = [], []
    for k in range(n_pairs):
        sector = k % sect_dims
        if indep:
            if sector == 0:
                steps[0] = 0
            elif sector == s0:
                steps[1] = 0
            elif sector == sec_w:
                steps[2] = 0
            elif sector == sec_e:
                steps[3] = 0
        if is_imrope:
            if sector % 3 == 1 and sector < 3 * s1:
                x = 1
            elif sector % 3 == 2 and sector < 3 * s2:
                x = 2
            elif sector % 3 == 0 and sector < 3 * s0:
                x = 0
            else:
                x = 3
        else:
            x = 0
            if s0 <= sector < sec_w:
                x = 1
            elif sec_w <= sector < sec_w + s2:
                x = 2
            elif sector >= sec_w + s2:
                x = 3
        streams.append(x)
        powers.append(steps[x])
        steps = [s + 1 for s in steps]
    return streams, powers


def rope_constants(n_dims: int, n_ctx_orig: int, freq_base: float, freq_scale: float,
                   ext_factor: float, attn_factor: float, beta_fast: float, beta_slow: float):
    """(theta_scale, corr_low, corr_span, mscale) as float32, rounded as ggml does.

    ``theta_scale = freq_base^(-2/n_dims)``; with YaRN (``ext_factor != 0``) the ramp runs
    from ``corr_low`` over ``corr_span = max(0.001, high - low)`` pairs and ``mscale`` is
    ``attn_factor * (1 + 0.1*ln(1/freq_scale))``; without, the correction dims are zeros
    (unused) and ``mscale`` is ``attn_factor``.
    """
    with np.errstate(all="ignore"):
        theta_scale = _f32(_f32(freq_base) ** (_f32(-2.0) / _f32(n_dims)))
        mscale = _f32(attn_factor)
        corr_low = corr_span = _f32(0)
        if ext_factor != 0.0:
            corr_low, high = yarn_corr_dims(n_dims, n_ctx_orig, freq_base, beta_fast, beta_slow)
            corr_span = _f32(_fmax(_f32(0.001), _f32(high - corr_low)))
            log_inv = _logf(_f32(1) / _f32(freq_scale))
            mscale = _f32(mscale * _fma(np, _f32(0.1), log_inv, _f32(1)))
    return theta_scale, _f32(corr_low), corr_span, mscale


def rope_cos_sin(xp, positions, n_pairs: int, *, mode: int, n_dims: int, sections, n_ctx_orig: int,
                 freq_base: float, freq_scale: float, ext_factor: float, attn_factor: float,
                 beta_fast: float, beta_slow: float, freq_factors=None, sin_sign: float = 1.0):
    """cos and sin (already scaled by mscale, sin times ``sin_sign``), shape (n_tokens, n_pairs).

    ``positions``: int array (n_streams, n_tokens) -- one stream for the plain
    modes, four for the multi-section ones.
    """
    theta_scale, low, span, mscale = rope_constants(
        n_dims, n_ctx_orig, freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow)
    streams, powers = _pair_sources(mode, n_pairs, sections)
    n_streams, n_tok = positions.shape
    pos = xp.asarray(positions).astype(xp.float32).T  # (n_tok, n_streams)
    # theta of stream x after j steps: p_x * ts * ts * ... (j times), rounded at each step
    steps = xp.full((n_tok, n_streams, n_pairs), theta_scale, dtype=xp.float32)
    steps[:, :, 0] = pos
    series = xp.cumprod(steps, axis=-1, dtype=xp.float32)
    theta = series[:, xp.asarray(np.array(streams, dtype=np.int64)),
                   xp.asarray(np.array(powers, dtype=np.int64))]
    if freq_factors is not None:
        theta = theta / freq_factors[:n_pairs].astype(xp.float32)

    theta_interp = theta * _f32(freq_scale)
    if ext_factor != 0.0:
        with np.errstate(all="ignore"):
            y = (np.arange(n_pairs, dtype=np.float32) - low) / span
            y = np.where(_f32(0) > y, _f32(0), y)
            y = np.where(_f32(1) < y, _f32(1), y)
            ramp_mix = ((_f32(1) - y) * _f32(ext_factor)).astype(np.float32)
        ramp_mix = xp.asarray(ramp_mix)
        theta = _fma(xp, theta_interp, 1 - ramp_mix, theta * ramp_mix)
    else:
        theta = theta_interp
    theta64 = theta.astype(xp.float64)  # cos/sin rounded from double: glibc's cosf/sinf to an ulp
    cos = xp.cos(theta64).astype(xp.float32) * mscale
    sin = xp.sin(theta64).astype(xp.float32) * mscale
    if sin_sign < 0:
        sin = -sin
    return cos, sin


def rope_params_problem(ne0: int, n_dims: int, mode: int, n_offs: int, sections) -> str | None:
    """What is wrong with these rope parameters for rows of ``ne0`` channels, or None."""
    if mode not in _MODES:
        return f"rope mode {mode} is not supported"
    if n_dims <= 0 or n_dims % 2 or n_dims > ne0:
        return f"rope n_dims {n_dims} must be even and within (0, {ne0}]"
    if n_offs < 0 or n_offs % 2 or n_offs + n_dims > ne0:
        return f"rope n_offs {n_offs} must be even with n_offs + n_dims <= {ne0}"
    if mode & MODE_MROPE and not any(s > 0 for s in sections[:3]):
        return "multi-section rope needs a positive section"
    if mode & MODE_MROPE and (min(sections) < 0 or sum(sections) > ne0):
        return f"bad rope sections {sections}"
    if mode == MODE_VISION and (2 * n_dims != ne0 or n_offs != 0):
        return "vision rope needs n_dims == ne0/2 and no offset"
    return None


@dataclass(frozen=True)
class _RopeNode:
    """What a ROPE node's parameters and shapes decide, worked out once per plan."""

    n_streams: int
    n_pairs: int
    params: dict
    key: tuple  # the cos/sin memo key, but the positions and frequency factors
    first: slice
    second: slice


def _rope_node(ctx) -> _RopeNode:
    src, pos_view, dst = ctx.src(0), ctx.src(1), ctx.dst
    if src.type.value not in (GGMLType.F32, GGMLType.F16) or dst.type.value != src.type.value:
        ctx.fail("ROPE needs F32 or F16 data (and a result of the same type)")
    if pos_view is None or pos_view.type.value != GGMLType.I32:
        ctx.fail("ROPE needs I32 positions")
    ne0 = src.ne[0]
    n_dims, mode, n_ctx_orig = ctx.param_i32(1), ctx.param_i32(2), ctx.param_i32(4)
    freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow = (
        ctx.param_f32(i) for i in range(5, 11))
    sections = [ctx.param_i32(i) for i in range(11, 15)]
    n_offs = ctx.param_i32(15)
    problem = rope_params_problem(ne0, n_dims, mode, n_offs, sections)
    if problem:
        ctx.fail(problem)
    if ctx.has_src(2) and ctx.src(2).type.value != GGMLType.F32:
        ctx.fail("rope frequency factors must be F32")
    n_pairs = ne0 // 2 if mode == MODE_VISION else n_dims // 2
    params = dict(mode=mode, n_dims=n_dims, sections=tuple(sections), n_ctx_orig=n_ctx_orig,
                  freq_base=freq_base, freq_scale=freq_scale, ext_factor=ext_factor,
                  attn_factor=attn_factor, beta_fast=beta_fast, beta_slow=beta_slow,
                  sin_sign=-1.0 if ctx.node.op == Op.ROPE_BACK else 1.0)
    if mode == MODE_NORMAL:
        first = slice(n_offs, n_offs + n_dims, 2)
        second = slice(n_offs + 1, n_offs + n_dims, 2)
    else:
        half = n_dims if mode == MODE_VISION else n_dims // 2
        first = slice(n_offs, n_offs + n_pairs)
        second = slice(n_offs + half, n_offs + half + n_pairs)
    key = ("rope_cos_sin", id(ctx.xp), n_pairs, tuple(sorted(params.items())))
    return _RopeNode(4 if mode & MODE_MROPE else 1, n_pairs, params, key, first, second)


@dataclass(frozen=True)
class RopeTables:
    """A ROPE node's rotation, worked out from its parameters and the step's positions:
    pair ``k`` is channels ``first[k]`` and ``second[k]`` of every row (``first``/``second``:
    slices of the row), rotated by ``cos[t, k]``/``sin[t, k]`` for token ``t`` (float32,
    shape (tokens, pairs), already scaled by YaRN's mscale, sin negated for ROPE_BACK)."""

    first: slice
    second: slice
    cos: object
    sin: object


def rope_tables(ctx) -> RopeTables:
    """The :class:`RopeTables` of the ROPE or ROPE_BACK node of ``ctx`` (checks its
    parameters and sources; cos/sin are remembered for the other layers of the step)."""
    node = ctx.prepared(_rope_node)
    ne2 = ctx.src(0).ne[2]
    pos = ctx.raw(ctx.src(1)).reshape(-1)
    if pos.shape[0] < node.n_streams * ne2:
        ctx.fail(f"rope needs {node.n_streams * ne2} positions, got {pos.shape[0]}")
    positions = pos[:node.n_streams * ne2].reshape(node.n_streams, ne2)

    freq_factors = None
    if ctx.has_src(2):
        freq_factors = ctx.f32(ctx.src(2)).reshape(-1)
        if freq_factors.shape[0] < node.n_pairs:
            ctx.fail(f"rope needs {node.n_pairs} frequency factors, got {freq_factors.shape[0]}")

    # every layer of a step rotates by the same positions: computed once, remembered
    key = node.key + (ctx.lib.to_numpy(positions).tobytes(),
                      None if freq_factors is None
                      else ctx.lib.to_numpy(freq_factors[:node.n_pairs]).tobytes())
    cos, sin = ctx.state.memo(key, lambda: rope_cos_sin(
        ctx.xp, positions, node.n_pairs, freq_factors=freq_factors, **node.params))
    return RopeTables(node.first, node.second, cos, sin)


@op(Op.ROPE, Op.ROPE_BACK)
def rope(ctx):
    xp = ctx.xp
    t = rope_tables(ctx)
    cos = t.cos[None, :, None, :]  # (1, ne2, 1, n_pairs): one row of factors per token
    sin = t.sin[None, :, None, :]

    x = ctx.f32(ctx.src(0))
    out = xp.array(x, dtype=xp.float32, copy=True)
    x0, x1 = x[..., t.first], x[..., t.second]
    # ggml's build contracts these into FMAs: x0*cos - x1*sin and x0*sin + x1*cos, the
    # second product rounded first
    out[..., t.first] = _fma(xp, x0, cos, -(x1 * sin))
    out[..., t.second] = _fma(xp, x0, sin, x1 * cos)
    ctx.store(out)  # F16: untouched channels keep their bits (f16 -> f32 -> f16 is exact)
