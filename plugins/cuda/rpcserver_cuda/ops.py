"""Graph execution on a CUDA device: the shared executor, with this plugin's kernels swapped in.

:func:`run_graph` runs the shared executor. ``CudaArrayLib.op_overrides`` hands it
:data:`OVERRIDES`: the executor's plan tries the plugin's kernel for those ops first
and, when the kernel does not cover the node (types, layout, sizes), runs the
shared implementation. Products with weights in their ggml type (MUL_MAT, each expert
of MUL_MAT_ID) reach :func:`mul_mat_vec` through ``CudaArrayLib.weight_product``
instead. Everything else is the shared implementation with ``xp = cupy``. The routes
are listed in :mod:`rpcserver_cuda.dispatch`.

No CuPy import at module level: the CuPy module comes from the device.
"""

from __future__ import annotations

import logging

import numpy as np

from rpcserver.api import GGMLType, Op
from rpcserver.ops.attention import alibi_params

from . import attention_kernel, dispatch, kernels, rope_kernel

log = logging.getLogger("rpcserver.cuda")

_F32 = GGMLType.F32
_F16 = GGMLType.F16


def run_graph(device, graph) -> None:
    """Execute ``graph`` on ``device`` (the caller made the device and its stream current).

    The shared executor runs it; :data:`OVERRIDES` reach it through
    ``CudaArrayLib.op_overrides`` (tried first, the shared code when they decline).
    """
    from rpcserver import executor

    executor.execute(device, graph)


_disabled: set[str] = set()


def _get_kernel(ctx, family: str, module: str, name: str):
    """The compiled kernel, or None when the family is switched off or failed to build."""
    if family in _disabled or not dispatch.kernels_enabled(family):
        return None
    try:
        return ctx.lib.kernels.kernel(module, name)
    except Exception as exc:  # noqa: BLE001 - a build problem must not fail graphs
        _disabled.add(family)
        log.warning("CUDA kernel %s:%s could not be built (%s: %s); the %s kernels are off and "
                    "the shared implementation runs instead", module, name, type(exc).__name__,
                    exc, family)
        return None


def _ptr_array(tv):
    """A CuPy array whose data pointer is the first byte of ``tv`` (what a kernel argument needs)."""
    return tv.buffer.array[tv.offset:]


# ------------------------------------------------------------------------------ weight products


def mul_mat_vec(ctx, w, b):
    """``b @ w^T`` for quantized 2-D weights ``w`` and a few float32 rows ``b``, dequantizing
    inside the dot products (the weight type's fused ``rpc_mul_mat_vec`` kernel), or None
    where the kernel does not apply: the shared code then widens ``w`` a tile of rows at a
    time into scratch and multiplies with cuBLAS (rpcserver.ops.matmul.mul_mat_tiled).

    ``CudaArrayLib.weight_product``, so MUL_MAT and each expert of MUL_MAT_ID use it: ``w`` is
    a 2-D TensorView of any type but F32, ``b`` shape (..., N, K); the result (..., N, M).
    """
    spec = kernels.QUANT_SPECS_BY_VALUE.get(w.type.value)
    if spec is None or w.buffer is None:
        return None
    k, m = w.ne[0], w.ne[1]
    if (w.ne[2] != 1 or w.ne[3] != 1 or b.ndim < 1 or b.shape[-1] != k or k == 0 or m == 0
            or k % spec.block_size or w.nb[0] != spec.type_size or k >= 2**31 or m >= 2**31):
        return None
    n_cols = b.size // k
    if not 0 < n_cols <= kernels.MMV_MAX_COLS:
        return None
    kern = _get_kernel(ctx, "mul_mat_vec", f"quant_{spec.ident}", spec.mul_mat_vec_kernel)
    if kern is None:
        return None
    cp = ctx.xp
    xs = cp.ascontiguousarray(b.reshape(n_cols, k), dtype=cp.float32)
    y = cp.empty((n_cols, m), dtype=cp.float32)
    kern((m,), (kernels.MMV_THREADS,),
         (_ptr_array(w), np.int64(w.nb[1]), xs, y, np.int32(k), np.int32(m), np.int32(n_cols)))
    return y.reshape(tuple(b.shape[:-1]) + (m,))


