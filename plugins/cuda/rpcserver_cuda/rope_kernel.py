"""ROPE / ROPE_BACK kernel: every mode of the shared implementation, F32 and F16 rows.

What it computes is ggml's rope (see :mod:`rpcserver.ops.rope` for the modes and
parameters), with the shared code's float32 rounding: for pair ``k`` of token ``t``

* ``theta = p`` (the position of the pair's stream, as float) multiplied ``power``
  times by ``theta_scale = freq_base^(-2/n_dims)``, one rounding per step, as
  ggml's CPU loop builds it (``power`` is ``k`` except for VISION, whose series
  restarts at each section);
* ``theta /= freq_factors[k]`` (when given), then YaRN: ``theta_interp = theta *
  freq_scale`` and, when ``ext_factor != 0``, ``fmaf(theta_interp, 1 - ramp_mix,
  theta * ramp_mix)`` with ``ramp_mix = (1 - clamp((k - low) / max(0.001, high -
  low), 0, 1)) * ext_factor``;
* ``cos``/``sin`` of theta evaluated in double and rounded to float (what glibc's
  cosf/sinf give to the ulp), times ``mscale``; ROPE_BACK negates the sine;
* ``y0 = fmaf(x0, cos, -(x1*sin))`` and ``y1 = fmaf(x0, sin, x1*cos)``.

Host-side constants (``theta_scale``, the YaRN correction dims, ``mscale``) come
from the launcher: the shared code's own ``rope_constants``.

Launch geometry: a 1-D grid of ``ne2 * n_groups`` blocks. Block ``b`` serves
token ``b % ne2`` and the rows ``(i1, i3)`` numbered ``b / ne2``, ``+ n_groups``,
... of that token (rows are numbered ``i1 + ne1*i3``). Its threads stride over the
pairs: each computes its pair's cos/sin once and rotates that pair in every row
of the group, then the threads stride over the channels outside the rotated range
and copy them (skipped when the op is in place).
"""

from __future__ import annotations

import numpy as np

from rpcserver.api import GGMLType, Op
from rpcserver.ops import rope as shared_rope

from .kernels import PRELUDE

MODULE = "rope"
#: the kernel for each data type (src and dst have the same type)
ROPE_KERNELS = {"F32": "rpc_rope_f32", "F16": "rpc_rope_f16"}
#: the ``extern "C"`` kernels the module defines
KERNEL_NAMES: tuple[str, ...] = tuple(ROPE_KERNELS.values())

#: at most this many threads per block (fewer when the rows have fewer pairs)
ROPE_MAX_THREADS = 256
#: about this many rows (heads) share one block, and so one evaluation of each cos/sin
ROPE_ROWS_PER_BLOCK = 8

_MAX_DIM = 2**31 - 1
_MAX_GRID = 2**31 - 1

_MODE_NORMAL = shared_rope.MODE_NORMAL
_MODE_MROPE = shared_rope.MODE_MROPE
_MODE_VISION = shared_rope.MODE_VISION

_DEVICE_FUNCTIONS = r"""
// a*b rounded on its own (never fused into a following add: the shared code rounds it)
__device__ __forceinline__ float rpc_rope_mul_rn(const float a, const float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

// Which position stream (0..3) drives pair k, and how many theta_scale steps its theta
// has had (ggml_mrope_cache_init's selection; one stream and power k for the plain modes).
__device__ __forceinline__ int rpc_rope_pair_source(const int k, const int mode, const int s0,
        const int s1, const int s2, const int s3, int * power) {
    *power = k;
    if (!(mode & 8)) return 0;
    const int sect_dims = s0 + s1 + s2 + s3;
    const int sec_w = s0 + s1;
    const int sec_e = sec_w + s2;
    const int sector = k % sect_dims;
    int x;
    if (mode == 40) {  // IMROPE: sections interleaved t, h, w, t, h, w, ...
        if (sector % 3 == 1 && sector < 3 * s1) x = 1;
        else if (sector % 3 == 2 && sector < 3 * s2) x = 2;
        else if (sector % 3 == 0 && sector < 3 * s0) x = 0;
        else x = 3;
    } else {
        x = 0;
        if (sector >= s0 && sector < sec_w) x = 1;
        else if (sector >= sec_w && sector < sec_e) x = 2;
        else if (sector >= sec_e) x = 3;
    }
    if (mode == 24) {
        // VISION restarts stream x's series where its section starts: power = steps since
        // the last pair j <= k whose sector reset x (an if/else-if chain in ggml: one reset
        // per pair, the first condition that holds)
        for (int j = k; j >= 0; --j) {
            const int sj = j % sect_dims;
            const int reset = sj == 0 ? 0 : sj == s0 ? 1 : sj == sec_w ? 2 : sj == sec_e ? 3 : -1;
            if (reset == x) {
                *power = k - j;
                break;
            }
        }
    }
    return x;
}

// cos and sin (times mscale; sin negated for ROPE_BACK) of pair k's angle for positions p
// (stream x of the token at p[x * pos_stride]).
__device__ __forceinline__ void rpc_rope_cos_sin(const int k, const int * p,
        const long long pos_stride, const float * freq_factors, const int mode, const int s0,
        const int s1, const int s2, const int s3, const float theta_scale, const float freq_scale,
        const float ext_factor, const float corr_low, const float corr_span, const float mscale,
        const int backward, float * c, float * s) {
    int power;
    const int stream = rpc_rope_pair_source(k, mode, s0, s1, s2, s3, &power);
    float theta = (float)p[stream * pos_stride];
    for (int i = 0; i < power; ++i) theta = rpc_rope_mul_rn(theta, theta_scale);
    if (freq_factors) theta = theta / freq_factors[k];
    const float theta_interp = rpc_rope_mul_rn(theta, freq_scale);
    float angle = theta_interp;
    if (ext_factor != 0.0f) {
        float y = ((float)k - corr_low) / corr_span;
        y = 0.0f > y ? 0.0f : y;
        y = 1.0f < y ? 1.0f : y;
        const float ramp_mix = rpc_rope_mul_rn(1.0f - y, ext_factor);
        angle = fmaf(theta_interp, 1.0f - ramp_mix, rpc_rope_mul_rn(theta, ramp_mix));
    }
    const double a = (double)angle;
    const float cv = rpc_rope_mul_rn((float)cos(a), mscale);
    const float sv = rpc_rope_mul_rn((float)sin(a), mscale);
    *c = cv;
    *s = backward ? -sv : sv;
}
"""


