"""FLASH_ATTN_EXT as one fused CUDA kernel: scores, mask, online softmax and V in a single pass.

Semantics are the shared implementation's (``rpcserver.ops.attention``, whose docstring is the
reference): ``dst[DV, H, n_q, B]`` (F32, heads before queries) with, for query row ``i`` of
head ``h`` in batch ``b``::

    s_j = q.k_j * scale                                  (or softcap * tanh(q.k_j * scale/softcap))
    s_j += slope[h] * mask[j, i, h % Hm, b % Bm]         (keys whose scaled mask is -inf: skipped)
    out = sum_j exp(s_j - m) v_j / (sum_j exp(s_j - m) + exp(sink[h] - m))

K head ``h // (H/Hk)``, V head ``h // (H/Hv)``, K/V batch ``b // (B/Bk)``; a row whose every
key is masked gives zeros. Q is rounded to K's ``vec_dot`` type first (the shared
``q_as_vec_dot``) unless ggml's CPU would take its tiled path, exactly as the shared op does;
the kernel then reads that contiguous float32 copy of Q.

What the kernel covers (:func:`flash_attn_ext` declines everything else, and the shared
implementation runs):

* K and V of the KV-cache types llama.cpp offers (``--cache-type-k/-v``): F32, F16, BF16,
  Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL -- any combination, read in place through byte
  strides (views and permutations of a cache included), the quantized ones through the
  element functions generated from their block layouts (:data:`kernels.QUANT_SPECS`);
* head sizes DK and DV from 1 to :data:`MAX_HEAD` (256), independently (192/128 is fine;
  multiples of 32 for the quantized types, as their rows require);
* an optional F16 mask (repeating over dims 2/3), ALiBi, logit softcap, F32 sinks.

Launch geometry
---------------
Query rows are grouped so that the rows of one thread block read the same K and V rows:
heads ``[c*G, (c+1)*G)`` with ``G = gcd(H/Hk, H/Hv)`` share one K head and one V head, and
the ``G * n_q`` rows of such a group (of one batch) are numbered query-major (row ``r`` is
query ``r // G`` of head ``c*G + r % G``: for decode these are the G heads of a GQA group).

* A **tile** is :data:`ROWS` (4) consecutive rows of a group; one block of :data:`WARPS` (4)
  warps handles one tile. Every warp keeps the online-softmax state of all 4 rows and takes
  every 4th key of the block's key range: per key it reads the 4 mask values (one broadcast
  load each), skips the key when all 4 are -inf, else loads the lane's slice of the K row
  once (lane ``l`` holds elements ``l, l+32, ...``: for the 32-element block types exactly
  element ``l`` of each block, the block's scale a broadcast load), forms the 4 dot
  products (warp-shuffle sums), then loads the V slice once and updates each live row's
  running max ``m``, sum ``l`` and accumulators (rescaled by ``exp(m_old - m_new)`` when
  the max grows). Everything up to the accumulation is warp-uniform (same addresses, and
  an xor-butterfly sum gives every lane the same bits), so no branch diverges.
* The warps' states meet in static shared memory (``m``/``l`` per warp and row, the
  accumulators ``[WARPS][ROWS][head]``) and are merged by the block's 128 threads, one
  output element each.
* **Split keys**: when the tiles alone give fewer than :data:`TARGET_BLOCKS` blocks (decode:
  one tile per KV-head group) and there are many keys, the key range is cut into ``n_split``
  contiguous parts of at least :data:`MIN_SPLIT_KEYS` keys, one block each (``blockIdx.x =
  tile * n_split + part``); the blocks write their unnormalized states ``(m, l, acc[DV])``
  to a float32 scratch array and ``rpc_flash_attn_ext_combine`` (one block of 128 threads
  per query row) merges them, adds the sink and normalizes. Otherwise the main kernel
  normalizes and writes ``dst`` itself.

The main kernel comes in three builds (:data:`MAIN_KERNELS`), for heads (``max(DK, DV)``)
of at most 64, 128 and 256 elements: each lane holds ``head/32`` floats of each of the 4 Q
rows and 4 accumulators, plus the K/V slice. Registers per thread (ptxas, sm_80): 92, 118
and 166, no spills; static shared memory 4.2, 8.2 and 16.1 KiB per block. The combine
kernel: 32 registers, no shared memory.

Numerics: dot products and accumulation in float32 (the shared code's and ggml's tiled
path's precision; ggml's scalar path accumulates an F16 V in F16). ``expf``/``tanhf`` are
the accurate library functions, not the ``__expf`` approximations. Masked keys never touch
K or V, so NaN/inf left in unused cache cells cannot leak; a NaN/inf in a live V entry
poisons its output (NaN) as in the shared code.
"""