# ------------------------------------------------------------------------------ row kernels


def _f32_rows(tv) -> bool:
    return tv is not None and tv.buffer is not None and tv.type.value == _F32 and tv.nb[0] == 4


def _row_launch_args(src, dst):
    return (_ptr_array(src), np.int64(src.nb[1]), np.int64(src.nb[2]), np.int64(src.nb[3]),
            _ptr_array(dst), np.int64(dst.nb[1]), np.int64(dst.nb[2]), np.int64(dst.nb[3]),
            np.int32(src.ne[0]), np.int64(src.ne[1]), np.int64(src.ne[2]))


def rms_norm(ctx) -> bool:
    src, dst = ctx.src(0), ctx.dst
    if not (_f32_rows(src) and _f32_rows(dst)) or tuple(src.ne) != tuple(dst.ne):
        return False
    if src.ne[0] >= 2**31:
        return False
    rows = src.ne[1] * src.ne[2] * src.ne[3]
    kern = _get_kernel(ctx, "rms_norm", "rows", kernels.RMS_NORM_KERNEL)
    if kern is None:
        return False
    if rows and src.ne[0]:
        kern((rows,), (kernels.ROW_THREADS,),
             _row_launch_args(src, dst) + (np.float32(ctx.param_f32(0)),))
    return True


def soft_max(ctx) -> bool:
    src, dst = ctx.src(0), ctx.dst
    if not (_f32_rows(src) and _f32_rows(dst)) or tuple(src.ne) != tuple(dst.ne):
        return False
    ne00, ne01, ne02, ne03 = src.ne
    if ne00 >= 2**31:
        return False
    mask_type, mask_args = None, ()
    if ctx.has_src(1):
        mask = ctx.src(1)
        if mask.buffer is None or mask.type.value not in (_F32, _F16):
            return False
        mask_type = "F32" if mask.type.value == _F32 else "F16"
        if (mask.nb[0] != mask.type.type_size or mask.ne[0] != ne00 or mask.ne[1] < ne01
                or mask.ne[2] == 0 or mask.ne[3] == 0 or ne02 % mask.ne[2] or ne03 % mask.ne[3]):
            return False  # the shared implementation explains what is wrong
        mask_args = (_ptr_array(mask), np.int64(mask.nb[1]), np.int64(mask.nb[2]),
                     np.int64(mask.nb[3]), np.int64(mask.ne[2]), np.int64(mask.ne[3]))
    sinks = np.uint64(0)
    if ctx.has_src(2):
        s = ctx.src(2)
        if not _f32_rows(s) or s.ne[0] < ne02 or s.ne[1] * s.ne[2] * s.ne[3] != 1:
            return False
        sinks = _ptr_array(s)
    kern = _get_kernel(ctx, "soft_max", "rows", kernels.SOFT_MAX_KERNELS[mask_type])
    if kern is None:
        return False
    scale, max_bias = ctx.param_f32(0), ctx.param_f32(1)
    m0, m1, n_head_log2 = alibi_params(ne02, max_bias)
    rows = ne01 * ne02 * ne03
    if rows and ne00:
        kern((rows,), (kernels.ROW_THREADS,),
             _row_launch_args(src, dst) + (np.float32(scale), np.float32(max_bias), m0, m1,
                                           np.int32(n_head_log2), sinks) + mask_args)
    return True


#: op -> kernel attempt ``fn(ctx) -> bool`` (False: not covered, run the shared implementation).
#: MUL_MAT and MUL_MAT_ID are not here: they are the shared code, whose weight products reach
#: :func:`mul_mat_vec` through ``CudaArrayLib.weight_product``
OVERRIDES = {
    int(Op.RMS_NORM): rms_norm,
    int(Op.SOFT_MAX): soft_max,
    int(Op.ROPE): rope_kernel.rope,
    int(Op.ROPE_BACK): rope_kernel.rope,
    int(Op.FLASH_ATTN_EXT): attention_kernel.flash_attn_ext,
}
