"""The shared executor on MLX: the ``xp`` namespace the ops see, and how buffers become arrays.

rpcserver's ops are written once against the array API NumPy and CuPy share.
MLX implements nearly all of it under the same names (``mx.where``,
``mx.matmul``, ``mx.take_along_axis``, ``mx.as_strided``...), so the namespace
below is ``mlx.core`` itself, overriding only what MLX spells differently:

* dtypes: MLX takes only its own (``mx.float32``), the executor passes NumPy's
  (``np.float32``, ``bool``);
* ``dtype=`` on reductions and scans (``sum``, ``mean``, ``cumsum``,
  ``cumprod``): MLX has none, the input is converted first;
* ``array(..., copy=)``, ``ascontiguousarray``, ``rint`` (MLX's ``round`` rounds
  half to even like NumPy's ``rint``), ``add.at`` (unbuffered scatter-add:
  MLX's ``a.at[idx].add(v)``);
* ``float64`` on the GPU: Metal has no doubles, so there it is float32 (the few
  ops that use double for exactness -- SOFT_MAX's row sums, ROPE's angles,
  GROUP_NORM's statistics -- then work in float32);
* accuracy, where MLX trades it for speed and the conformance suite notices:
  MLX's ``exp`` is a fast approximation (up to 16 float32 ulps; NumPy's and
  ggml's are within one), and its float64 ``exp``/``sin``/``cos`` are only as
  accurate as float32 ones (ROPE computes its angles' cos/sin in double to match
  glibc's correctly rounded ``cosf``/``sinf``). Where the device has float64
  (MLX's CPU), ``exp`` and float64 ``sin``/``cos`` are computed here with
  fdlibm's algorithms in MLX's (exact) float64 arithmetic: float32 ``exp`` is
  then correctly rounded, float64 sin/cos within an ulp.

Everything not listed falls through to ``mlx.core``. One more difference needs no
adapter but care in the ops: ``mx.array`` of a NumPy float64 array is float32
unless ``dtype=mx.float64`` is given (:meth:`MlxNamespace.asarray` gives it).
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from rpcserver import ggml
from rpcserver.executor import ArrayLib, storage_dtype

from . import quants

_NUMPY_TO_MLX = {
    np.dtype(np.bool_): mx.bool_,
    np.dtype(np.int8): mx.int8, np.dtype(np.int16): mx.int16,
    np.dtype(np.int32): mx.int32, np.dtype(np.int64): mx.int64,
    np.dtype(np.uint8): mx.uint8, np.dtype(np.uint16): mx.uint16,
    np.dtype(np.uint32): mx.uint32, np.dtype(np.uint64): mx.uint64,
    np.dtype(np.float16): mx.float16, np.dtype(np.float32): mx.float32,
    np.dtype(np.float64): mx.float64,
}


#: ``mx.depends`` (orders lazily built work) exists in this MLX
_HAS_DEPENDS = hasattr(mx, "depends")

#: what widening a tile of weights holds at once, in float32 tiles: the tile and the
#: dequantizer's intermediates (measured on MLX's CPU, each tile's product evaluated before the
#: next: 1.5 to 4.7 tiles, Q6_K and Q3_K the most). Tiles are sized so that this, not the bare
#: tile, fits the scratch budget.
TILE_FOOTPRINT = 4


def mlx_dtype(dtype):
    """The MLX dtype with the same bytes as a NumPy dtype (an MLX dtype is returned as is)."""
    if isinstance(dtype, mx.Dtype):
        return dtype
    found = _NUMPY_TO_MLX.get(np.dtype(dtype))
    if found is None:
        raise TypeError(f"MLX has no dtype for {np.dtype(dtype)}")
    return found


# ---------------------------------------------------------------- accurate exp, sin, cos (float64)
#
# fdlibm's algorithms (e_exp.c, k_sin.c, k_cos.c, e_rem_pio2.c), written with MLX's float64
# +, -, *, / (exact IEEE arithmetic, unlike its float64 transcendental functions).

_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e+00
_EXP_P = (1.66666666666666019037e-01, -2.77777777770155933842e-03, 6.61375632143793436117e-05,
          -1.65339022054652515390e-06, 4.13813679705723846039e-08)


def exp64(x):
    """exp of a float64 array, within an ulp (float32 results rounded from it are correct)."""
    xc = mx.clip(x, -708.0, 709.0)
    k = mx.round(xc * _INV_LN2)
    hi = xc - k * _LN2_HI
    lo = k * _LN2_LO
    r = hi - lo
    t = r * r
    p1, p2, p3, p4, p5 = _EXP_P
    c = r - t * (p1 + t * (p2 + t * (p3 + t * (p4 + t * p5))))
    y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi)
    scale = ((k.astype(mx.int64) + 1023) << 52).view(mx.float64)  # 2**k
    out = y * scale
    out = mx.where(x > 709.78, mx.array(np.inf, dtype=mx.float64), out)
    out = mx.where(x < -708.0, mx.exp(x), out)  # subnormal results: MLX's own is fine there
    return mx.where(mx.isnan(x), x, out)


_INV_PIO2 = 6.36619772367581382433e-01
_PIO2 = (1.57079632673412561417e+00, 6.07710050630396597660e-11, 2.02226624871116645580e-21)
_S = (-1.66666666666666324348e-01, 8.33333333332248946124e-03, -1.98412698298579493134e-04,
      2.75573137070700676789e-06, -2.50507602534068634195e-08, 1.58969099521155010221e-10)
_C = (4.16666666666666019037e-02, -1.38888888888741095749e-03, 2.48015872894767294178e-05,
      -2.75573143513906633035e-07, 2.08757232129817482790e-09, -1.13596475577881948265e-11)


def _sincos64(x):
    """sin and cos of the reduced argument, its quadrant, and where x is finite."""
    n = mx.round(x * _INV_PIO2)
    r = ((x - n * _PIO2[0]) - n * _PIO2[1]) - n * _PIO2[2]  # exact enough for |x| < 2**19 pi/2
    z = r * r
    s1, s2, s3, s4, s5, s6 = _S
    s = r + (z * r) * (s1 + z * (s2 + z * (s3 + z * (s4 + z * (s5 + z * s6)))))
    c1, c2, c3, c4, c5, c6 = _C
    cr = z * (c1 + z * (c2 + z * (c3 + z * (c4 + z * (c5 + z * c6)))))
    hz = 0.5 * z
    w = 1.0 - hz
    c = w + (((1.0 - w) - hz) + z * cr)
    q = mx.remainder(mx.where(mx.isfinite(n), n, 0.0).astype(mx.int64), 4)
    return s, c, q, mx.isfinite(x)


def sin64(x):
    s, c, q, ok = _sincos64(x)
    out = mx.where(q == 0, s, mx.where(q == 1, c, mx.where(q == 2, -s, -c)))
    return mx.where(ok, out, mx.array(np.nan, dtype=mx.float64))


def cos64(x):
    s, c, q, ok = _sincos64(x)
    out = mx.where(q == 0, c, mx.where(q == 1, -s, mx.where(q == 2, -c, s)))
    return mx.where(ok, out, mx.array(np.nan, dtype=mx.float64))


class _AddWithAt:
    """``mx.add``, plus NumPy's in-place ``np.add.at(out, idx, values)`` (duplicates accumulate)."""

    def __call__(self, *args, **kwargs):
        return mx.add(*args, **kwargs)

    @staticmethod
    def at(out, idx, values):
        out[...] = out.at[idx].add(values)