from __future__ import annotations

import math

import numpy as np

from rpcserver.ggml import TYPES_BY_NAME, GGMLType

from . import kernels
from .kernels import PRELUDE, QUANT_SPECS
from .qdsl import FUNCTIONS, collect, emit_device_function

MODULE = "flash_attn"
#: the kernel family that RPCSERVER_CUDA_KERNELS switches (see dispatch.KERNEL_FAMILIES)
FAMILY = "flash_attn"

#: the largest DK / DV
MAX_HEAD = 256
#: the main kernel for heads (max(DK, DV)) up to each size: per-lane arrays of size/32 floats
MAIN_KERNELS = {64: "rpc_flash_attn_ext_h64", 128: "rpc_flash_attn_ext_h128",
                MAX_HEAD: "rpc_flash_attn_ext_h256"}
#: the second step of the split-key mode
COMBINE_KERNEL = "rpc_flash_attn_ext_combine"
#: the ``extern "C"`` kernels the module defines
KERNEL_NAMES: tuple[str, ...] = (*MAIN_KERNELS.values(), COMBINE_KERNEL)

#: warps per block of the main kernel (they split the block's keys)
WARPS = 4
THREADS = 32 * WARPS
#: query rows per block (each warp keeps all of them)
ROWS = 4
#: threads of the combine kernel
COMBINE_THREADS = 128
#: split the keys across blocks while the tiles give fewer blocks than this ...
TARGET_BLOCKS = 512
#: ... and as long as each part keeps at least this many keys
MIN_SPLIT_KEYS = 128
#: the most parts one row's keys are cut into
MAX_SPLITS = 64

#: K/V types the kernel reads: llama.cpp's KV-cache types
KV_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL")
_KV_QUANT = tuple(t for t in KV_TYPES if t in QUANT_SPECS)


def _row_loader_source() -> str:
    """``rpc_fa_load_row``: lane ``lane``'s elements ``d = c*32 + lane`` of one K or V row."""
    plain = {
        "F32": (int(GGMLType.F32), "((const float *)row)[d]"),
        "F16": (int(GGMLType.F16), "rpc_h2f(((const unsigned short *)row)[d])"),
        "BF16": (int(GGMLType.BF16),
                 "__int_as_float((int)((unsigned int)((const unsigned short *)row)[d] << 16))"),
    }
    cases = []
    for name in KV_TYPES:
        if name in plain:
            value, expr = plain[name]
        else:
            spec = QUANT_SPECS[name]
            assert spec.block_size == 32, name  # element `lane` of block c is d = c*32 + lane
            value = spec.value
            expr = f"{spec.element_function}(row + c * {spec.type_size}, lane)"
        cases.append(f"""\
    case {value}:  // {name}
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {{
            const int d = c * 32 + lane;
            out[c] = d < n ? {expr} : 0.0f;
        }}
        break;
""")
    return f"""
// Lane `lane`'s share of a K or V row of n <= 32*CHUNKS elements of ggml type `type`:
// out[c] = element c*32 + lane (0 past the row). The switch is warp-uniform; each case is a
// straight loop.
template <int CHUNKS>
__device__ __forceinline__ void rpc_fa_load_row(const int type, const unsigned char * __restrict__ row,
                                                const int n, const int lane, float (&out)[CHUNKS]) {{
    switch (type) {{
{"".join(cases)}    default:
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) out[c] = 0.0f;
        break;
    }}
}}
"""