def _kernel_source(name: str, ctype: str, load: str, store: str) -> str:
    return f"""
// ggml ROPE / ROPE_BACK over rows of {ctype} (ne0 elements contiguous; rows at byte strides
// nb1..nb3 of src and dst): pair k of a row is channels (n_offs + k*pair_step,
// n_offs + k*pair_step + pair_gap), k < n_pairs; the channels outside
// [n_offs, n_offs + 2*n_pairs) are copied unless copy_rest == 0 (in place).
// pos: I32, stream x of token i2 at pos[i2 + x*ne2]; freq_factors: F32 per pair, or null.
// Grid: ne2 * n_groups blocks (token = blockIdx.x % ne2, rows blockIdx.x / ne2 + j*n_groups).
extern "C" __global__ void {name}(const char * src, const long long sb1, const long long sb2,
        const long long sb3, char * dst, const long long db1, const long long db2,
        const long long db3, const int * __restrict__ pos, const float * __restrict__ freq_factors,
        const int ne0, const int ne1, const int ne2, const int ne3, const int n_groups,
        const int n_pairs, const int n_offs, const int pair_step, const int pair_gap,
        const int mode, const int s0, const int s1, const int s2, const int s3,
        const float theta_scale, const float freq_scale, const float ext_factor,
        const float corr_low, const float corr_span, const float mscale, const int backward,
        const int copy_rest) {{
    const int i2 = (int)(blockIdx.x % (unsigned int)ne2);
    const long long group = blockIdx.x / (unsigned int)ne2;
    const long long n_rows = (long long)ne1 * ne3;
    const long long tok_src = i2 * sb2, tok_dst = i2 * db2;
    for (int k = threadIdx.x; k < n_pairs; k += blockDim.x) {{
        float c, s;
        rpc_rope_cos_sin(k, pos + i2, ne2, freq_factors, mode, s0, s1, s2, s3, theta_scale,
                         freq_scale, ext_factor, corr_low, corr_span, mscale, backward, &c, &s);
        const long long ch0 = n_offs + (long long)k * pair_step, ch1 = ch0 + pair_gap;
        for (long long r = group; r < n_rows; r += n_groups) {{
            const long long i1 = r % ne1, i3 = r / ne1;
            const {ctype} * x = (const {ctype} *)(src + tok_src + i1 * sb1 + i3 * sb3);
            {ctype} * y = ({ctype} *)(dst + tok_dst + i1 * db1 + i3 * db3);
            const float x0 = {load.format(v="x[ch0]")}, x1 = {load.format(v="x[ch1]")};
            const float y0 = fmaf(x0, c, -rpc_rope_mul_rn(x1, s));
            const float y1 = fmaf(x0, s, rpc_rope_mul_rn(x1, c));
            y[ch0] = {store.format(v="y0")};
            y[ch1] = {store.format(v="y1")};
        }}
    }}
    if (!copy_rest) return;
    const int n_rest = ne0 - 2 * n_pairs;
    for (int j = threadIdx.x; j < n_rest; j += blockDim.x) {{
        const long long ch = j < n_offs ? j : j + 2 * n_pairs;
        for (long long r = group; r < n_rows; r += n_groups) {{
            const long long i1 = r % ne1, i3 = r / ne1;
            const {ctype} * x = (const {ctype} *)(src + tok_src + i1 * sb1 + i3 * sb3);
            {ctype} * y = ({ctype} *)(dst + tok_dst + i1 * db1 + i3 * db3);
            y[ch] = x[ch];
        }}
    }}
}}
"""