class MlxNamespace:
    """``mlx.core`` with NumPy's spelling where MLX's differs (see the module docstring)."""

    def __init__(self, float64: bool = True):
        #: what float64 means on this device (float32 on Metal, which has no doubles)
        self.float64 = mx.float64 if float64 else mx.float32
        self.bool_ = mx.bool_
        self.add = _AddWithAt()
        self.rint = mx.round
        self._accurate = float64  # the accurate functions need float64 arithmetic

    def __getattr__(self, name):
        return getattr(mx, name)

    def dtype(self, dtype):
        """The MLX dtype to compute in for a NumPy (or MLX) one; None stays None."""
        if dtype is None:
            return None
        found = mlx_dtype(dtype)
        return self.float64 if found == mx.float64 else found

    # -- accuracy (see the module docstring) -------------------------------------------

    def exp(self, x):
        x = self.asarray(x)
        if not self._accurate or x.dtype not in (mx.float16, mx.float32, mx.float64):
            return mx.exp(x)
        return x if x.size == 0 else exp64(x.astype(mx.float64)).astype(x.dtype)

    def sin(self, x):
        x = self.asarray(x)
        return sin64(x) if self._accurate and x.dtype == mx.float64 else mx.sin(x)

    def cos(self, x):
        x = self.asarray(x)
        return cos64(x) if self._accurate and x.dtype == mx.float64 else mx.cos(x)

    # -- constructors ---------------------------------------------------------------

    def zeros(self, shape, dtype=None):
        return mx.zeros(shape, dtype=self.dtype(dtype) or mx.float32)

    def ones(self, shape, dtype=None):
        return mx.ones(shape, dtype=self.dtype(dtype) or mx.float32)

    def empty(self, shape, dtype=None):
        return mx.zeros(shape, dtype=self.dtype(dtype) or mx.float32)

    def full(self, shape, fill_value, dtype=None):
        return mx.full(shape, fill_value, dtype=self.dtype(dtype))

    def arange(self, *args, dtype=None):
        return mx.arange(*args, dtype=self.dtype(dtype)) if dtype is not None else mx.arange(*args)

    def asarray(self, a, dtype=None):
        dtype = self.dtype(dtype)
        if not isinstance(a, mx.array):
            if isinstance(a, (np.ndarray, np.generic)):
                host = np.asarray(a)
                if host.dtype == np.float64 and self.float64 != mx.float64:
                    host = host.astype(np.float32)  # converted here: the GPU cannot
                # dtype given: mx.array would make a NumPy float64 array float32
                a = mx.array(host, dtype=self.dtype(host.dtype))
            else:
                a = mx.array(a, dtype=dtype) if dtype is not None else mx.array(a)
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)

    def array(self, a, dtype=None, copy=True):
        # MLX arrays are values: every array is already a copy nobody else can change
        return mx.array(self.asarray(a, dtype))

    def ascontiguousarray(self, a, dtype=None):
        return mx.contiguous(self.asarray(a, dtype))

    # -- reductions and scans with NumPy's dtype= --------------------------------------

    def _as(self, a, dtype):
        dtype = self.dtype(dtype)
        return a if dtype is None or a.dtype == dtype else a.astype(dtype)

    def sum(self, a, axis=None, keepdims=False, dtype=None):
        return mx.sum(self._as(a, dtype), axis=axis, keepdims=keepdims)

    def mean(self, a, axis=None, keepdims=False, dtype=None):
        return mx.mean(self._as(a, dtype), axis=axis, keepdims=keepdims)

    def cumsum(self, a, axis=None, dtype=None):
        return mx.cumsum(self._as(a, dtype), axis=axis)

    def cumprod(self, a, axis=None, dtype=None):
        return mx.cumprod(self._as(a, dtype), axis=axis)


