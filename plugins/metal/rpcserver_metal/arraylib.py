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

from rpcserver.executor import ArrayLib

_NUMPY_TO_MLX = {
    np.dtype(np.bool_): mx.bool_,
    np.dtype(np.int8): mx.int8, np.dtype(np.int16): mx.int16,
    np.dtype(np.int32): mx.int32, np.dtype(np.int64): mx.int64,
    np.dtype(np.uint8): mx.uint8, np.dtype(np.uint16): mx.uint16,
    np.dtype(np.uint32): mx.uint32, np.dtype(np.uint64): mx.uint64,
    np.dtype(np.float16): mx.float16, np.dtype(np.float32): mx.float32,
    np.dtype(np.float64): mx.float64,
}


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
        # gguf's NumPy dequantizers, on the host; the result is cached per weight by the executor
        return self.from_numpy(super().dequantize(raw_rows, type_value))
