"""The CPU plugin's numba kernels, type by type, against ggml itself.

Every type registered in ``rpcserver_cpu.kernels.BLOCK_KERNELS`` is checked here
(the op conformance suites then check MUL_MAT, MUL_MAT_ID and GET_ROWS through
the executor on top):

* decoding (``dequantize_rows``) is bit-identical to ggml's own ``to_float`` on
  blocks made by ggml's own quantizer;
* ``mul_mat_vec`` differs from the exact (float64) product of those weights and
  the float32 activations only by float32 rounding: NMSE below 1e-10 (measured
  ~1e-14; a wrong scale, offset or nibble order gives 1e-3 or worse), for row
  counts that are not a multiple of the 4 rows a pass handles, for 1 to 8
  activation rows, and for weight rows with padding between them;
* for the 32-element types, whose products ggml computes on activations quantized to 8 bits:
  ``quantize_q8`` gives the bytes of ggml's own CPU quantizer (Q8_0 and Q8_1 fields) and
  ``mul_mat_q8`` ggml's own ``vec_dot`` results up to float32 rounding.
"""

from __future__ import annotations

import numpy as np
import pytest

from ggml_harness import (ggml_cpu_activations, ggml_cpu_product, ggml_quantize, ggml_to_float,
                          require_ggml)
from rpcserver.ggml import TYPES, GGMLType

kernels = pytest.importorskip("rpcserver_cpu.kernels")
from rpcserver_cpu.kernels.launch import launch  # noqa: E402

#: the types the weights issue lists: each must have a kernel that reads its blocks
REQUIRED_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                  "IQ4_NL", "IQ4_XS", "MXFP4", "F16", "BF16"]

REGISTERED = sorted(kernels.BLOCK_KERNELS)


def _name(t: int) -> str:
    return TYPES[t].name


def _weights(t: int, rows: int, k: int, seed: int):
    """(raw rows in type t, ggml's float32 reading of them)."""
    require_ggml()
    rng = np.random.default_rng(seed)
    values = rng.standard_normal((rows, k)).astype(np.float32)
    if t == GGMLType.F16:
        raw = values.astype(np.float16).view(np.uint8)
    else:
        raw = ggml_quantize(t, values)
    return raw, ggml_to_float(t, raw)


def test_every_listed_type_has_a_kernel():
    missing = [n for n in REQUIRED_TYPES if GGMLType[n] not in kernels.BLOCK_KERNELS]
    assert not missing, f"no CPU block kernel for {missing}"


