"""CUDA C sources of the plugin's kernels, generated from data. Pure Python: no GPU, no CuPy.

* :data:`QUANT_SPECS` -- for each ggml block type with a GPU dequantizer, its
  block size, byte size and the value of element ``J`` of a block, written
  with :mod:`rpcserver_cuda.qdsl` from the block layouts in ggml's
  ``ggml-common.h`` and the element order of its ``dequantize_row_*``.
* :func:`quant_source` -- one CUDA module per type: the element function,
  ``rpc_dequantize_<T>`` (one thread per element, any number of blocks) and
  ``rpc_mul_mat_vec_<T>`` (a matrix of such blocks times up to
  :data:`MMV_MAX_COLS` float32 vectors, dequantizing on the fly).
* :func:`norm_source` -- RMS_NORM and SOFT_MAX row kernels.

Kernel names and signatures are constants here so the launching code
(:mod:`rpcserver_cuda.ops`) and the tests agree on them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .qdsl import (FUNCTIONS, J, Expr, call, collect, emit_device_function, f16, i8, select, table,
                   to_float, u8, u16)

QK_K = 256

#: ggml's non-linear 4-bit codebook (IQ4_NL, IQ4_XS)
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
#: E2M1 values, doubled (MXFP4, NVFP4): the scale functions return half the scale
KVALUES_FP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


@dataclass(frozen=True)
class QuantSpec:
    name: str          # ggml type name, as in rpcserver.ggml.TYPES
    value: int         # enum ggml_type
    block_size: int    # elements per block (QK)
    type_size: int     # bytes per block
    element: Expr      # value of element J of a block

    @property
    def ident(self) -> str:
        return self.name.lower()

    @property
    def dequantize_kernel(self) -> str:
        return f"rpc_dequantize_{self.ident}"

    @property
    def mul_mat_vec_kernel(self) -> str:
        return f"rpc_mul_mat_vec_{self.ident}"

    @property
    def element_function(self) -> str:
        return f"rpc_deq_{self.ident}"


def _nibble(base: int, j: Expr, half: int) -> Expr:
    """Element ``j`` of a 4-bit array stored as ``half`` bytes whose low nibbles hold elements
    [0, half) and high nibbles [half, 2*half) (the layout of every 32-element 4-bit type)."""
    return (u8(base + j % half) >> (4 * (j // half))) & 0xF


def _q4_0():
    return (_nibble(2, J, 16) - 8) * f16(0)


def _q4_1():
    return _nibble(4, J, 16) * f16(0) + f16(2)


def _q5_high(qh_base: int) -> Expr:
    return (u8(qh_base + J // 8) >> (J % 8)) & 1  # bit J of the 32-bit qh


def _q5_0():
    return ((_nibble(6, J, 16) | (_q5_high(2) << 4)) - 16) * f16(0)


def _q5_1():
    return (_nibble(8, J, 16) | (_q5_high(4) << 4)) * f16(0) + f16(2)


def _q8_0():
    return i8(2 + J) * f16(0)


def _iq4_nl():
    return f16(0) * table("rpc_kvalues_iq4nl", KVALUES_IQ4NL, _nibble(2, J, 16))


def _mxfp4():
    return table("rpc_kvalues_fp4", KVALUES_FP4, _nibble(1, J, 16)) * call("rpc_e8m0_half", u8(0))


def _nvfp4():
    # 4 sub-blocks of 16: scale byte s, then 8 bytes of nibbles per sub-block
    s, jj = J // 16, J % 16
    q = (u8(4 + s * 8 + jj % 8) >> (4 * (jj // 8))) & 0xF
    return table("rpc_kvalues_fp4", KVALUES_FP4, q) * call("rpc_ue4m3_half", u8(s))


def _q1_0():
    bit = (u8(2 + J // 8) >> (J % 8)) & 1
    d = f16(0)
    return select(bit, d, -d)


def _q2_0():
    q = (u8(2 + J // 4) >> (2 * (J % 4))) & 3
    return (q - 1) * f16(0)


def _tq2_0():
    # qs[64] then d; element e: 32-byte chunk e/128, 2-bit lane (e%128)/32, byte e%32
    q = (u8((J // 128) * 32 + J % 32) >> (2 * ((J % 128) // 32))) & 3
    return (q - 1) * f16(64)


def _tq1_trit(byte: Expr, n: Expr) -> Expr:
    """The n-th base-3 digit of a TQ1_0 byte, ggml's way: (uint8)(byte * 3**n) * 3 >> 8."""
    pow3 = select(n.eq(0), 1, select(n.eq(1), 3, select(n.eq(2), 9, select(n.eq(3), 27,
                                                                          select(n.eq(4), 81, 243)))))
    return ((((byte * pow3) & 0xFF) * 3) >> 8) - 1