def rope_source() -> str:
    """The CUDA module: the prelude, the shared device functions and one kernel per type."""
    return (PRELUDE + _DEVICE_FUNCTIONS
            + _kernel_source(ROPE_KERNELS["F32"], "float", "{v}", "{v}")
            + _kernel_source(ROPE_KERNELS["F16"], "unsigned short", "rpc_h2f({v})",
                             "rpc_f2h({v})"))


def _rows_ok(tv, size: int) -> bool:
    return (tv is not None and tv.buffer is not None and tv.nb[0] == size
            and all(0 <= n <= _MAX_DIM for n in tv.ne))


def rope(ctx) -> bool:
    """ROPE / ROPE_BACK with the kernel of the data type; False (the shared code runs and
    reports what is wrong) for other types, nb0 != element size, sizes of 2**31 or more,
    or parameters the shared code rejects."""
    from . import ops

    src, pos_view, dst = ctx.src(0), ctx.src(1), ctx.dst
    type_name = {GGMLType.F32: "F32", GGMLType.F16: "F16"}.get(src.type.value) if src else None
    if type_name is None or dst.type.value != src.type.value:
        return False
    size = src.type.type_size
    if not (_rows_ok(src, size) and _rows_ok(dst, size)) or tuple(src.ne) != tuple(dst.ne):
        return False
    if pos_view is None or pos_view.buffer is None or pos_view.type.value != GGMLType.I32:
        return False
    ne0, ne1, ne2, ne3 = (int(n) for n in src.ne)
    n_dims, mode, n_ctx_orig = ctx.param_i32(1), ctx.param_i32(2), ctx.param_i32(4)
    freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow = (
        ctx.param_f32(i) for i in range(5, 11))
    sections = [ctx.param_i32(i) for i in range(11, 15)]
    n_offs = ctx.param_i32(15)

    if shared_rope.rope_params_problem(ne0, n_dims, mode, n_offs, sections):
        return False  # the shared code reports it
    multi = bool(mode & _MODE_MROPE)

    n_streams = 4 if multi else 1
    n_pairs = ne0 // 2 if mode == _MODE_VISION else n_dims // 2
    if mode == _MODE_NORMAL:
        pair_step, pair_gap = 2, 1
    else:
        pair_step, pair_gap = 1, (n_dims if mode == _MODE_VISION else n_dims // 2)

    xp = ctx.xp
    positions = ctx.raw(pos_view).reshape(-1)
    if positions.shape[0] < n_streams * ne2:
        return False
    positions = xp.ascontiguousarray(positions[:n_streams * ne2])
    freq_factors = np.uint64(0)
    if ctx.has_src(2):
        ff_view = ctx.src(2)
        if ff_view is None or ff_view.buffer is None or ff_view.type.value != GGMLType.F32:
            return False
        ff = ctx.f32(ff_view).reshape(-1)
        if ff.shape[0] < n_pairs:
            return False
        freq_factors = xp.ascontiguousarray(ff[:n_pairs], dtype=xp.float32)

    kern = ops._get_kernel(ctx, "rope", MODULE, ROPE_KERNELS[type_name])
    if kern is None:
        return False
    theta_scale, corr_low, corr_span, mscale = shared_rope.rope_constants(
        n_dims, n_ctx_orig, freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow)

    n_rows = ne1 * ne3
    if ne0 == 0 or n_rows == 0 or ne2 == 0:
        return True
    n_groups = max(1, min(-(-n_rows // ROPE_ROWS_PER_BLOCK), _MAX_GRID // ne2, _MAX_DIM))
    busiest = max(n_pairs, ne0 - 2 * n_pairs, 1)
    threads = min(ROPE_MAX_THREADS, -(-busiest // 32) * 32)
    in_place = (src.buffer is dst.buffer and src.offset == dst.offset
                and tuple(src.nb) == tuple(dst.nb))
    i32, i64, f32 = np.int32, np.int64, np.float32
    kern((ne2 * n_groups,), (threads,), (
        ops._ptr_array(src), i64(src.nb[1]), i64(src.nb[2]), i64(src.nb[3]),
        ops._ptr_array(dst), i64(dst.nb[1]), i64(dst.nb[2]), i64(dst.nb[3]),
        positions, freq_factors,
        i32(ne0), i32(ne1), i32(ne2), i32(ne3), i32(n_groups),
        i32(n_pairs), i32(n_offs), i32(pair_step), i32(pair_gap),
        i32(mode), *(i32(s) for s in sections),
        theta_scale, f32(freq_scale), f32(ext_factor), corr_low, corr_span, mscale,
        i32(ctx.node.op == Op.ROPE_BACK), i32(0 if in_place else 1)))
    return True