class MlxArrayLib(ArrayLib):
    """The executor's view of an MLX device: buffers are read and written through
    :class:`rpcserver_metal.buffer.MlxBuffer` (MLX arrays never alias a buffer)."""

    name = "mlx"
    views_alias = False

    def __init__(self, float64: bool = True):
        self.xp = MlxNamespace(float64=float64)
        #: the latest widened tile's product in the graph being built: the next tile waits for
        #: it (see :meth:`weight_product`); reset when the graph has been evaluated
        self._last_tile_product = None

    def bytes_of(self, buffer):
        return buffer.span(0, buffer.size)

    # storage dtypes are exact (an F64 tensor's bytes are float64 even on Metal)

    def view(self, buffer, offset, shape, strides, dtype):
        return buffer.view(offset, shape, strides, mlx_dtype(dtype))

    def write(self, buffer, offset, shape, strides, dtype, values, index=None):
        buffer.store(offset, shape, strides, mlx_dtype(dtype), values, index)

    def to_numpy(self, a):
        return np.array(a) if isinstance(a, mx.array) else np.asarray(a)

    def from_numpy(self, a):
        return a if isinstance(a, mx.array) else self.xp.asarray(a)

    def dequantize(self, raw_rows, type_value: int):
        """Quantized rows -> float32: MLX operations for the common types (lazy, on the
        graph's device: :func:`rpcserver_metal.quants.dequantize`), gguf's NumPy dequantizers
        on the host for the rest. Either way only the rows given (a tile, or GET_ROWS' rows)
        are widened, for the op that asked; nothing is kept."""
        info = ggml.TYPES[type_value]
        raw = raw_rows if isinstance(raw_rows, mx.array) else mx.array(np.asarray(raw_rows))
        out = quants.dequantize(raw, info)
        if out is not None:
            return out
        return self.from_numpy(super().dequantize(raw, type_value))

    def weight_product(self, ctx, w, b):
        """``b @ w^T`` for a 2-D weight in its own type (see ``ArrayLib.weight_product``).

        * The ggml types that are MLX affine quantization exactly
          (:data:`rpcserver_metal.quants.AFFINE_BITS`: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
          Q5_K): ``mx.quantized_matmul`` on the weight's affine form. The form (packed
          ``uint32`` values, float32 scales and biases: 1.17-1.33 times the ggml blocks;
          never float32 weights) is made once per weight and kept by the core
          (``ctx.state.prepared``), which drops it when the buffer is written from the network
          or freed.
        * Everything else (and those types in a buffer graphs write into, which the core gives
          no prepared forms: ``DeviceState.graph_wrote``): the weight widened
          a tile of rows at a time, as the shared code does, but with the product of each tile
          evaluated before the next tile is built. MLX evaluates lazily, and allocates the
          outputs of the operations it queues ahead of running them: left to the end of the
          graph, every tile of the shared loop is widened before the first product runs, the
          whole weight in float32 at once. A weight that fits one tile stays lazy (its tile
          waits for the previous tiled product, ``mx.depends``), so a graph is still one
          ``mx.eval`` unless it widens a weight larger than the scratch budget.
        """
        buf = w.buffer
        if buf is None or w.ne[2] != 1 or w.ne[3] != 1 or w.nb[0] != w.type.type_size:
            return None
        k, m = int(w.ne[0]), int(w.ne[1])
        if k == 0 or m == 0:
            return None
        bits = quants.AFFINE_BITS.get(w.type.value)
        if bits is not None and k % quants.GROUP == 0:
            out = self._affine_product(ctx, w, b, bits)
            if out is not None:
                return out
        return self._tiled_product(ctx, w, b)

    def _rows(self, w, start: int, stop: int):
        """Rows ``start:stop`` of a 2-D weight in their storage form: uint8 blocks (quantized
        types) or elements (plain types), as an MLX array (rows, row bytes or elements)."""
        info = w.type
        if info.is_quantized:
            return w.buffer.view(w.offset + start * w.nb[1], (stop - start, info.row_size(w.ne[0])),
                                 (w.nb[1], 1), mx.uint8)
        dtype = mlx_dtype(storage_dtype(info.value))
        return w.buffer.view(w.offset + start * w.nb[1], (stop - start, w.ne[0]), (w.nb[1], w.nb[0]),
                             dtype)

    def _affine_product(self, ctx, w, b, bits: int):
        info = w.type
        k, m = int(w.ne[0]), int(w.ne[1])

        def make():
            rows = lambda start, stop: np.array(self._rows(w, start, stop))  # noqa: E731
            return quants.affine_form(rows, m, k, info.value, info.type_size, info.block_size)

        span = (w.offset, w.offset + ggml.nbytes(info, w.ne, w.nb))
        form = ctx.state.prepared(
            w.buffer, span, (info.value, tuple(w.ne), tuple(w.nb), "mlx-affine"), make)
        if form is None:  # bytes a graph writes into: no form (the caller widens tiles)
            return None
        wq, scales, biases = form
        x = b if b.dtype == mx.float32 else b.astype(mx.float32)
        return mx.quantized_matmul(x, wq, scales, biases, transpose=True,
                                   group_size=quants.GROUP, bits=bits)

    def _tiled_product(self, ctx, w, b):
        k, m = int(w.ne[0]), int(w.ne[1])
        info = w.type
        flat = b.reshape(-1, k)
        if flat.dtype != mx.float32:
            flat = flat.astype(mx.float32)
        on_host = info.is_quantized and info.value not in quants.NATIVE_DEQUANT
        row_bytes = 4 * k * TILE_FOOTPRINT  # what widening one row holds, intermediates included
        step = ctx.state.rows_per_tile(row_bytes, m)
        parts = []
        for start in range(0, m, step):
            stop = min(m, start + step)
            with ctx.state.scratch(row_bytes * (stop - start)):
                raw = self._rows(w, start, stop)
                if self._last_tile_product is not None and _HAS_DEPENDS:
                    raw = mx.depends(raw, self._last_tile_product)
                tile = (self.dequantize(raw, info.value) if info.is_quantized
                        else ctx.widen(raw, info.value))
                part = flat @ tile.T
                if on_host or stop < m:
                    # a tile widened on the host exists already, and MLX allocates the outputs
                    # of the operations it has queued before running them: compute this
                    # product now, so only one tile exists at a time
                    mx.eval(part)
            parts.append(part)
            self._last_tile_product = part
        out = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=1)
        return out.reshape(tuple(b.shape[:-1]) + (m,))

    def graph_done(self) -> None:
        """The device evaluated a graph: forget the last tile product it chained on."""
        self._last_tile_product = None