_MERGE_SOURCE = r"""
// int minimum, spelled out: the same function on the device and under the host emulation
__device__ __forceinline__ int rpc_fa_min(const int a, const int b) { return a < b ? a : b; }
// Merges n online-softmax states of one output element. State t is (m_t, l_t, a_t): the
// running max of its scores, sum exp(s - m_t) and sum exp(s - m_t) * v over its keys;
// m_t = -inf when it took no key (a_t may still be NaN: a live key with a non-finite V and
// zero weight, which must poison the result as in the shared code).
__device__ __forceinline__ void rpc_fa_merge(const float * ms, const float * ls, const float * as,
                                             const int n, const long long ml_step,
                                             const long long a_step, float & m, float & l,
                                             float & a) {
    m = RPC_NEG_INF;
    for (int t = 0; t < n; ++t) m = fmaxf(m, ms[t * ml_step]);
    l = 0.0f;
    a = 0.0f;
    for (int t = 0; t < n; ++t) {
        const float mt = ms[t * ml_step];
        const float w = mt == RPC_NEG_INF ? 0.0f : expf(mt - m);
        l += w * ls[t * ml_step];
        a += w * as[t * a_step];
    }
}

// The output element from a merged state: the sink (if any) joins the denominator only,
// and a row with no live key (l == 0) gives 0 -- ggml's S == 0 ? 0 : 1/S.
__device__ __forceinline__ float rpc_fa_finish(float m, float l, float a,
                                               const float * __restrict__ sinks, const int h) {
    if (sinks) {
        const float s = sinks[h];
        if (s > m) {
            const float f = m == RPC_NEG_INF ? 0.0f : expf(m - s);
            l *= f;
            a *= f;
            m = s;
        }
        if (s != RPC_NEG_INF) l += expf(s - m);
    }
    const float inv = l == 0.0f ? 0.0f : 1.0f / l;
    return a * inv;
}
"""


#: the main kernels' parameters, in order: (C type, name)
MAIN_PARAMS = (
    ("const float * __restrict__", "q"),
    ("const unsigned char * __restrict__", "k"), ("const long long", "kb1"),
    ("const long long", "kb2"), ("const long long", "kb3"), ("const int", "k_type"),
    ("const unsigned char * __restrict__", "v"), ("const long long", "vb1"),
    ("const long long", "vb2"), ("const long long", "vb3"), ("const int", "v_type"),
    ("const unsigned char * __restrict__", "mask"), ("const long long", "mb1"),
    ("const long long", "mb2"), ("const long long", "mb3"), ("const int", "mask_ne2"),
    ("const int", "mask_ne3"),
    ("const float * __restrict__", "sinks"),
    ("char * __restrict__", "dst"), ("const long long", "db1"), ("const long long", "db2"),
    ("const long long", "db3"),
    ("float * __restrict__", "partial"),
    ("const int", "dk"), ("const int", "dv"), ("const int", "n_q"), ("const int", "n_kv"),
    ("const int", "n_head"), ("const int", "k_group"), ("const int", "v_group"),
    ("const int", "k_batch_div"), ("const int", "v_batch_div"), ("const int", "head_group"),
    ("const int", "n_split"), ("const int", "keys_per_split"),
    ("const float", "scale"), ("const float", "softcap"), ("const float", "max_bias"),
    ("const float", "m0"), ("const float", "m1"), ("const int", "n_head_log2"),
)


def _param_list(indent: str) -> str:
    return (",\n" + indent).join(f"{ctype} {name}" for ctype, name in MAIN_PARAMS)


