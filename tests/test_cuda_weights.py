"""The CUDA plugin keeps weights in their ggml type (``CudaArrayLib.weight_product``, scratch).

* Decode (at most ``MMV_MAX_COLS`` columns): MUL_MAT and each expert of MUL_MAT_ID go through
  ``CudaArrayLib.weight_product`` to the weight type's fused ``rpc_mul_mat_vec`` kernel, which
  reads the blocks in place: no dequantization kernel runs, no scratch is taken.
* Prompt-size products: ``weight_product`` declines, the shared code widens the weight a tile
  of rows at a time (the type's dequantize kernel) and multiplies with cuBLAS; with the
  scratch budget squeezed to a few rows the result is still right (against NumPy on the
  same weights) and the scratch held never exceeds the budget.
* ``CudaDevice.scratch_bytes`` and the free memory GET_DEVICE_MEMORY reports.

Each test runs on ``CUDA-host`` (the plugin on the NumPy-backed CuPy of cuda_standin.py, kernel
launches counted) and, where there is one, on the real ``CUDA0``.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest

from rpcserver import ggml
from rpcserver.client import RpcClient
from rpcserver.device_state import DeviceState, state_of
from rpcserver.server import Server

from cuda_standin import NumpyCupy, cuda, fake_device, launches  # noqa: F401  (fixture)

from rpcserver_cuda import kernels, ops  # noqa: E402
from rpcserver_cuda.device import SCRATCH_MAX, SCRATCH_MIN, scratch_bytes_for  # noqa: E402

MIB, GIB = 1 << 20, 1 << 30


def _G(name):
    import ggml_harness as H
    from ggml_harness import c_void_p

    sigs = {"ggml_mul_mat": (c_void_p, c_void_p, c_void_p, c_void_p),
            "ggml_mul_mat_id": (c_void_p, c_void_p, c_void_p, c_void_p, c_void_p)}
    return H.fn(name, *sigs[name])


def _type(name: str) -> int:
    return ggml.TYPES_BY_NAME[name].value


def _on_standin(device) -> bool:
    return isinstance(device.cupy, NumpyCupy)


@pytest.fixture
def products(monkeypatch):
    """Every call the shared code makes to ``CudaArrayLib.weight_product``'s kernel path, as
    (weight type, activation shape, whether the fused kernel took it)."""
    calls = []
    real = ops.mul_mat_vec

    def spy(ctx, w, b):
        out = real(ctx, w, b)
        calls.append((ggml.TYPES[w.type.value].name, tuple(b.shape), out is not None))
        return out

    monkeypatch.setattr(ops, "mul_mat_vec", spy)
    return calls


@contextmanager
def scratch(device, budget: int | None = None):
    """The device's scratch record with its peak reset (and its budget set to ``budget``);
    both restored afterwards."""
    state = state_of(device)
    saved = state.scratch_budget, state.scratch_peak
    state.scratch_peak = 0
    if budget is not None:
        state.scratch_budget = budget
    try:
        yield state
    finally:
        state.scratch_budget, state.scratch_peak = saved


def _mul_mat_case(device, wtype: int, k: int, m: int, b_ne, seed: int):
    """MUL_MAT of a (k, m) ``wtype`` weight by F32 ``b_ne`` on ``device``; returns
    (ours, NumPy's float64 product of the same weights and activations)."""
    import ggml_harness as H

    H.require_ggml()
    with H.GgmlCase(seed=seed) as case:
        w = case.new_tensor(wtype, (k, m))
        b = case.new_tensor(H.F32, b_ne)
        out = case.mark_output(_G("ggml_mul_mat")(case.ctx, w, b))
        ref = case.run([out])
        ours = case.run_ours(device).arrays[0]
        wf = ref.input(w)[0, 0].astype(np.float64)  # (m, k): the weights as ggml decodes them
        bf = ref.input(b).astype(np.float64)  # (ne3, ne2, n, k)
    return ours, bf @ wf.T


def _assert_matches(ours, want):
    err = np.sum((ours.astype(np.float64) - want) ** 2) / np.sum(want ** 2)
    assert err < 1e-10, f"nmse {err:.3g} against NumPy"


# ============================================================================ decode: fused kernel

DECODE_TYPES = ["Q4_0", "Q5_1", "Q8_0", "Q2_K", "Q4_K", "Q6_K", "IQ4_XS", "MXFP4"]


@pytest.mark.parametrize("n", [1, kernels.MMV_MAX_COLS], ids=["vec", "max-cols"])
@pytest.mark.parametrize("wtype", DECODE_TYPES)
def test_decode_mul_mat_reads_quantized_weights_in_place(cuda, products, wtype, n):
    """At most MMV_MAX_COLS columns: weight_product runs the fused kernel on the blocks as they
    are; nothing is dequantized and no scratch is taken."""
    spec = kernels.QUANT_SPECS[wtype]
    with scratch(cuda) as state:
        ours, want = _mul_mat_case(cuda, spec.value, 512, 48, (512, n), seed=n)
        assert state.scratch_peak == 0, "a weight was widened into scratch"
    _assert_matches(ours, want)
    assert products == [(wtype, (1, 1, n, 512), True)]
    if _on_standin(cuda):
        assert launches(cuda, spec.mul_mat_vec_kernel) == 1
        assert launches(cuda, spec.dequantize_kernel) == -1, "the weights were dequantized"


def test_one_column_past_the_kernel_goes_to_tiles_and_cublas(cuda, products):
    """MMV_MAX_COLS + 1 columns: weight_product declines (None) and the shared code tiles."""
    spec = kernels.QUANT_SPECS["Q4_K"]
    n = kernels.MMV_MAX_COLS + 1
    with scratch(cuda) as state:
        ours, want = _mul_mat_case(cuda, spec.value, 512, 48, (512, n), seed=3)
        assert 0 < state.scratch_peak <= state.scratch_budget
        assert state.scratch_in_use == 0
    _assert_matches(ours, want)
    assert products == [("Q4_K", (1, 1, n, 512), False)]
    if _on_standin(cuda):
        assert launches(cuda, spec.mul_mat_vec_kernel) == -1
        assert launches(cuda, spec.dequantize_kernel) == 1  # 48 rows: one tile


@pytest.mark.parametrize("kernels_env, fused", [("dequantize", False), ("mul_mat_vec", True),
                                                ("none", False)])
def test_the_mul_mat_vec_switch_still_applies(cuda, products, monkeypatch, kernels_env, fused):
    """RPCSERVER_CUDA_KERNELS without ``mul_mat_vec``: decode takes the tiled path (and still
    computes the right thing); with only ``mul_mat_vec``, decode stays fused."""
    monkeypatch.setenv("RPCSERVER_CUDA_KERNELS", kernels_env)
    spec = kernels.QUANT_SPECS["Q8_0"]
    ours, want = _mul_mat_case(cuda, spec.value, 256, 40, (256, 1), seed=5)
    _assert_matches(ours, want)
    assert products == [("Q8_0", (1, 1, 1, 256), fused)]
    if _on_standin(cuda):
        assert launches(cuda, spec.mul_mat_vec_kernel) == (1 if fused else -1)
        # the dequantize kernel only where the tiles are widened on the device
        assert (launches(cuda, spec.dequantize_kernel) == 1) is (kernels_env == "dequantize")


def _moe_case(device, wtype: int, k: int, m: int, n_expert: int, n_b: int, ids):
    """MUL_MAT_ID of (k, m, n_expert) experts; ``ids``: (n_tokens, n_used) expert numbers.
    Returns (ours, NumPy's float64 product)."""
    import ggml_harness as H

    H.require_ggml()
    ids = np.asarray(ids, np.int32)
    n_tokens, n_used = ids.shape
    with H.GgmlCase(seed=11) as case:
        experts = case.new_tensor(wtype, (k, m, n_expert))
        b = case.new_tensor(H.F32, (k, n_b, n_tokens))
        ids_t = case.new_tensor(H.I32, (n_used, n_tokens), fill=ids.reshape(-1))
        out = case.mark_output(_G("ggml_mul_mat_id")(case.ctx, experts, b, ids_t))
        ref = case.run([out])
        ours = case.run_ours(device).arrays[0][0]  # (n_tokens, n_used, m)
        ef = ref.input(experts)[0].astype(np.float64)  # (n_expert, m, k)
        bf = ref.input(b)[0].astype(np.float64)  # (n_tokens, n_b, k)
    want = np.empty((n_tokens, n_used, m))
    for t in range(n_tokens):
        for s in range(n_used):
            want[t, s] = ef[ids[t, s]] @ bf[t, s % n_b]
    return ours, want


@pytest.mark.parametrize("n_tokens", [1, 4])
def test_moe_decode_multiplies_each_expert_with_the_fused_kernel(cuda, products, n_tokens):
    """MUL_MAT_ID for a token (or a few): every chosen expert goes through weight_product to
    the fused kernel, one launch per expert; experts nobody chose are never read."""
    spec = kernels.QUANT_SPECS["Q4_K"]
    rng = np.random.default_rng(n_tokens)
    ids = np.stack([rng.choice(8, 2, replace=False) for _ in range(n_tokens)])
    with scratch(cuda) as state:
        ours, want = _moe_case(cuda, spec.value, 256, 64, 8, 1, ids)
        assert state.scratch_peak == 0
    _assert_matches(ours, want)
    chosen = np.unique(ids)
    assert len(products) == len(chosen) and all(p[0] == "Q4_K" and p[2] for p in products)
    assert sum(p[1][0] for p in products) == ids.size  # each (token, slot) pair once
    if _on_standin(cuda):
        assert launches(cuda, spec.mul_mat_vec_kernel) == len(chosen)
        assert launches(cuda, spec.dequantize_kernel) == -1


# ============================================================================ prompt: tiles in scratch

PROMPT_TYPES = ["Q4_K", "Q8_0", "IQ4_NL", "F16", "BF16", "IQ2_XXS"]


@pytest.mark.parametrize("wtype", PROMPT_TYPES)
def test_prompt_product_tiles_within_a_tiny_scratch_budget(cuda, products, wtype):
    """A prompt-size product with the budget squeezed to 8 widened rows: 13 tiles of a 100-row
    weight, each widened and multiplied on its own; the result matches NumPy and the scratch
    held never exceeded the budget. (IQ2_XXS has no kernel: its tiles are widened on the host.)"""
    k, m, rows = 512, 100, 8
    t = _type(wtype)
    with scratch(cuda, budget=rows * 4 * k) as state:
        ours, want = _mul_mat_case(cuda, t, k, m, (k, 32, 2), seed=7)
        assert 0 < state.scratch_peak <= state.scratch_budget
        assert state.scratch_in_use == 0
    _assert_matches(ours, want)
    # offered to the kernel, declined (64 columns; F16, BF16 and IQ2_XXS have no kernel)
    assert products == [(wtype, (1, 2, 32, k), False)]
    spec = kernels.QUANT_SPECS.get(wtype)
    if spec is not None and _on_standin(cuda):
        assert launches(cuda, spec.dequantize_kernel) == -(-m // rows)  # one per tile
        assert launches(cuda, spec.mul_mat_vec_kernel) == -1


def test_moe_prompt_mixes_tiles_and_the_fused_kernel_within_the_budget(cuda, products):
    """A prompt through MUL_MAT_ID: experts chosen by many tokens are tiled (within a budget of
    8 rows), the one chosen by three tokens takes the fused kernel."""
    spec = kernels.QUANT_SPECS["Q4_0"]
    k, m, rows = 256, 40, 8
    # token t uses experts (0, 2) for t < 3, else (0, 1): expert 0 has 12 rows, 1 has 9, 2 has 3
    ids = [(0, 2) if t < 3 else (0, 1) for t in range(12)]
    with scratch(cuda, budget=rows * 4 * k) as state:
        ours, want = _moe_case(cuda, spec.value, k, m, 4, 2, ids)
        assert 0 < state.scratch_peak <= state.scratch_budget
        assert state.scratch_in_use == 0
    _assert_matches(ours, want)
    assert sorted((p[1][0], p[2]) for p in products) == [(3, True), (9, False), (12, False)]
    if _on_standin(cuda):
        assert launches(cuda, spec.mul_mat_vec_kernel) == 1
        assert launches(cuda, spec.dequantize_kernel) == 2 * (-(-m // rows))  # two tiled experts


# ============================================================================ scratch and memory


def test_scratch_budget_suits_the_gpu(monkeypatch):
    """1/16 of the card, within [256 MiB, 2 GiB]; RPCSERVER_SCRATCH_MIB still wins."""
    assert (SCRATCH_MIN, SCRATCH_MAX) == (256 * MIB, 2 * GIB)
    assert scratch_bytes_for(2 * GIB) == 256 * MIB
    assert scratch_bytes_for(4 * GIB) == 256 * MIB
    assert scratch_bytes_for(8 * GIB) == 512 * MIB
    assert scratch_bytes_for(24 * GIB) == 1536 * MIB
    assert scratch_bytes_for(80 * GIB) == 2 * GIB
    assert scratch_bytes_for(141 * GIB) == 2 * GIB
    monkeypatch.delenv("RPCSERVER_SCRATCH_MIB", raising=False)
    dev = fake_device(capacity=8 * GIB)
    assert dev.scratch_bytes == 512 * MIB
    assert DeviceState(dev).scratch_budget == 512 * MIB
    monkeypatch.setenv("RPCSERVER_SCRATCH_MIB", "48")
    assert DeviceState(dev).scratch_budget == 48 * MIB


def test_reported_free_memory_is_allocatable_after_products(cuda):
    """GET_DEVICE_MEMORY's free figure, taken after prompt-size products left their scratch in
    CuPy's pool, can be allocated by the client, and scratch for the next op still fits beside
    it (the device's own figure is the reported one plus the scratch budget)."""
    spec = kernels.QUANT_SPECS["Q4_K"]
    ours, want = _mul_mat_case(cuda, spec.value, 1024, 512, (1024, 64), seed=9)
    _assert_matches(ours, want)
    if not _on_standin(cuda):
        # what a large model's prompt products leave in CuPy's pool: blocks of a few GiB
        with cuda.activate():
            held = cuda.cupy.empty(4 * GIB, dtype=cuda.cupy.uint8)
            del held
            assert cuda.cupy.get_default_memory_pool().free_bytes() >= 4 * GIB
    state = state_of(cuda)
    srv = Server([cuda], host="127.0.0.1", port=0).start()
    try:
        with RpcClient(port=srv.port) as c:
            free, total = c.get_device_memory(0)
            dev_free, dev_total = cuda.memory()
            assert total == dev_total and 0 < free <= total
            if _on_standin(cuda):  # nothing else allocates: the figures are exact
                assert free == dev_free - state.scratch_budget
            else:
                assert abs(dev_free - state.scratch_budget - free) < 64 * MIB
            take = free - 64 * MIB  # (a little room for what the driver may take meanwhile)
            handle, size = c.alloc_buffer(0, take)
            assert handle != 0 and size == take, "the free memory reported could not be allocated"
            after, _ = cuda.memory()
            assert after >= state.scratch_budget, "no room left for the next op's scratch"
            c.free_buffer(handle)
            c.sync()
    finally:
        srv.stop()


class _FakePool:
    """CuPy's memory pool holding ``held`` bytes of unused blocks (counted as allocated)."""

    def __init__(self, cupy, held):
        self.cupy, self.held = cupy, held
        cupy.allocated += held
        self.released = 0

    def free_bytes(self):
        return self.held

    def free_all_blocks(self):
        self.cupy.allocated -= self.held
        self.released += self.held
        self.held = 0


def test_alloc_buffer_hands_the_pools_unused_blocks_back_when_needed(monkeypatch):
    """memory() counts the pool's unused blocks as free; a buffer that only fits once they are
    returned to the driver is allocated (the pool is emptied first), not refused."""
    dev = fake_device(capacity=64 * MIB)
    pool = _FakePool(dev.cupy, 40 * MIB)
    monkeypatch.setattr(dev.cupy, "get_default_memory_pool", lambda: pool, raising=False)
    assert dev.memory() == (64 * MIB, 64 * MIB)
    small = dev.alloc_buffer(8 * MIB)  # fits beside the pool: the pool is left alone
    assert small is not None and pool.released == 0
    big = dev.alloc_buffer(48 * MIB)  # fits only without the pool's blocks
    assert big is not None and pool.released == 40 * MIB
    assert dev.memory() == (8 * MIB, 64 * MIB)
    assert dev.alloc_buffer(16 * MIB) is None  # truly out of memory: an answer, not an error
    big.free()
    small.free()
