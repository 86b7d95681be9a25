"""Conformance of rpcserver's MoE and miscellaneous ops against ggml's CPU backend.

Each test builds the op with ggml's own constructor (through tests/ggml_harness.py),
computes it on ggml's CPU backend, replays the identical graph through rpcserver's
parser and executor, and compares: exactly (bit for bit) for ops that only move,
select or generate data and for integer outputs, by normalized MSE otherwise.
"""

from __future__ import annotations

from ctypes import c_uint32

import numpy as np
import pytest

import ggml_harness as H
from ggml_harness import (F16, F32, I32, Q4_0, Q8_0, GgmlCase, T, assert_close, c_bool, c_float,
                          c_int, c_int64, c_size_t, c_void_p, fn)

# every test runs on each device of ggml_harness.DEVICE_NAMES (the `device` fixture, conftest.py)
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"), pytest.mark.usefixtures("device")]



@pytest.fixture(scope="module", autouse=True)
def _ggml():
    H.require_ggml()


def g(name, *more):
    """ggml op constructor ``name(ctx, a, *more) -> ggml_tensor *`` (``more``: ctypes types)."""
    return fn(name, c_void_p, c_void_p, c_void_p, *more)


def run_both(case, outputs, fills=None, native=True):
    """Run ggml then rpcserver; returns ([ref arrays], [our arrays]) for ``outputs``."""
    ref = case.run(outputs, fills)
    ours = case.run_ours(native=native)
    return [ref.array(t, native=native) for t in outputs], ours.arrays


def check_exact(case, out, fills=None):
    (r,), (o,) = run_both(case, [out], fills)
    assert r.dtype == o.dtype and r.shape == o.shape
    np.testing.assert_array_equal(o, r, err_msg=H.op_name(out))
    return r


def check_close(case, out, max_nmse=1e-7, fills=None):
    (r,), (o,) = run_both(case, [out], fills, native=False)
    assert_close(r, o, max_nmse, what=H.op_name(out))
    return r


def distinct(rng, ne):
    """Row-wise distinct floats (no ties anywhere): a random permutation of spaced values."""
    n = int(np.prod(ne))
    return rng.permutation(n).astype(np.float32) * 0.01 - n * 0.005


# =========================================================================== MUL_MAT_ID


def _expert_ids(rng, n_expert, n_used, n_tokens):
    return np.stack([rng.choice(n_expert, n_used, replace=False) for _ in range(n_tokens)])