def _main_source() -> str:
    params = _param_list("        ")
    entries = []
    for head, name in MAIN_KERNELS.items():
        args = ", ".join(name_ for _, name_ in MAIN_PARAMS)
        entries.append(f"""
// heads (DK and DV) of at most {head}
extern "C" __global__ void {name}(
        {params}) {{
    rpc_fa_tile<{head // 32}>({args});
}}
""")
    tile = f"""
// FLASH_ATTN_EXT, fused (see rpcserver_cuda.attention_kernel for the geometry), for heads
// of at most 32*CHUNKS elements.
// q: contiguous float32 [B][H][n_q][dk], already rounded to K's vec_dot type.
// k, v: first byte of the K / V tensors, rows nb1 apart, heads nb2, batches nb3; ggml types
// k_type / v_type. mask: F16 [n_kv+][n_q+][mask_ne2][mask_ne3] (null: none). sinks: F32 per
// head (null: none). dst: F32 [dv][H][n_q][B] with byte strides db1..db3. partial: null, or
// the scratch of the split-key mode, [n_split][B*H*n_q][dv + 2] floats (m, l, acc).
// Block x: tile (x / n_split) of rows, key part (x % n_split) of keys_per_split keys.
template <int CHUNKS>
__device__ __forceinline__ void rpc_fa_tile(
        {params}) {{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int rows_per_group = head_group * n_q;
    const int tiles_per_group = (rows_per_group + RPC_FA_ROWS - 1) / RPC_FA_ROWS;
    const int n_groups = n_head / head_group;
    const int part = (int)(blockIdx.x % (unsigned)n_split);
    long long rest = blockIdx.x / (unsigned)n_split;
    const int tile = (int)(rest % tiles_per_group);
    rest /= tiles_per_group;
    const int group = (int)(rest % n_groups);
    const int b = (int)(rest / n_groups);
    const int row0 = tile * RPC_FA_ROWS;
    const int n_rows = rpc_fa_min(RPC_FA_ROWS, rows_per_group - row0);
    const int h0 = group * head_group;

    // per row: Q slice, mask row, ALiBi slope, online-softmax state
    float qr[RPC_FA_ROWS][CHUNKS], acc[RPC_FA_ROWS][CHUNKS];
    float run_max[RPC_FA_ROWS], run_sum[RPC_FA_ROWS], slope[RPC_FA_ROWS];
    const unsigned short * mrow[RPC_FA_ROWS];
    int head[RPC_FA_ROWS], qrow[RPC_FA_ROWS];
#pragma unroll
    for (int r = 0; r < RPC_FA_ROWS; ++r) {{
        const int rr = row0 + rpc_fa_min(r, n_rows - 1);  // rows past the tile repeat its last one
        head[r] = h0 + rr % head_group;
        qrow[r] = rr / head_group;
        const float * qp = q + (((long long)b * n_head + head[r]) * n_q + qrow[r]) * dk;
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {{
            const int d = c * 32 + lane;
            qr[r][c] = d < dk ? qp[d] : 0.0f;
            acc[r][c] = 0.0f;
        }}
        mrow[r] = mask ? (const unsigned short *)(mask + (long long)qrow[r] * mb1
                                                   + (long long)(head[r] % mask_ne2) * mb2
                                                   + (long long)(b % mask_ne3) * mb3)
                       : (const unsigned short *)0;
        const int h = head[r];
        slope[r] = max_bias > 0.0f ? (h < n_head_log2 ? powf(m0, (float)(h + 1))
                                                       : powf(m1, (float)(2 * (h - n_head_log2) + 1)))
                                   : 1.0f;
        run_max[r] = RPC_NEG_INF;
        run_sum[r] = 0.0f;
    }}
    const unsigned char * kh = k + (long long)(b / k_batch_div) * kb3 + (long long)(h0 / k_group) * kb2;
    const unsigned char * vh = v + (long long)(b / v_batch_div) * vb3 + (long long)(h0 / v_group) * vb2;

    const int key0 = part * keys_per_split;
    const int key1 = rpc_fa_min(n_kv, key0 + keys_per_split);
    for (int j = key0 + warp; j < key1; j += RPC_FA_WARPS) {{
        // everything up to the accumulation is uniform across the warp (same addresses)
        float mv[RPC_FA_ROWS];
        bool live[RPC_FA_ROWS];
        bool any = false;
#pragma unroll
        for (int r = 0; r < RPC_FA_ROWS; ++r) {{
            mv[r] = mrow[r] ? slope[r] * rpc_h2f(mrow[r][j]) : 0.0f;
            live[r] = r < n_rows && mv[r] != RPC_NEG_INF;
            any = any || live[r];
        }}
        if (!any) continue;  // a masked key never touches K or V
        float kv[CHUNKS];
        rpc_fa_load_row(k_type, kh + (long long)j * kb1, dk, lane, kv);
        float s[RPC_FA_ROWS];
#pragma unroll
        for (int r = 0; r < RPC_FA_ROWS; ++r) {{
            float dot = 0.0f;
#pragma unroll
            for (int c = 0; c < CHUNKS; ++c) dot += qr[r][c] * kv[c];
            s[r] = r < n_rows ? rpc_warp_sum(dot) : 0.0f;
        }}
        rpc_fa_load_row(v_type, vh + (long long)j * vb1, dv, lane, kv);
#pragma unroll
        for (int r = 0; r < RPC_FA_ROWS; ++r) {{
            if (!live[r]) continue;
            float x = s[r] * scale;
            if (softcap != 0.0f) x = softcap * tanhf(x);
            x += mv[r];
            if (x > run_max[r]) {{
                const float alpha = expf(run_max[r] - x);  // 0 for the first key
                run_sum[r] *= alpha;
#pragma unroll
                for (int c = 0; c < CHUNKS; ++c) acc[r][c] *= alpha;
                run_max[r] = x;
            }}
            const float p = x == RPC_NEG_INF ? 0.0f : expf(x - run_max[r]);
            run_sum[r] += p;
#pragma unroll
            for (int c = 0; c < CHUNKS; ++c) acc[r][c] += p * kv[c];
        }}
    }}

    // merge the warps' states; one thread per output element of the tile
    __shared__ float sm_max[RPC_FA_WARPS][RPC_FA_ROWS], sm_sum[RPC_FA_WARPS][RPC_FA_ROWS];
    __shared__ float sm_acc[RPC_FA_WARPS][RPC_FA_ROWS][CHUNKS * 32];
#pragma unroll
    for (int r = 0; r < RPC_FA_ROWS; ++r) {{
        if (lane == 0) {{
            sm_max[warp][r] = run_max[r];
            sm_sum[warp][r] = run_sum[r];
        }}
#pragma unroll
        for (int c = 0; c < CHUNKS; ++c) {{
            const int d = c * 32 + lane;
            if (d < dv) sm_acc[warp][r][d] = acc[r][c];
        }}
    }}
    __syncthreads();
    const long long n_rows_total = (long long)gridDim.x / n_split / tiles_per_group * rows_per_group;
    for (int e = threadIdx.x; e < n_rows * dv; e += blockDim.x) {{
        const int r = e / dv, d = e % dv;
        float m, l, a;
        rpc_fa_merge(&sm_max[0][r], &sm_sum[0][r], &sm_acc[0][r][d], RPC_FA_WARPS, RPC_FA_ROWS,
                     RPC_FA_ROWS * CHUNKS * 32, m, l, a);
        const int rr = row0 + r;
        const int h = h0 + rr % head_group, i = rr / head_group;
        if (partial) {{
            const long long row = ((long long)b * n_head + h) * n_q + i;
            float * st = partial + ((long long)part * n_rows_total + row) * (dv + 2);
            if (d == 0) {{
                st[0] = m;
                st[1] = l;
            }}
            st[2 + d] = a;
        }} else {{
            float * out = (float *)(dst + (long long)b * db3 + (long long)i * db2 + (long long)h * db1);
            out[d] = rpc_fa_finish(m, l, a, sinks, h);
        }}
    }}
}}
"""
    return tile + "".join(entries) + COMBINE_SOURCE


