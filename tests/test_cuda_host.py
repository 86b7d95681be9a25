"""The host emulation the CUDA plugin's kernels are tested under (tests/cuda_host.h, cuda_host.py).

If it got barriers, shuffles or thread coordinates wrong, every CUDA-host result would be
suspect, so each primitive is checked here against values worked out by hand.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cuda_host

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(cuda_host.compiler() is None, reason="no C++ compiler (g++)")

SOURCE = r"""
// each thread writes its coordinates: 6 ints per thread, in launch order
extern "C" __global__ void coords(int * out) {
    const int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    int * o = out + 6 * (b * blockDim.x * blockDim.y * blockDim.z + t);
    o[0] = threadIdx.x; o[1] = threadIdx.y; o[2] = threadIdx.z;
    o[3] = blockIdx.x; o[4] = blockIdx.y; o[5] = blockIdx.z;
}

// reverse each block's slice through shared memory: wrong without a working __syncthreads
extern "C" __global__ void reverse_block(const float * in, float * out) {
    __shared__ float tile[256];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    tile[threadIdx.x] = in[i];
    __syncthreads();
    out[i] = tile[blockDim.x - 1 - threadIdx.x];
}

// per lane: xor-butterfly sum of the warp, the value of lane (lane+3), of lane 5, of lane-2
extern "C" __global__ void shuffles(const float * in, float * out) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = in[i];
    float s = v;
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    out[4 * i + 0] = s;
    out[4 * i + 1] = __shfl_down_sync(0xffffffffu, v, 3);
    out[4 * i + 2] = __shfl_sync(0xffffffffu, v, 5);
    out[4 * i + 3] = __shfl_up_sync(0xffffffffu, v, 2);
}

// threads exit early; the rest still meet at the barrier
extern "C" __global__ void early_exit(int * out, const int live) {
    __shared__ int count[1];
    if (threadIdx.x >= live) return;
    if (threadIdx.x == 0) count[0] = 0;
    __syncthreads();
    atomicAdd(count, 1);
    __syncthreads();
    out[threadIdx.x] = count[0];
}

// a barrier half the block never reaches
extern "C" __global__ void divergent(int * out) {
    if (threadIdx.x < 16) __syncthreads();
    else for (;;) __syncwarp();
    out[threadIdx.x] = 1;
}

extern "C" __global__ void min_max(int * out, const long long big) {
    out[0] = min(4, 1); out[1] = max(4, 1); out[2] = (int)(min(big, 3) + max(-2, (int)big));
    out[3] = (int)(100.0f * min(0.25f, 2));
}

extern "C" __global__ void scalars(float * out, const long long a, const int b, const float c,
                                   const float * maybe) {
    out[0] = (float)a; out[1] = (float)b; out[2] = c; out[3] = maybe ? maybe[0] : -1.0f;
}
"""


@pytest.fixture(scope="module")
def module():
    return cuda_host.HostModule(SOURCE)


def test_thread_and_block_coordinates(module):
    grid, block = (2, 3, 1), (32, 2, 2)
    n = 6 * 128 * 6
    out = np.full(n, -1, np.int32)
    module.get_function("coords")(grid, block, (out,))
    got = out.reshape(6, 128, 6)
    for b in range(6):
        for t in range(128):
            expect = [t % 32, t // 32 % 2, t // 64, b % 2, b // 2, 0]
            assert list(got[b, t]) == expect, (b, t)


def test_syncthreads_orders_shared_memory(module):
    x = np.arange(512, dtype=np.float32)
    out = np.zeros_like(x)
    module.get_function("reverse_block")((2,), (256,), (x, out))
    np.testing.assert_array_equal(out, np.concatenate([x[255::-1], x[:255:-1]]))


def test_warp_shuffles(module):
    x = np.arange(64, dtype=np.float32) * 2 + 1
    out = np.zeros(4 * 64, np.float32)
    module.get_function("shuffles")((1,), (64,), (x, out))
    got = out.reshape(64, 4)
    for i in range(64):
        warp, lane = divmod(i, 32)
        w = x[32 * warp:32 * warp + 32]
        assert got[i, 0] == w.sum()
        assert got[i, 1] == (w[lane + 3] if lane + 3 < 32 else w[lane])  # out of range: own value
        assert got[i, 2] == w[5]
        assert got[i, 3] == (w[lane - 2] if lane >= 2 else w[lane])


def test_exited_threads_do_not_hold_barriers(module):
    out = np.zeros(96, np.int32)
    module.get_function("early_exit")((1,), (96,), (out, np.int32(40)))
    assert list(out[:40]) == [40] * 40 and not out[40:].any()


def test_a_barrier_nobody_can_complete_is_an_error(module):
    with pytest.raises(RuntimeError, match="deadlock in block"):
        module.get_function("divergent")((1,), (32,), (np.zeros(32, np.int32),))


def test_min_and_max_return_values(module):
    out = np.zeros(4, np.int32)
    module.get_function("min_max")((1,), (32,), (out, np.int64(7)))
    assert list(out) == [1, 4, 3 + 7, 25]


def test_arguments_are_checked_against_the_signature(module):
    out = np.zeros(4, np.float32)
    k = module.get_function("scalars")
    k((1,), (32,), (out, np.int64(1 << 40), np.int32(-7), np.float32(0.5), np.uint64(0)))
    assert list(out) == [float(1 << 40), -7.0, 0.5, -1.0]
    k((1,), (32,), (out, np.int64(3), np.int32(2), np.float32(1.5), np.array([9.0], np.float32)))
    assert out[3] == 9.0
    with pytest.raises(TypeError, match="argument 2 .*int64 passed for a int parameter"):
        k((1,), (32,), (out, np.int64(3), np.int64(2), np.float32(1.5), np.uint64(0)))
    with pytest.raises(TypeError, match="takes 5 arguments"):
        k((1,), (32,), (out,))
    with pytest.raises(ValueError, match="multiple of 32"):
        k((1,), (48,), (out, np.int64(3), np.int32(2), np.float32(1.5), np.uint64(0)))


def test_half_conversions_of_the_kernel_prelude():
    """rpc_h2f / rpc_f2h (the host branch of kernels.PRELUDE) against NumPy's float16, on every
    half value and on floats around every rounding boundary."""
    import cuda_standin  # noqa: F401  (imports the plugin)
    from rpcserver_cuda import kernels

    src = kernels.PRELUDE + r"""