def _tq1_0():
    # qs[48], qh[4], d. Elements 0..159: qs[0..31] x 5 digits; 160..239: qs[32..47] x 5;
    # 240..255: qh[0..3] x 4.
    # (every branch is evaluated, so each must stay inside the block for any J)
    first = J < 160
    second = J < 240
    byte = select(first, u8(J % 32), select(second, u8(32 + J % 16), u8(48 + J % 4)))
    n = select(first, J // 32, select(second, J // 16 - 10, J // 4 - 60))
    return _tq1_trit(byte, n) * f16(52)


def _q2_k():
    # scales[16], qs[64], d, dmin. 16 groups of 16; group e/16 has one 4-bit scale and min.
    sc = u8(J // 16)
    q = (u8(16 + (J // 128) * 32 + J % 32) >> (2 * ((J % 128) // 32))) & 3
    dl = f16(80) * (sc & 0xF)
    ml = f16(82) * (sc >> 4)
    return dl * q - ml


def _q3_k():
    # hmask[32], qs[64], scales[12] (16 x 6 bits), d
    g = J // 16
    low = select(g < 8, u8(96 + g % 8) & 0xF, u8(96 + g % 8) >> 4)
    high = (u8(104 + g % 4) >> (2 * (g // 4))) & 3
    scale = (low | (high << 4)) - 32
    n, jj, k = J // 128, (J % 128) // 32, J % 32
    q = (u8(32 + n * 32 + k) >> (2 * jj)) & 3
    hbit = (u8(k) >> (n * 4 + jj)) & 1
    dl = f16(108) * scale
    return dl * (q - select(hbit, 0, 4))


def _k4_scale_min(scales_base: int, idx: Expr):
    """(scale, min) of 32-element group ``idx`` (0..7) from the 12 packed bytes of Q4_K/Q5_K."""
    lo = idx < 4
    sc = select(lo, u8(scales_base + idx % 4) & 63,
                (u8(scales_base + 4 + idx % 8) & 0xF) | ((u8(scales_base + (idx + 4) % 8) >> 6) << 4))
    m = select(lo, u8(scales_base + 4 + idx % 4) & 63,
               (u8(scales_base + 4 + idx % 8) >> 4) | ((u8(scales_base + idx % 8) >> 6) << 4))
    return sc, m


def _q4_k():
    # d, dmin, scales[12], qs[128]; 4 chunks of 64 = 32 low nibbles then 32 high nibbles
    sc, m = _k4_scale_min(4, J // 32)
    q = (u8(16 + (J // 64) * 32 + J % 32) >> (4 * ((J % 64) // 32))) & 0xF
    return (f16(0) * sc) * q - f16(2) * m


def _q5_k():
    # d, dmin, scales[12], qh[32], qs[128]
    sc, m = _k4_scale_min(4, J // 32)
    g = J // 32
    low = (u8(48 + (J // 64) * 32 + J % 32) >> (4 * (g % 2))) & 0xF
    high = (u8(16 + J % 32) >> g) & 1
    return (f16(0) * sc) * (low + high * 16) - f16(2) * m


def _q6_k():
    # ql[128], qh[64], scales[16] (int8), d
    n, r = J // 128, J % 128
    g, l = r // 32, r % 32
    low = (u8(n * 64 + l + 32 * (g % 2)) >> (4 * (g // 2))) & 0xF
    high = (u8(128 + n * 32 + l) >> (2 * g)) & 3
    q = (low | (high << 4)) - 32
    sc = i8(192 + n * 8 + l // 16 + 2 * g)
    return (f16(208) * sc) * q


def _iq4_xs():
    # d, scales_h (u16), scales_l[4], qs[128]; 8 groups of 32 with 6-bit scales
    ib = J // 32
    ls = ((u8(4 + ib // 2) >> (4 * (ib % 2))) & 0xF) | (((u16(2) >> (2 * ib)) & 3) << 4)
    r = J % 32
    q = (u8(8 + ib * 16 + r % 16) >> (4 * (r // 16))) & 0xF
    return (f16(0) * (ls - 32)) * table("rpc_kvalues_iq4nl", KVALUES_IQ4NL, q)


def _spec(name, value, qk, size, fn):
    return QuantSpec(name, value, qk, size, to_float(fn()))


#: type name -> spec, for every block type dequantized by a kernel of its own
QUANT_SPECS: dict[str, QuantSpec] = {s.name: s for s in [
    _spec("Q4_0", 2, 32, 18, _q4_0),
    _spec("Q4_1", 3, 32, 20, _q4_1),
    _spec("Q5_0", 6, 32, 22, _q5_0),
    _spec("Q5_1", 7, 32, 24, _q5_1),
    _spec("Q8_0", 8, 32, 34, _q8_0),
    _spec("Q2_K", 10, QK_K, 84, _q2_k),
    _spec("Q3_K", 11, QK_K, 110, _q3_k),
    _spec("Q4_K", 12, QK_K, 144, _q4_k),
    _spec("Q5_K", 13, QK_K, 176, _q5_k),
    _spec("Q6_K", 14, QK_K, 210, _q6_k),
    _spec("IQ4_NL", 20, 32, 18, _iq4_nl),
    _spec("IQ4_XS", 23, QK_K, 136, _iq4_xs),
    _spec("TQ1_0", 34, QK_K, 54, _tq1_0),
    _spec("TQ2_0", 35, QK_K, 66, _tq2_0),
    _spec("MXFP4", 39, 32, 17, _mxfp4),
    _spec("NVFP4", 40, 64, 36, _nvfp4),
    _spec("Q1_0", 41, 128, 18, _q1_0),
    _spec("Q2_0", 42, 64, 18, _q2_0),
]}

QUANT_SPECS_BY_VALUE: dict[int, QuantSpec] = {s.value: s for s in QUANT_SPECS.values()}

#: threads per block of the element-wise dequantization kernel
DEQUANT_THREADS = 256
#: the fused matrix-vector kernel: one thread block per weight row, this many threads
MMV_THREADS = 256
#: ... and at most this many vectors (columns of src1) per launch
MMV_MAX_COLS = 8

PRELUDE = """\
// Generated by rpcserver_cuda.kernels -- do not edit; change the generator instead.
// Device code for NVRTC; it also compiles as host C++ under the tests' CUDA emulation
// (tests/cuda_host.h), which is why the PTX below sits behind __CUDA_ARCH__.
#define RPC_NEG_INF __int_as_float(0xff800000)
// IEEE half (as its 16 bits) -> float
__device__ __forceinline__ float rpc_h2f(const unsigned short h) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
#else
    const unsigned int sign = (unsigned int)(h & 0x8000u) << 16;
    const unsigned int e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1fu) return __int_as_float((int)(sign | 0x7f800000u | (m << 13)));
    if (e != 0) return __int_as_float((int)(sign | ((e + 112u) << 23) | (m << 13)));
    const float sub = (float)m * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return sign ? -sub : sub;
#endif
}
// float -> IEEE half bits, rounded to nearest even (what ggml's F16 stores do)
__device__ __forceinline__ unsigned short rpc_f2h(const float f) {
#ifdef __CUDA_ARCH__
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
#else
    const unsigned int x = (unsigned int)__float_as_int(f);
    const unsigned int sign = (x >> 16) & 0x8000u;
    const unsigned int ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (unsigned short)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    if (ax >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // rounds past 65504
    if (ax < 0x38800000u) {  // below 2^-14: a subnormal half (or zero)
        const float scaled = __int_as_float((int)ax) * 16777216.0f;  // exact: * 2^24
        const unsigned int q = (unsigned int)scaled;
        const float rest = scaled - (float)q;
        const unsigned int r = q + ((rest > 0.5f || (rest == 0.5f && (q & 1u))) ? 1u : 0u);
        return (unsigned short)(sign | r);
    }
    const unsigned int lsb = (ax >> 13) & 1u;
    const unsigned int rounded = ax + 0xfffu + lsb;
    return (unsigned short)(sign | (((rounded >> 13) - (112u << 10)) & 0xffffu));
#endif
}
__device__ __forceinline__ float rpc_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float rpc_warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
"""


def tables_source(tables) -> str:
    """``__constant__`` definitions of the lookup tables a generated expression uses."""
    out = []
    for name, values in sorted(tables.items()):
        out.append(f"__constant__ signed char {name}[{len(values)}] = {{"
                   + ", ".join(str(v) for v in values) + "};\n")
    return "".join(out)


def quant_source(spec: QuantSpec) -> str:
    """The CUDA module for one block type: element function, dequantize and mul_mat_vec kernels."""
    tables, funcs = collect(spec.element)
    qk, ts = spec.block_size, spec.type_size
    parts = [PRELUDE, tables_source(tables)]
    parts += [FUNCTIONS[f][0] for f in funcs]
    parts.append(emit_device_function(spec.element_function, spec.element))
    parts.append(f"""
// n_elements values from contiguous blocks of {spec.name} ({qk} elements in {ts} bytes each)
extern "C" __global__ void {spec.dequantize_kernel}(const unsigned char * __restrict__ src,
                                                 float * __restrict__ dst,
                                                 const long long n_elements) {{
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n_elements; i += step) {{
        const long long blk = i / {qk};
        dst[i] = {spec.element_function}(src + blk * {ts}, (int)(i - blk * {qk}));
    }}
}}

// y[c, m] = sum_k W[m, k] * x[c, k] for c < n_cols <= {MMV_MAX_COLS}: W is n_rows rows of k {spec.name}
// elements (row_stride bytes apart), x is n_cols contiguous float rows of k, y n_cols rows of n_rows.
// One block of {MMV_THREADS} threads per row of W.
extern "C" __global__ void {spec.mul_mat_vec_kernel}(const unsigned char * __restrict__ w,
                                                   const long long row_stride,
                                                   const float * __restrict__ x,
                                                   float * __restrict__ y,
                                                   const int k, const int n_rows, const int n_cols) {{
    const int row = blockIdx.x;
    if (row >= n_rows) return;
    const unsigned char * wr = w + (long long)row * row_stride;
    float acc[{MMV_MAX_COLS}];
#pragma unroll
    for (int c = 0; c < {MMV_MAX_COLS}; ++c) acc[c] = 0.0f;
    for (int i = threadIdx.x; i < k; i += blockDim.x) {{
        const int blk = i / {qk};
        const float v = {spec.element_function}(wr + (long long)blk * {ts}, i - blk * {qk});
#pragma unroll
        for (int c = 0; c < {MMV_MAX_COLS}; ++c) {{
            if (c < n_cols) acc[c] += v * x[(long long)c * k + i];
        }}
    }}
    __shared__ float partial[{MMV_MAX_COLS}][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
#pragma unroll
    for (int c = 0; c < {MMV_MAX_COLS}; ++c) {{
        if (c < n_cols) {{  // the same for every thread of the block: all lanes shuffle
            const float s = rpc_warp_sum(acc[c]);
            if (lane == 0) partial[c][warp] = s;
        }}
    }}
    __syncthreads();
    if (warp == 0) {{
        for (int c = 0; c < n_cols; ++c) {{
            const float s = rpc_warp_sum(lane < n_warps ? partial[c][lane] : 0.0f);
            if (lane == 0) y[(long long)c * n_rows + row] = s;
        }}
    }}
}}
""")
    return "".join(parts)


# ------------------------------------------------------------------------------ row kernels

ROW_THREADS = 256
RMS_NORM_KERNEL = "rpc_rms_norm_f32"
SOFT_MAX_KERNELS = {"F32": "rpc_soft_max_f32_mask_f32", "F16": "rpc_soft_max_f32_mask_f16",
                    None: "rpc_soft_max_f32"}


def _row_index() -> str:
    return """\
    const long long r = blockIdx.x;
    const long long i1 = r % ne1, i2 = (r / ne1) % ne2, i3 = r / (ne1 * ne2);
"""


def _block_reduce(op: str, var: str) -> str:
    """Reduce ``var`` over the thread block (sum or max); every thread gets the result."""
    fn = "rpc_warp_sum" if op == "sum" else "rpc_warp_max"
    neutral = "0.0f" if op == "sum" else "RPC_NEG_INF"
    return f"""\
    {{
        __shared__ float red_{var}[32];
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
        {var} = {fn}({var});
        __syncthreads();
        if (lane == 0) red_{var}[warp] = {var};
        __syncthreads();
        {var} = lane < n_warps ? red_{var}[lane] : {neutral};
        {var} = {fn}({var});
    }}
"""


def norm_source() -> str:
    """RMS_NORM and SOFT_MAX over float32 rows (elements contiguous, rows anywhere: byte strides)."""
    rms = f"""
// y = x / sqrt(mean(x^2) + eps) per row of ne0 floats; one block per row (ne1*ne2*ne3 blocks)
extern "C" __global__ void {RMS_NORM_KERNEL}(const char * __restrict__ x, const long long xb1,
        const long long xb2, const long long xb3, char * __restrict__ y, const long long yb1,
        const long long yb2, const long long yb3, const int ne0, const long long ne1,
        const long long ne2, const float eps) {{
{_row_index()}    const float * xr = (const float *)(x + i1 * xb1 + i2 * xb2 + i3 * xb3);
    float * yr = (float *)(y + i1 * yb1 + i2 * yb2 + i3 * yb3);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < ne0; i += blockDim.x) sum += xr[i] * xr[i];
{_block_reduce("sum", "sum")}    const float scale = 1.0f / sqrtf(sum / (float)ne0 + eps);
    for (int i = threadIdx.x; i < ne0; i += blockDim.x) yr[i] = xr[i] * scale;
}}
"""
    parts = [PRELUDE, rms]
    for mask_type, name in SOFT_MAX_KERNELS.items():
        if mask_type is None:
            mask_args, mask_read = "", "0.0f"
        else:
            ctype = "float" if mask_type == "F32" else "unsigned short"
            mask_args = (", const char * __restrict__ mask, const long long mb1, const long long mb2,"
                         " const long long mb3, const long long mne2, const long long mne3")
            conv = "mr[i]" if mask_type == "F32" else "rpc_h2f(mr[i])"
            mask_read = f"slope * {conv}"
        mask_ptr = ("" if mask_type is None else
                    f"    const {ctype} * mr = (const {ctype} *)(mask + i1 * mb1 + (i2 % mne2) * mb2"
                    f" + (i3 % mne3) * mb3);\n")
        parts.append(f"""
// ggml SOFT_MAX per row: w = x*scale + slope*mask, y = exp(w - max) / (sum + exp(sink - max))
// rows: ne1 x ne2 (heads) x ne3; slope from ALiBi (max_bias > 0) else 1; sinks optional (F32, per head)
extern "C" __global__ void {name}(const char * __restrict__ x, const long long xb1,
        const long long xb2, const long long xb3, char * __restrict__ y, const long long yb1,
        const long long yb2, const long long yb3, const int ne0, const long long ne1,
        const long long ne2, const float scale, const float max_bias, const float m0,
        const float m1, const int n_head_log2, const float * __restrict__ sinks{mask_args}) {{
{_row_index()}    const float * xr = (const float *)(x + i1 * xb1 + i2 * xb2 + i3 * xb3);
    float * yr = (float *)(y + i1 * yb1 + i2 * yb2 + i3 * yb3);
{mask_ptr}    const int h = (int)i2;
    const float slope = max_bias > 0.0f ? (h < n_head_log2 ? powf(m0, h + 1) : powf(m1, 2 * (h - n_head_log2) + 1)) : 1.0f;
    (void)slope;
    float mx = RPC_NEG_INF;
    for (int i = threadIdx.x; i < ne0; i += blockDim.x) mx = fmaxf(mx, xr[i] * scale + {mask_read});
{_block_reduce("max", "mx")}    const float sink = sinks ? sinks[h] : RPC_NEG_INF;
    if (sinks) mx = fmaxf(mx, sink);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < ne0; i += blockDim.x) {{
        const float e = expf(xr[i] * scale + {mask_read} - mx);
        yr[i] = e;
        sum += e;
    }}
{_block_reduce("sum", "sum")}    if (sinks) sum += expf(sink - mx);
    const float inv = 1.0f / sum;
    for (int i = threadIdx.x; i < ne0; i += blockDim.x) yr[i] *= inv;
}}
""")
    return "".join(parts)


def _kernel_modules():
    """The modules whose source lives beside this file: name -> (source function, kernel names)."""
    from . import attention_kernel, rope_kernel

    return {"rows": (norm_source, [RMS_NORM_KERNEL, *SOFT_MAX_KERNELS.values()]),
            rope_kernel.MODULE: (rope_kernel.rope_source, list(rope_kernel.KERNEL_NAMES)),
            attention_kernel.MODULE: (attention_kernel.flash_attn_source,
                                      list(attention_kernel.KERNEL_NAMES))}


def module_names() -> list[str]:
    """Every CUDA module the plugin may compile: one per quantized type, then the op modules."""
    return [f"quant_{s.ident}" for s in QUANT_SPECS.values()] + list(_kernel_modules())


@functools.lru_cache(maxsize=None)
def module_source(module: str) -> str:
    others = _kernel_modules()
    if module in others:
        return others[module][0]()
    for spec in QUANT_SPECS.values():
        if module == f"quant_{spec.ident}":
            return quant_source(spec)
    raise KeyError(f"no CUDA module named {module!r}")


def all_sources() -> dict[str, str]:
    """module name -> CUDA source, for every module the plugin may compile."""
    return {name: module_source(name) for name in module_names()}


def kernel_names(module: str) -> list[str]:
    """The ``extern "C"`` kernels a module defines (what launching code looks up)."""
    others = _kernel_modules()
    if module in others:
        return others[module][1]
    spec = next(s for s in QUANT_SPECS.values() if f"quant_{s.ident}" == module)
    return [spec.dequantize_kernel, spec.mul_mat_vec_kernel]