COMBINE_SOURCE = f"""
// The split-key mode's second step: one block per query row (row = (b*H + h)*n_q + i)
// merges the n_split states the main kernel left in `partial` and writes dst.
extern "C" __global__ void {COMBINE_KERNEL}(
        const float * __restrict__ partial, const int n_split, const long long n_rows_total,
        const int dv, const int n_q, const int n_head, const float * __restrict__ sinks,
        char * __restrict__ dst, const long long db1, const long long db2, const long long db3) {{
    const long long row = blockIdx.x;
    const int i = (int)(row % n_q), h = (int)(row / n_q % n_head);
    const long long b = row / n_q / n_head;
    const float * st = partial + row * (dv + 2);
    const long long step = n_rows_total * (dv + 2);
    float * out = (float *)(dst + b * db3 + (long long)i * db2 + (long long)h * db1);
    for (int d = threadIdx.x; d < dv; d += blockDim.x) {{
        float m, l, a;
        rpc_fa_merge(st, st + 1, st + 2 + d, n_split, step, step, m, l, a);
        out[d] = rpc_fa_finish(m, l, a, sinks, h);
    }}
}}
"""


def flash_attn_source() -> str:
    """The module's CUDA C: PRELUDE, the K/V element functions, the two kernels."""
    tables, funcs = {}, []
    for name in _KV_QUANT:
        t, f = collect(QUANT_SPECS[name].element)
        tables.update(t)
        funcs += [x for x in f if x not in funcs]
    parts = [PRELUDE,
             f"#define RPC_FA_WARPS {WARPS}\n#define RPC_FA_ROWS {ROWS}\n",
             kernels.tables_source(tables)]
    parts += [FUNCTIONS[f][0] for f in funcs]
    parts += [emit_device_function(QUANT_SPECS[n].element_function, QUANT_SPECS[n].element)
              for n in _KV_QUANT]
    parts += [_row_loader_source(), _MERGE_SOURCE, _main_source()]
    return "".join(parts)