extern "C" __global__ void convert(const unsigned short * h, float * f, const float * x,
                                   unsigned short * y, const long long n_h, const long long n_x) {
    const long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i < n_h) f[i] = rpc_h2f(h[i]);
    if (i < n_x) y[i] = rpc_f2h(x[i]);
}
"""
    mod = cuda_host.HostModule(src)
    halves = np.arange(1 << 16, dtype=np.uint16)
    rng = np.random.default_rng(0)
    finite = halves.view(np.float16)[np.isfinite(halves.view(np.float16))].astype(np.float32)
    mid = (finite[:-1].astype(np.float64) + finite[1:]) / 2  # exact ties between neighbours
    xs = np.concatenate([finite, mid.astype(np.float32), np.nextafter(mid.astype(np.float32), 0),
                         rng.standard_normal(20000).astype(np.float32) * 1e4,
                         np.float32([65504, 65519.996, 65520, 1e9, -1e9, np.inf, -np.inf, 1e-8,
                                     -1e-8, 6e-8, 2.98e-8, 0.0, -0.0])]).astype(np.float32)
    f = np.zeros(halves.size, np.float32)
    y = np.zeros(xs.size, np.uint16)
    n = max(halves.size, xs.size)
    mod.get_function("convert")(((n + 255) // 256,), (256,),
                                (halves, f, xs, y, np.int64(halves.size), np.int64(xs.size)))
    ref = halves.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(f[~nan].view(np.uint32), ref[~nan].view(np.uint32))
    assert np.isnan(f[nan]).all()
    with np.errstate(over="ignore"):  # the values past 65504 round to inf, as intended
        expect = xs.astype(np.float16).view(np.uint16)
    np.testing.assert_array_equal(y, expect)


# -- memory safety ---------------------------------------------------------------------------

def _libasan():
    compiler = cuda_host.compiler()
    path = subprocess.run([compiler, "-print-file-name=libasan.so"], capture_output=True,
                          text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


def _under_asan(args, timeout):
    lib = _libasan()
    if lib is None:
        pytest.skip("the C++ compiler has no AddressSanitizer runtime (libasan.so)")
    env = dict(os.environ, LD_PRELOAD=lib, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0",
               PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=str(HERE.parent))


OUT_OF_BOUNDS = r"""
import sys
sys.path.insert(0, "tests")
import numpy as np
import cuda_host
m = cuda_host.HostModule('''
extern "C" __global__ void one_past(const float * x, float * y, const int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = x[i + 1];
}''')
x, y = np.zeros(1000, np.float32), np.zeros(1000, np.float32)
m.get_function("one_past")((32,), (32,), (x, y, np.int32(1000)))
"""


def test_asan_reports_a_kernel_reading_past_its_array():
    """The check below can fail: a kernel reading one float past its input is reported."""
    res = _under_asan(["-c", OUT_OF_BOUNDS], timeout=300)
    assert res.returncode != 0 and "heap-buffer-overflow" in res.stderr, res.stderr[-3000:]


def test_kernels_stay_inside_buffers_under_asan():
    """Every kernel test on the stand-in (weight products of expert views included), and the
    hostile-input suite against CUDA-host, in a process running under AddressSanitizer: on a
    GPU an out-of-bounds read would be an illegal address that takes the CUDA context, and
    every client, down with it. Here the kernels read buffers allocated to their exact size,
    so one byte too far is reported."""
    # (the 64-query attention cases take the same code paths as the 7-query ones, at 5 s each
    # under ASan, whose longjmp interceptor makes system calls at every fiber switch)
    res = _under_asan(["-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                       "tests/test_cuda_rope.py", "tests/test_cuda_flash_attn.py",
                       "tests/test_cuda_plugin.py", "tests/test_cuda_weights.py",
                       "tests/test_hostile.py",
                       "-k", "(numpy-cupy or CUDA-host) and not batch64"], timeout=1500)
    report = res.stdout[-4000:] + res.stderr[-6000:]
    assert "AddressSanitizer" not in report, report
    assert res.returncode == 0, report
    assert " passed" in res.stdout and " failed" not in res.stdout, report