@pytest.mark.parametrize("wtype,max_nmse", [(F32, 1e-9), (F16, 1e-6), (Q8_0, 2e-4), (Q4_0, 5e-4)],
                         ids=["f32", "f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("n_tokens", [1, 16])
@pytest.mark.parametrize("b_rows", ["per_slot", "broadcast"])
def test_mul_mat_id(wtype, max_nmse, n_tokens, b_rows):
    n_expert, n_used, k, m = 8, 2, 64, 48
    n_b = n_used if b_rows == "per_slot" else 1
    mul_mat_id = g("ggml_mul_mat_id", c_void_p, c_void_p)
    with GgmlCase(seed=n_tokens) as case:
        as_ = case.new_tensor(wtype, (k, m, n_expert))
        b = case.new_tensor(F32, (k, n_b, n_tokens))
        ids = case.new_tensor(I32, (n_used, n_tokens),
                              fill=_expert_ids(case.rng, n_expert, n_used, n_tokens))
        out = case.mark_output(mul_mat_id(case.ctx, as_, b, ids))
        assert list(T(out).ne) == [m, n_used, n_tokens, 1]
        ref = check_close(case, out, max_nmse)
        assert np.abs(ref).max() > 0


def test_mul_mat_id_more_slots_than_b_rows_and_strided_b():
    """n_expert_used=4 over b with 2 rows per token (slot e reads b row e % 2); b is a strided view."""
    n_expert, n_used, n_b, n_tokens, k, m = 8, 4, 2, 5, 32, 16
    mul_mat_id = g("ggml_mul_mat_id", c_void_p, c_void_p)
    with GgmlCase(seed=7) as case:
        as_ = case.new_tensor(F32, (k, m, n_expert))
        b = case.strided(F32, (k, n_b, n_tokens), pad=(0, 1, 1, 0))
        ids = case.new_tensor(I32, (n_used, n_tokens),
                              fill=_expert_ids(case.rng, n_expert, n_used, n_tokens))
        out = case.mark_output(mul_mat_id(case.ctx, as_, b, ids))
        check_close(case, out, 1e-9)


def test_mul_mat_id_all_tokens_one_expert_and_repeated_ids():
    n_expert, n_used, n_tokens, k, m = 8, 2, 6, 32, 8
    mul_mat_id = g("ggml_mul_mat_id", c_void_p, c_void_p)
    ids_val = np.array([[3, 3]] * 3 + [[3, 5]] * 3)
    with GgmlCase(seed=8) as case:
        as_ = case.new_tensor(Q8_0, (k, m, n_expert))
        b = case.new_tensor(F32, (k, n_used, n_tokens))
        ids = case.new_tensor(I32, (n_used, n_tokens), fill=ids_val)
        out = case.mark_output(mul_mat_id(case.ctx, as_, b, ids))
        check_close(case, out, 2e-4)


# =========================================================================== ADD_ID


@pytest.mark.parametrize("shape", [(16, 2, 1), (16, 4, 7), (33, 3, 5), (8, 3, 2, 2)])
def test_add_id(shape):
    ne0, ne1, ne2 = shape[:3]
    n_rows = 6
    add_id = g("ggml_add_id", c_void_p, c_void_p)
    with GgmlCase(seed=3) as case:
        a = case.new_tensor(F32, shape)
        b = case.new_tensor(F32, (ne0, n_rows))
        ids = case.new_tensor(I32, (ne1, ne2),
                              fill=lambda rng, ne: rng.integers(0, n_rows, ne1 * ne2))
        out = case.mark_output(add_id(case.ctx, a, b, ids))
        check_close(case, out, 0.0)


# =========================================================================== ARGSORT / TOP_K


@pytest.mark.parametrize("order", [0, 1], ids=["asc", "desc"])
@pytest.mark.parametrize("shape", [(8,), (10, 3), (37, 4, 2), (300, 5), (1024, 2, 1, 2)])
def test_argsort(order, shape):
    with GgmlCase(seed=4) as case:
        a = case.new_tensor(F32, shape, fill=distinct)
        out = case.mark_output(g("ggml_argsort", c_int)(case.ctx, a, order))
        r = check_exact(case, out)
        assert r.dtype == np.int32


@pytest.mark.parametrize("order", [0, 1], ids=["asc", "desc"])
def test_argsort_ties_short_rows(order):
    """Rows of <= 16 elements: ggml's std::sort is an insertion sort, ties keep index order."""
    with GgmlCase(seed=5) as case:
        a = case.new_tensor(F32, (16, 12), fill=lambda rng, ne: rng.integers(0, 4, 16 * 12))
        out = case.mark_output(g("ggml_argsort", c_int)(case.ctx, a, order))
        check_exact(case, out)


def test_argsort_noncontiguous_source():
    with GgmlCase(seed=6) as case:
        a = case.strided(F32, (20, 3, 2), pad=(3, 1, 1, 0), fill=distinct)
        out = case.mark_output(g("ggml_argsort", c_int)(case.ctx, a, 1))
        check_exact(case, out)


@pytest.mark.parametrize("n,k", [(20, 1), (20, 2), (20, 5), (20, 20), (100, 8), (1000, 40), (5000, 3)])
def test_top_k(n, k):
    with GgmlCase(seed=n + k) as case:
        a = case.new_tensor(F32, (n, 3, 2), fill=distinct)
        out = case.mark_output(g("ggml_top_k", c_int)(case.ctx, a, k))
        assert list(T(out).ne) == [k, 3, 2, 1] and T(out).type == I32
        r = check_exact(case, out)
        # the semantics, spelled out: the k largest, descending, first two swapped
        x = case.ref.input(a)
        expect = np.argsort(-x, axis=-1, kind="stable")[..., :k]
        if k > 1:
            expect[..., [0, 1]] = expect[..., [1, 0]]
        np.testing.assert_array_equal(r, expect)


# =========================================================================== REPEAT


@pytest.mark.parametrize("type_", [F32, F16, I32], ids=["f32", "f16", "i32"])
@pytest.mark.parametrize("src,dst", [
    ((5, 3, 1, 1), (5, 3, 1, 1)),
    ((5, 3, 1, 1), (10, 3, 1, 1)),
    ((5, 1, 2, 1), (15, 4, 2, 3)),
    ((1, 1, 1, 1), (7, 2, 3, 2)),
    ((4, 2, 3, 2), (8, 4, 6, 4)),
])
def test_repeat(type_, src, dst):
    with GgmlCase(seed=9) as case:
        fill = (lambda rng, ne: rng.integers(-1000, 1000, int(np.prod(ne)))) if type_ == I32 else None
        a = case.new_tensor(type_, src, fill=fill)
        out = case.mark_output(g("ggml_repeat_4d", c_int64, c_int64, c_int64, c_int64)(
            case.ctx, a, *dst))
        check_exact(case, out)


def test_repeat_strided_source():
    # (ggml's REPEAT needs nb[0] == element size: a view with gaps between rows, not a transpose)
    with GgmlCase(seed=10) as case:
        a = case.strided(F32, (6, 4, 2), pad=(2, 1, 1, 0))
        out = case.mark_output(g("ggml_repeat_4d", c_int64, c_int64, c_int64, c_int64)(
            case.ctx, a, 12, 8, 2, 3))
        check_exact(case, out)


# =========================================================================== CONCAT


@pytest.mark.parametrize("dim", [0, 1, 2, 3])
@pytest.mark.parametrize("type_", [F32, F16, I32, Q8_0], ids=["f32", "f16", "i32", "q8_0"])
def test_concat(dim, type_):
    a_ne = [64, 3, 2, 2]
    b_ne = list(a_ne)
    b_ne[dim] = 32 if dim == 0 else a_ne[dim] + 1
    concat = g("ggml_concat", c_void_p, c_int)
    with GgmlCase(seed=11 + dim) as case:
        fill = (lambda rng, ne: rng.integers(-99, 99, int(np.prod(ne)))) if type_ == I32 else None
        a = case.new_tensor(type_, a_ne, fill=fill)
        b = case.new_tensor(type_, b_ne, fill=fill)
        out = case.mark_output(concat(case.ctx, a, b, dim))
        check_exact(case, out)


@pytest.mark.parametrize("dim", [0, 1, 2])
def test_concat_noncontiguous_f32(dim):
    concat = g("ggml_concat", c_void_p, c_int)
    with GgmlCase(seed=12) as case:
        a = case.permuted(F32, (5, 4, 3), (1, 0, 2, 3))
        ne = [5, 4, 3]
        ne[dim] += 2
        b = case.strided(F32, ne)
        out = case.mark_output(concat(case.ctx, a, b, dim))
        check_exact(case, out)


# =========================================================================== FILL / ARANGE


@pytest.mark.parametrize("type_", [F32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("value", [0.0, -1.5, 3.14159, 1e-8])
def test_fill(type_, value):
    with GgmlCase() as case:
        a = case.new_tensor(type_, (17, 3, 2))
        out = case.mark_output(fn("ggml_fill", c_void_p, c_void_p, c_void_p, c_float)(
            case.ctx, a, value))
        check_exact(case, out)


@pytest.mark.parametrize("start,stop,step", [(0, 10, 1), (-3.5, 7.25, 0.5), (0, 1, 0.1),
                                             (5, 1000, 3.7), (-1, 1, 0.001),
                                             (0.3, 100000, 0.77)])
def test_arange(start, stop, step):
    arange = fn("ggml_arange", c_void_p, c_void_p, c_float, c_float, c_float)
    with GgmlCase() as case:
        out = case.mark_output(arange(case.ctx, start, stop, step))
        check_exact(case, out)  # start + step*i rounded once, like ggml's fused multiply-add


# =========================================================================== best-effort ops


@pytest.mark.parametrize("shape", [(10, 4), (1, 3), (257, 6)])
def test_argmax(shape):
    with GgmlCase(seed=13) as case:
        a = case.new_tensor(F32, shape, fill=distinct)
        out = case.mark_output(g("ggml_argmax")(case.ctx, a))
        check_exact(case, out)


def test_argmax_ties_take_the_last_index():
    with GgmlCase() as case:
        rows = [[1, 5, 5, 2, 5, 0], [-np.inf] * 6, [3, 3, 1, 0, 0, 0]]
        a = case.new_tensor(F32, (6, 3), fill=np.float32(rows))
        out = case.mark_output(g("ggml_argmax")(case.ctx, a))
        r = check_exact(case, out)
        assert list(r.reshape(-1)) == [4, 5, 1]


@pytest.mark.parametrize("shape", [(100,), (30, 4), (7, 1, 1), (5, 3, 3)])
def test_count_equal(shape):
    n = int(np.prod(shape))
    with GgmlCase(seed=14) as case:
        a = case.new_tensor(I32, shape, fill=lambda rng, ne: rng.integers(0, 3, n))
        b = case.new_tensor(I32, shape, fill=lambda rng, ne: rng.integers(0, 3, n))
        out = case.mark_output(g("ggml_count_equal", c_void_p)(case.ctx, a, b))
        r = check_exact(case, out)
        x, y = case.ref.input(a), case.ref.input(b)
        assert int(r.reshape(-1)[0]) == int((x == y).sum())


@pytest.mark.parametrize("shape", [(64, 3), (1000, 2, 2)])
def test_cumsum(shape):
    with GgmlCase(seed=15) as case:
        a = case.new_tensor(F32, shape)
        out = case.mark_output(g("ggml_cumsum")(case.ctx, a))
        check_close(case, out, 1e-12)


@pytest.mark.parametrize("kind", [0, 1, 2, 3], ids=["upper_diag", "upper", "lower_diag", "lower"])
def test_tri(kind):
    with GgmlCase(seed=16) as case:
        a = case.new_tensor(F32, (9, 9, 2))
        out = case.mark_output(g("ggml_tri", c_int)(case.ctx, a, kind))
        check_exact(case, out)


@pytest.mark.parametrize("pads", [(0, 3, 0, 0, 0, 0, 0, 0), (1, 2, 3, 0, 0, 1, 2, 1),
                                  (0, 0, 0, 0, 0, 0, 0, 0)])
@pytest.mark.parametrize("circular", [False, True])
def test_pad(pads, circular):
    name = "ggml_pad_ext_circular" if circular else "ggml_pad_ext"
    with GgmlCase(seed=17) as case:
        a = case.new_tensor(F32, (5, 4, 3, 2))
        out = case.mark_output(g(name, *([c_int] * 8))(case.ctx, a, *pads))
        check_exact(case, out)


@pytest.mark.parametrize("op_name", ["ggml_diag_mask_inf", "ggml_diag_mask_zero"])
@pytest.mark.parametrize("n_past", [0, 2])
def test_diag_mask(op_name, n_past):
    with GgmlCase(seed=18) as case:
        a = case.new_tensor(F32, (8, 6, 3))
        out = case.mark_output(g(op_name, c_int)(case.ctx, a, n_past))
        check_exact(case, out)


@pytest.mark.parametrize("shape,groups", [((6, 5, 8, 2), 4), ((7, 3, 10), 3), ((4, 4, 6), 4)])
def test_group_norm(shape, groups):
    with GgmlCase(seed=19) as case:
        a = case.new_tensor(F32, shape)
        out = case.mark_output(g("ggml_group_norm", c_int, c_float)(case.ctx, a, groups, 1e-6))
        check_close(case, out, 1e-10)


@pytest.mark.parametrize("slope", [0.0, 0.01, 0.2])
def test_leaky_relu(slope):
    with GgmlCase(seed=20) as case:
        a = case.new_tensor(F32, (33, 4, 2))
        out = case.mark_output(g("ggml_leaky_relu", c_float, c_bool)(case.ctx, a, slope, False))
        check_exact(case, out)


@pytest.mark.parametrize("op_name", ["ggml_acc", "ggml_set"])
@pytest.mark.parametrize("inplace", [False, True])
def test_acc_and_set(op_name, inplace):
    name = op_name + ("_inplace" if inplace else "")
    with GgmlCase(seed=21) as case:
        a = case.new_tensor(F32, (10, 6, 3))
        b = case.new_tensor(F32, (4, 3, 2))
        nb1, nb2, nb3 = 10 * 4, 10 * 6 * 4, 10 * 6 * 3 * 4
        offset = (2 + 1 * 10) * 4  # element (2, 1, 0)
        out = case.mark_output(g(name, c_void_p, c_size_t, c_size_t, c_size_t, c_size_t)(
            case.ctx, a, b, nb1, nb2, nb3, offset))
        check_exact(case, out)


def test_set_i32():
    with GgmlCase(seed=22) as case:
        a = case.new_tensor(I32, (8, 4), fill=lambda rng, ne: rng.integers(0, 100, 32))
        b = case.new_tensor(I32, (3, 2), fill=lambda rng, ne: rng.integers(-100, 0, 6))
        out = case.mark_output(g("ggml_set", c_void_p, c_size_t, c_size_t, c_size_t, c_size_t)(
            case.ctx, a, b, 8 * 4, 32 * 4, 32 * 4, 4))
        check_exact(case, out)


@pytest.mark.parametrize("type_", [F32, F16], ids=["f32", "f16"])
def test_get_rows_back(type_):
    with GgmlCase(seed=23) as case:
        grad = case.new_tensor(type_, (12, 9))
        rows = case.new_tensor(I32, (9,), fill=np.array([0, 3, 3, 5, 1, 3, 0, 6, 5]))
        shape_of = case.new_tensor(F32, (12, 7))
        out = case.mark_output(g("ggml_get_rows_back", c_void_p, c_void_p)(
            case.ctx, grad, rows, shape_of))
        check_exact(case, out)


@pytest.mark.parametrize("shifts", [(0, 0, 0, 0), (2, -1, 1, 0), (-4, 2, -2, 1)])
def test_roll(shifts):
    with GgmlCase(seed=24) as case:
        a = case.new_tensor(F32, (6, 4, 3, 2))
        out = case.mark_output(g("ggml_roll", c_int, c_int, c_int, c_int)(case.ctx, a, *shifts))
        check_exact(case, out)


@pytest.mark.parametrize("mode,max_nmse", [(0, 0.0), (1, 1e-12), (1 | 256, 1e-12), (2, 1e-12),
                                           (2 | 256, 1e-12)],
                         ids=["nearest", "bilinear", "bilinear_ac", "bicubic", "bicubic_ac"])
@pytest.mark.parametrize("dst", [(10, 9, 3, 2), (4, 3, 6, 2), (13, 7, 3, 4)])
def test_upscale(mode, max_nmse, dst):
    interpolate = g("ggml_interpolate", c_int64, c_int64, c_int64, c_int64, c_uint32)
    with GgmlCase(seed=25) as case:
        a = case.new_tensor(F32, (5, 6, 3, 2))
        out = case.mark_output(interpolate(case.ctx, a, *dst, mode))
        if max_nmse == 0.0:
            check_exact(case, out)
        else:
            check_close(case, out, max_nmse)


@pytest.mark.parametrize("dim", [16, 15])
def test_timestep_embedding(dim):
    with GgmlCase(seed=26) as case:
        t = case.new_tensor(F32, (5,), fill=np.float32([0, 1, 10, 250.5, 999]))
        out = case.mark_output(g("ggml_timestep_embedding", c_int, c_int)(case.ctx, t, dim, 10000))
        check_close(case, out, 1e-10)