# ------------------------------------------------------------------------------ launching

_KV_TYPE_VALUES = frozenset(TYPES_BY_NAME[n].value for n in KV_TYPES)
_INT_MAX = 2**31 - 1


def _readable(tv) -> bool:
    """A tensor the kernel can address: in a buffer, rows of contiguous elements (blocks for
    the quantized types), element-aligned strides and offset."""
    if tv is None or tv.buffer is None:
        return False
    t = tv.type
    if tv.nb[0] != t.type_size:
        return False
    if not t.is_quantized:  # F32/F16/BF16 are read as their C type: keep them aligned
        if tv.offset % t.type_size or any(nb % t.type_size for nb in tv.nb[1:]):
            return False
    return True


def split_plan(n_tiles: int, n_kv: int) -> tuple[int, int]:
    """(n_split, keys_per_split): how many key parts, one block each, every tile gets."""
    n_split = 1
    if n_tiles < TARGET_BLOCKS and n_kv >= 2 * MIN_SPLIT_KEYS:
        n_split = min(MAX_SPLITS, -(-TARGET_BLOCKS // n_tiles), n_kv // MIN_SPLIT_KEYS)
    keys = -(-n_kv // n_split)
    return -(-n_kv // keys), keys


def flash_attn_ext(ctx) -> bool:
    """FLASH_ATTN_EXT through the fused kernel; False (the shared code runs) when not covered."""
    from rpcserver.ops.attention import ggml_tiled_path, q_as_vec_dot

    from . import ops

    qv, kv, vv, dst = ctx.src(0), ctx.src(1), ctx.src(2), ctx.dst
    if qv is None or qv.buffer is None or qv.type.value != GGMLType.F32:
        return False
    if not (_readable(kv) and _readable(vv) and dst.buffer is not None):
        return False
    if kv.type.value not in _KV_TYPE_VALUES or vv.type.value not in _KV_TYPE_VALUES:
        return False
    dk, n_q, n_head, n_batch = qv.ne
    dv, n_kv = vv.ne[0], kv.ne[1]
    hk, bk, hv, bv = kv.ne[2], kv.ne[3], vv.ne[2], vv.ne[3]
    # shape errors are the shared implementation's to report
    if kv.ne[0] != dk or vv.ne[1] != n_kv or min(dk, n_q, n_head, n_batch, dv, n_kv) <= 0:
        return False
    if min(hk, bk, hv, bv) <= 0 or n_head % hk or n_head % hv or n_batch % bk or n_batch % bv:
        return False
    if (dst.type.value != GGMLType.F32 or tuple(dst.ne) != (dv, n_head, n_q, n_batch)
            or dst.nb[0] != 4 or dst.offset % 4 or any(nb % 4 for nb in dst.nb[1:])):
        return False
    if dk > MAX_HEAD or dv > MAX_HEAD:
        return False
    if dk % kv.type.block_size or dv % vv.type.block_size:
        return False
    if n_batch * n_head * n_q > _INT_MAX or n_kv > _INT_MAX:
        return False

    mask_args = (np.uint64(0), np.int64(0), np.int64(0), np.int64(0), np.int32(1), np.int32(1))
    if ctx.has_src(3):
        m = ctx.src(3)
        if (not _readable(m) or m.type.value != GGMLType.F16 or m.ne[0] < n_kv or m.ne[1] < n_q
                or min(m.ne[2], m.ne[3]) <= 0 or n_head % m.ne[2] or n_batch % m.ne[3]):
            return False
        mask_args = (ops._ptr_array(m), np.int64(m.nb[1]), np.int64(m.nb[2]), np.int64(m.nb[3]),
                     np.int32(m.ne[2]), np.int32(m.ne[3]))
    sinks = np.uint64(0)
    if ctx.has_src(4):
        s = ctx.src(4)
        if (not _readable(s) or s.type.value != GGMLType.F32 or s.ne[0] < n_head
                or s.ne[1] * s.ne[2] * s.ne[3] != 1):
            return False
        sinks = ops._ptr_array(s)

    k_group, v_group = n_head // hk, n_head // hv
    head_group = math.gcd(k_group, v_group)
    rows_per_group = head_group * n_q
    n_tiles = n_batch * (n_head // head_group) * (-(-rows_per_group // ROWS))
    n_split, keys_per_split = split_plan(n_tiles, n_kv)
    if n_tiles * n_split > _INT_MAX:
        return False
    head = next(size for size in sorted(MAIN_KERNELS) if max(dk, dv) <= size)
    kern = ops._get_kernel(ctx, FAMILY, MODULE, MAIN_KERNELS[head])
    combine = ops._get_kernel(ctx, FAMILY, MODULE, COMBINE_KERNEL) if n_split > 1 else None
    if kern is None or (n_split > 1 and combine is None):
        return False

    xp = ctx.xp
    q = ctx.f32(qv)
    if not ggml_tiled_path(qv, kv, vv):
        q = q_as_vec_dot(xp, q, kv.type)  # the shared precision rule
    q = xp.ascontiguousarray(q, dtype=xp.float32)

    scale, max_bias, softcap = ctx.param_f32(0), ctx.param_f32(1), ctx.param_f32(2)
    if softcap != 0.0:
        scale = np.float32(scale) / np.float32(softcap)
    m0, m1, n_head_log2 = ops.alibi_params(n_head, max_bias)
    n_rows_total = n_batch * n_head * n_q
    partial = (xp.empty(n_split * n_rows_total * (dv + 2), dtype=xp.float32) if n_split > 1
               else np.uint64(0))
    dst_args = (ops._ptr_array(dst), np.int64(dst.nb[1]), np.int64(dst.nb[2]), np.int64(dst.nb[3]))

    kern((n_tiles * n_split,), (THREADS,), (
        q,
        ops._ptr_array(kv), np.int64(kv.nb[1]), np.int64(kv.nb[2]), np.int64(kv.nb[3]),
        np.int32(kv.type.value),
        ops._ptr_array(vv), np.int64(vv.nb[1]), np.int64(vv.nb[2]), np.int64(vv.nb[3]),
        np.int32(vv.type.value),
        *mask_args, sinks, *dst_args, partial,
        np.int32(dk), np.int32(dv), np.int32(n_q), np.int32(n_kv), np.int32(n_head),
        np.int32(k_group), np.int32(v_group), np.int32(n_batch // bk), np.int32(n_batch // bv),
        np.int32(head_group), np.int32(n_split), np.int32(keys_per_split),
        np.float32(scale), np.float32(softcap), np.float32(max_bias), np.float32(m0),
        np.float32(m1), np.int32(n_head_log2)))
    if n_split > 1:
        combine((n_rows_total,), (COMBINE_THREADS,), (
            partial, np.int32(n_split), np.int64(n_rows_total), np.int32(dv), np.int32(n_q),
            np.int32(n_head), sinks, *dst_args))
    return True