@pytest.mark.parametrize("t", REGISTERED, ids=_name)
def test_decode_is_ggmls_to_float(t):
    raw, want = _weights(t, 13, 512, seed=t)
    out = np.empty_like(want)
    launch(kernels.dequantize_rows, t, raw, out, threads=2)
    assert np.array_equal(out.view(np.uint32), want.view(np.uint32)), \
        f"{_name(t)}: {np.sum(out != want)} of {out.size} values differ from ggml's to_float"


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded-rows"])
@pytest.mark.parametrize("n_cols", [1, 3, 8])
@pytest.mark.parametrize("t", REGISTERED, ids=_name)
def test_mul_mat_vec_is_exact_up_to_float32(t, n_cols, padded):
    m, k = 13, 512
    raw, wf = _weights(t, m, k, seed=100 + t)
    if padded:  # rows 64 bytes apart more than their size (a view into a larger tensor)
        wide = np.zeros((m, raw.shape[1] + 64), np.uint8)
        wide[:, :raw.shape[1]] = raw
        raw = wide[:, :raw.shape[1]]
    rng = np.random.default_rng(t)
    x = rng.standard_normal((n_cols, k)).astype(np.float32)
    xs = np.empty((n_cols, k // 16), np.float32)
    launch(kernels.sums_of_16, None, x, xs, threads=2)
    np.testing.assert_allclose(xs, x.reshape(n_cols, -1, 16).sum(-1), rtol=1e-5, atol=1e-5)
    out = np.full((n_cols, m), np.nan, np.float32)
    launch(kernels.mul_mat_vec, t, raw, x, xs, out, threads=2)
    exact = x.astype(np.float64) @ wf.astype(np.float64).T
    err = np.sum((out - exact) ** 2) / np.sum(exact ** 2)
    assert err < 1e-10, f"{_name(t)}: NMSE {err:.3g} against the exact product"


Q8_TYPES = [t for t in REGISTERED if kernels.has_q8(t)]


def _quantize_q8(x):
    qy = np.empty(x.shape, np.int8)
    yd = np.full((x.shape[0], x.shape[1] // 32, kernels.YD_FIELDS), np.nan, np.float32)
    launch(kernels.quantize_q8, None, x, qy, yd)
    return qy, yd


def test_the_types_ggml_multiplies_in_8_bits_have_8_bit_products():
    want = {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL", "MXFP4"}
    assert {_name(t) for t in Q8_TYPES} == want


@pytest.mark.parametrize("weight_type", ["Q4_0", "Q4_1"], ids=["as-q8_0", "as-q8_1"])
def test_activations_are_quantized_as_ggmls_cpu_backend_does(weight_type):
    """Byte for byte what ggml's CPU code (its SIMD quantize_row_q8_0/q8_1) makes, including
    an all-zero block and values on rounding ties."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 256)).astype(np.float32) * 4
    x[1, 32:64] = 0
    x[2, :32] = np.r_[127, np.arange(31) - 15.5]  # d = 1: every other value is a tie
    vec_dot_type, act = ggml_cpu_activations(GGMLType[weight_type], x)
    qy, yd = _quantize_q8(x)
    block = act.reshape(3, 8, -1)
    assert np.array_equal(qy, block[:, :, -32:].view(np.int8).reshape(3, 256))
    assert np.array_equal(yd[..., 0], block[:, :, 0:2].copy().view(np.float16)[..., 0])
    if TYPES[vec_dot_type].name == "Q8_1":  # s = d * sum(q), as a half
        assert np.array_equal(yd[..., 2], block[:, :, 2:4].copy().view(np.float16)[..., 0])


@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded-rows"])
@pytest.mark.parametrize("n_cols", [1, 3, 8, 33])
@pytest.mark.parametrize("t", Q8_TYPES, ids=_name)
def test_mul_mat_q8_is_ggmls_own_product(t, n_cols, padded):
    """Against ggml's CPU backend itself: its quantized activations and its vec_dot, so the
    only differences are float32 summation order (NMSE measured <= 1e-11; a wrong scale,
    offset or quant order gives 1e-3 or worse)."""
    m, k = 13, 512
    raw, _ = _weights(t, m, k, seed=200 + t)
    x = np.random.default_rng(t + 1).standard_normal((n_cols, k)).astype(np.float32)
    want = ggml_cpu_product(t, raw, x)
    if padded:
        wide = np.zeros((m, raw.shape[1] + 64), np.uint8)
        wide[:, :raw.shape[1]] = raw
        raw = wide[:, :raw.shape[1]]
    qy, yd = _quantize_q8(x)
    out = np.full((n_cols, m), np.nan, np.float32)
    launch(kernels.mul_mat_q8, t, raw, qy, yd, out, threads=2)
    err = np.sum((out - want) ** 2) / np.sum(want.astype(np.float64) ** 2)
    assert err < 1e-10, f"{_name(t)}: NMSE {err:.3g} against ggml's own product"


_FIRST_USE = r"""
import json, sys, numpy as np
from rpcserver_cpu import kernels
from rpcserver_cpu.kernels.launch import WARMER, launch
t = int(sys.argv[1])
w = np.asfortranarray(np.load(sys.argv[2]))  # column-major: a layout no test compiles
x = np.ones((1, 64), np.float32)
xs = np.full((1, 4), 16, np.float32)
out = np.zeros((1, 4), np.float32)
first = launch(kernels.mul_mat_vec, t, w, x, xs, out, wait=False)
untouched = bool(np.all(out == 0))
assert WARMER.wait(timeout=600)
second = launch(kernels.mul_mat_vec, t, w, x, xs, out, wait=False)
print(json.dumps(dict(first=first, untouched=untouched, second=second, out=out[0].tolist())))
"""


def test_a_kernel_is_compiled_in_the_background_then_loaded_from_the_disk_cache(tmp_path):
    """First use in a process whose disk cache lacks the kernel: launch(wait=False) returns
    False at once without running it and the warmer compiles it; a second process finds it in
    the disk cache and runs it on its first call."""
    import json
    import os
    import subprocess
    import sys

    t = int(GGMLType.Q8_0)
    raw, wf = _weights(t, 4, 64, seed=7)
    np.save(tmp_path / "w.npy", raw)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"),
               RPCSERVER_CPU_WAIT_FOR_KERNELS="0")

    def run():
        p = subprocess.run([sys.executable, "-c", _FIRST_USE, str(t), str(tmp_path / "w.npy")],
                           capture_output=True, text=True, env=env, timeout=900)
        assert p.returncode == 0, p.stderr[-3000:]
        return json.loads(p.stdout.strip().splitlines()[-1])

    cold = run()
    assert cold["first"] is False and cold["untouched"], cold
    assert cold["second"] is True
    np.testing.assert_allclose(cold["out"], wf.sum(axis=1), rtol=1e-5)
    warm = run()
    assert warm["first"] is True, "the kernel compiled by the first process was not reused"
    np.testing.assert_allclose(warm["out"], wf.sum(axis=1), rtol=1e-5)


@pytest.mark.parametrize("layout", ["k-cache", "v-cache", "3-d", "2-d", "strided-rows"])
def test_f16_views_widen_exactly(layout):
    """The CPU device's F16 widening (kernels.widen_f16; NumPy's for rows that are not
    contiguous) on strided views of a KV cache equals NumPy's exact half -> float32
    conversion bit for bit, infinities and subnormals included; NaNs stay NaNs (the CPU's
    vcvtph2ps quiets signalling ones, as ggml's F16C path does)."""
    from rpcserver_cpu.arraylib import CpuArrayLib

    rng = np.random.default_rng(3)
    bits = rng.integers(0, 1 << 16, (512, 8, 64), dtype=np.uint16)
    cache = bits.view(np.float16)
    view = {"k-cache": cache[:256].transpose(1, 0, 2)[None],         # (1, 8, 256, 64)
            "v-cache": cache.reshape(8, 64, 512)[:, :, :256][None],  # rows of 256 kv positions
            "3-d": cache[:200, 3:5],
            "2-d": cache[100:300, 2],
            "strided-rows": cache[:300, 1, ::2]}[layout]  # not contiguous along rows: NumPy's
    out = CpuArrayLib(2).widen(view, int(GGMLType.F16))
    want = view.astype(np.float32)
    assert out.shape == want.shape and out.dtype == np.float32
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out.view(np.uint32)[~nan], want.view(np.uint32)[~nan])


@pytest.mark.parametrize("n_cols", [1, 3, 8])
def test_f32_weights_product_is_exact_up_to_float32(n_cols):
    """kernels.mul_mat_f32 (decode-sized products with F32 weights) against the float64
    product: NMSE below 1e-10 (float32 rounding only), rows of a length no SIMD width divides."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((37, 771)).astype(np.float32)
    x = rng.standard_normal((n_cols, 771)).astype(np.float32)
    out = np.full((n_cols, 37), np.nan, np.float32)
    launch(kernels.mul_mat_f32, None, w, x, out, threads=2)
    exact = x.astype(np.float64) @ w.astype(np.float64).T
    assert np.sum((out - exact) ** 2) / np.sum(exact ** 2) < 1e-10


@pytest.mark.parametrize("case", ["k-cache", "v-cache", "two-tokens", "too-many-rows",
                                  "long-k-cache", "long-v-cache"])
def test_attention_reads_the_f16_cache_in_place(case):
    """CpuArrayLib.batched_product (kernels.mul_mat_f16_batches) on strided views of an F16
    KV cache, short and long (more 64-row tasks than threads), with ggml's grouped-query
    broadcasting (4 query heads per KV head), against the float64 product of the exactly
    widened view: NMSE below 1e-10. Batches with more rows per cache matrix than
    BATCHED_MAX_ROWS are left to the shared code (None)."""
    from types import SimpleNamespace

    from rpcserver_cpu.arraylib import BATCHED_MAX_ROWS, CpuArrayLib

    rng = np.random.default_rng(5)
    n_ctx, n_kv_heads, head_dim, n_kv = 96, 2, 40, 70
    if case.startswith("long-"):
        n_ctx, n_kv = 3100, 3077
    cache = rng.standard_normal((n_ctx, n_kv_heads, head_dim)).astype(np.float16)
    buffer = SimpleNamespace(array=cache.reshape(-1).view(np.uint8))
    p = 2  # bytes per element
    if case.endswith("v-cache"):  # transposed: rows of positions, as llama.cpp stores V without FA
        cache = rng.standard_normal((n_kv_heads, head_dim, n_ctx)).astype(np.float16)
        buffer = SimpleNamespace(array=cache.reshape(-1).view(np.uint8))
        ne, nb = (n_kv, head_dim, n_kv_heads, 1), (p, n_ctx * p, head_dim * n_ctx * p, 0)
        view = cache[:, :, :n_kv]  # (heads, head_dim, n_kv)
    else:  # K: (n_kv, heads, head_dim) seen as (heads, n_kv, head_dim)
        ne, nb = (head_dim, n_kv, n_kv_heads, 1), (p, n_kv_heads * head_dim * p, head_dim * p, 0)
        view = cache[:n_kv].transpose(1, 0, 2)
    tokens = {"two-tokens": 2, "too-many-rows": BATCHED_MAX_ROWS}.get(case, 1)
    a = SimpleNamespace(type=TYPES[GGMLType.F16], buffer=buffer, offset=0, ne=ne, nb=nb,
                        shape=(ne[3], ne[2], ne[1], ne[0]), strides=(nb[3], nb[2], nb[1], nb[0]))
    b = rng.standard_normal((1, 4 * n_kv_heads, tokens, ne[0])).astype(np.float32)
    out = CpuArrayLib(2).batched_product(None, a, b)
    if case == "too-many-rows":
        assert out is None
        return
    w = view.astype(np.float64)  # (heads, M, K)
    exact = np.stack([b[0, i].astype(np.float64) @ w[i // 4].T for i in range(b.shape[1])])[None]
    assert out.shape == exact.shape
    assert np.sum((out - exact) ** 2) / np.sum(exact ** 2) < 1e-10


def test_a_running_compilation_is_not_waited_for():
    """While a compilation holds the kernels' lock (as the warmer does, for seconds),
    launch(wait=False) of a kernel that is not ready returns False at once and queues it,
    instead of waiting to load it; the warmer then makes it ready."""
    from rpcserver_cpu.kernels import launch as kernel_launch

    t = int(GGMLType.Q4_1)
    raw, wf = _weights(t, 4, 64, seed=9)
    w = np.zeros((4, 2 * raw.shape[1]), np.uint8)[:, ::2]  # strided rows and bytes: layout A
    w[...] = raw
    x = np.ones((1, 128), np.float32)[:, ::2]
    xs = np.full((1, 8), 16, np.float32)[:, ::2]
    out = np.zeros((1, 4), np.float32)
    assert not kernel_launch.is_ready(kernels.mul_mat_vec, t, w, x, xs, out)
    with kernel_launch._compile_lock:  # not reentrant: waiting for it here would hang
        ran = launch(kernels.mul_mat_vec, t, w, x, xs, out, wait=False)
    assert ran is False and np.all(out == 0)
    assert kernel_launch.WARMER.wait(timeout=600)
    assert launch(kernels.mul_mat_vec, t, w, x, xs, out, wait=False) is True
    np.testing.assert_allclose(out[0], wf.sum(axis=1), rtol=1e-5)



_RELEASE = r"""
import json, numpy as np
from rpcserver_cpu import kernels
from rpcserver_cpu.kernels.launch import WARMER, launch, prepare_runtime, release_compiler_pages

prepare_runtime()  # what the CPU device does at its first allocation
assert WARMER.wait(timeout=600)  # the runtime is loaded, then LLVM's pages are handed back
x = np.arange(64, dtype=np.float32).reshape(2, 32)
out = np.zeros((2, 2), np.float32)
launch(kernels.sums_of_16, None, x, out)  # loaded by the warmer: runs
advised = release_compiler_pages()
out2 = np.zeros((2, 2), np.float32)
launch(kernels.sums_of_16, None, x, out2)  # and again after its pages were handed back
print(json.dumps(dict(advised=advised, out=out.tolist(), out2=out2.tolist())))
"""


def test_llvms_code_is_handed_back_and_kernels_keep_running():
    """release_compiler_pages finds libllvmlite's text mappings (tens of MiB) and advises
    them; kernels loaded before run correctly afterwards (LLVM's pages come back from the
    file when needed)."""
    import json
    import subprocess
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("MADV_PAGEOUT and /proc/self/maps are Linux's")
    p = subprocess.run([sys.executable, "-c", _RELEASE], capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["advised"] > 10 << 20, r
    want = [[sum(range(16)), sum(range(16, 32))], [sum(range(32, 48)), sum(range(48, 64))]]
    assert r["out"] == want and r["out2"] == want


def _resident_kib(path) -> int:
    """Resident KiB of this process's mappings of ``path`` (/proc/self/smaps)."""
    total, current = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:  # a mapping's first line
                current = len(head) == 6 and head[5] == str(path)
            elif current and head[0] == "Rss:":
                total += int(head[1])
    return total


def test_read_only_code_pages_are_handed_back(tmp_path):
    """release_text_pages on a file mapped read-only and executable, as a library's code is:
    its resident pages (the kernel's own count, /proc/self/smaps) go from all 16 MiB to
    almost none, and reading the mapping again gives the file's bytes."""
    import mmap
    import sys

    from rpcserver_cpu.kernels.launch import release_text_pages

    if not sys.platform.startswith("linux"):
        pytest.skip("MADV_PAGEOUT and /proc/self/smaps are Linux's")
    data = np.random.default_rng(1).integers(0, 256, 16 << 20, dtype=np.uint8).tobytes()
    path = (tmp_path / "code.bin").resolve()
    path.write_bytes(data)
    with open(path, "rb") as f:
        try:
            m = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                          prot=mmap.PROT_READ | mmap.PROT_EXEC)
        except OSError as exc:
            pytest.skip(f"cannot map a file executable under {tmp_path}: {exc}")
    try:
        assert _sha256(m) == _sha256(data)  # reads every page: all resident
        assert _resident_kib(path) >= 15 << 10
        assert release_text_pages(str(path)) == len(data)
        assert _resident_kib(path) < 1 << 10
        assert _sha256(m) == _sha256(data)
    finally:
        m.close()


def _sha256(buf) -> str:
    import hashlib

    return hashlib.sha256(buf).hexdigest()


def test_a_decode_steps_small_ops_run_in_the_cpu_kernels(monkeypatch):
    """The small ops of a llama decode step -- RMS_NORM, MUL, ADD, ROPE (NEOX), SOFT_MAX with
    an F16 mask, SWIGLU, SET_ROWS into an F16 cache -- built with ggml's constructors and
    computed on the CPU device: each is taken by the device's own kernel (its op_overrides
    entry reports it computed the node, so no shared fallback hides a regression), and the
    results match ggml's CPU backend with NMSE below 1e-10 (SET_ROWS' F16 rows bit for bit:
    the same round-to-nearest-even conversion)."""
    from collections import Counter

    import ggml_harness as H
    from ggml_harness import F16, F32, I32, I64, GgmlCase, c_float, c_int, c_int64, c_void_p, fn

    from rpcserver_cpu import ops as cpu_ops

    H.require_ggml()
    taken = Counter()
    for op, impl in list(cpu_ops.OVERRIDES.items()):
        def counted(ctx, impl=impl):
            ok = impl(ctx)
            taken[impl.__name__] += 1 if ok else 0
            return ok
        monkeypatch.setitem(cpu_ops.OVERRIDES, op, counted)

    V = c_void_p
    n_embd, n_head, head_dim, n_kv, n_ff = 256, 4, 64, 40, 384
    causal = np.zeros((1, n_kv), np.float32)
    causal[0, 30:] = -np.inf  # positions not yet written
    with GgmlCase(seed=11) as case:
        x = case.new_tensor(F32, (n_embd, 1))
        norm_w = case.new_tensor(F32, (n_embd,))
        h = fn("ggml_mul", V, V, V, V)(
            case.ctx, fn("ggml_rms_norm", V, V, V, c_float)(case.ctx, x, 1e-5), norm_w)
        q = fn("ggml_reshape_3d", V, V, V, c_int64, c_int64, c_int64)(case.ctx, h, head_dim,
                                                                      n_head, 1)
        pos = case.new_tensor(I32, (1,), fill=lambda rng, ne: [29])
        q = fn("ggml_rope_ext", V, V, V, V, V, c_int, c_int, c_int, c_float, c_float, c_float,
               c_float, c_float, c_float)(case.ctx, q, pos, None, head_dim, 2, 4096, 10000.0,
                                          1.0, 0.0, 1.0, 32.0, 1.0)
        kq = case.new_tensor(F32, (n_kv, 1, n_head))
        mask = case.new_tensor(F16, (n_kv, 1), fill=lambda rng, ne: causal)
        probs = fn("ggml_soft_max_ext", V, V, V, V, c_float, c_float)(case.ctx, kq, mask,
                                                                        0.125, 0.0)
        gate, up = case.new_tensor(F32, (n_ff, 1)), case.new_tensor(F32, (n_ff, 1))
        act = fn("ggml_swiglu_split", V, V, V, V)(case.ctx, gate, up)
        residual = fn("ggml_add", V, V, V, V)(case.ctx, h, x)
        cache = case.new_tensor(F16, (n_embd, 16))
        row = case.new_tensor(I64, (1,), fill=lambda rng, ne: [5])
        stored = fn("ggml_set_rows", V, V, V, V, V)(case.ctx, cache, residual, row)
        outs = [case.mark_output(t) for t in (q, probs, act, stored)]
        ref = case.run(outs)
        ours = case.run_ours(H.cpu_device())
        for r, o in zip(ref.arrays, ours.arrays):
            H.assert_close(r, o, 1e-10)
        np.testing.assert_array_equal(ref.array(stored, native=True),
                                      ours.array(stored, native=True))
    assert set(taken) == {"rms_norm", "binary", "rope", "soft_max", "glu", "set_rows"}, taken
    assert taken["binary"] == 2 and all(taken.values()), taken


def test_a_buffer_a_kernel_read_is_unmapped_when_freed():
    """Nothing keeps a view of the arrays of the last kernel that ran: a buffer freed after a
    kernel read it on two threads is unmapped at once, so its memory goes back to the system
    (a kept view would hold the map until the next kernel)."""
    import ggml_harness as H

    # the suite's CPU device: constructing a second CpuDevice here (it sets threadpool_limits
    # again) made every later ggml reference run in a forked child hang
    buf = H.cpu_device().alloc_buffer(1024 * 256 * 4)
    w = np.ndarray((1024, 256), np.float32, buffer=buf.array)
    w[...] = 1.0
    x = np.ones((1, 256), np.float32)
    out = np.zeros((1, 1024), np.float32)
    launch(kernels.mul_mat_f32, None, w, x, out, threads=2)
    assert np.all(out == 256)
    del w
    mapping = buf._map
    buf.free()
    assert mapping.closed
