"""Checks of the op-conformance harness itself (tests/ggml_harness.py).

These prove that (1) the ctypes mirror of ``struct ggml_tensor`` reads what
ggml wrote, (2) the ggml oracle really computes (its results match NumPy on
the snapshot inputs), (3) input filling, including F16/BF16/quantized data and
non-contiguous views, produces what was asked for, and (4) ``run_ours``
replays a graph through rpcserver's parser and executor: memory-only ops give
bit-identical results, and a computing op either fails with a GraphError that
names it (not implemented yet) or matches ggml.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import ggml_harness as H
from ggml_harness import (BF16, F16, F32, I32, Q4_0, Q8_0, GgmlCase, T, assert_close, c_int,
                          c_int64, c_size_t, c_void_p, fn, nmse)


@pytest.fixture(scope="module", autouse=True)
def _ggml():
    H.require_ggml()


@pytest.fixture(scope="module")
def device():
    return H.cpu_device()


def _add():
    return fn("ggml_add", c_void_p, c_void_p, c_void_p, c_void_p)


def _mul_mat():
    return fn("ggml_mul_mat", c_void_p, c_void_p, c_void_p, c_void_p)


# -- the struct mirror ---------------------------------------------------------

def test_struct_ggml_tensor_layout_matches_ggml():
    assert ctypes.sizeof(H.GgmlTensor) == 336
    assert fn("ggml_tensor_overhead", c_size_t)() == 336 + H.GGML_OBJECT_SIZE
    get_name = fn("ggml_get_name", ctypes.c_char_p, c_void_p)
    get_data = fn("ggml_get_data", c_void_p, c_void_p)
    nbytes = fn("ggml_nbytes", c_size_t, c_void_p)
    view_2d = fn("ggml_view_2d", c_void_p, c_void_p, c_void_p, c_int64, c_int64, c_size_t, c_size_t)
    with GgmlCase() as case:
        a = case.new_tensor(F32, (8, 3, 2, 5), name="a")
        b = case.new_tensor(F32, (8, 3, 2, 5), name="b")
        g = T(a)
        assert (g.type, list(g.ne), list(g.nb)) == (F32, [8, 3, 2, 5], [4, 32, 96, 192])
        assert g.name == get_name(a) == b"a"
        assert nbytes(a) == 8 * 3 * 2 * 5 * 4
        s = _add()(case.ctx, a, b)
        assert T(s).op == 2 and T(s).src[0] == a and T(s).src[1] == b and not T(s).src[2]
        p = case.permute(a, 1, 0, 3, 2)
        assert T(p).op == 38 and list(T(p).op_params[:4]) == [1, 0, 3, 2]
        assert list(T(p).ne) == [3, 8, 5, 2] and T(p).view_src == a
        v = view_2d(case.ctx, a, 4, 2, 32, 16)
        assert T(v).view_src == a and T(v).view_offs == 16 and T(v).op == 37
        out = case.mark_output(_add()(case.ctx, v, v))
        assert T(out).flags & 2  # GGML_TENSOR_FLAG_OUTPUT
        ref = case.run([out])
        for t in (a, b, s, p, v, out):
            assert T(t).buffer == case.buffer and T(t).data == get_data(t)
        assert T(v).data == T(a).data + 16
        assert T(p).data == T(a).data
        assert ref.base <= T(a).data < ref.base + len(ref.snapshot)


# -- the oracle ------------------------------------------------------------------

def test_oracle_add_equals_numpy_on_the_snapshot_inputs():
    with GgmlCase(seed=1) as case:
        a = case.new_tensor(F32, (33, 4, 3))
        b = case.new_tensor(F32, (33, 4, 3))
        out = case.mark_output(_add()(case.ctx, a, b))
        ref = case.run([out])
        x, y = ref.input(a), ref.input(b)
        assert x.shape == (1, 3, 4, 33)
        assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.3  # really random in [-1, 1]
        assert not np.array_equal(x, y)
        np.testing.assert_array_equal(ref.arrays[0], x + y)
        # the snapshot was taken before computing: the output slot did not hold the sum then
        assert not np.array_equal(ref.input(out), x + y)


def test_oracle_mul_mat_and_noncontiguous_input_equal_numpy():
    with GgmlCase(seed=2) as case:
        w = case.new_tensor(F32, (64, 16))              # 16 rows of 64
        x = case.permuted(F32, (64, 5, 2), (0, 2, 1, 3))  # non-contiguous activations
        assert not fn("ggml_is_contiguous", ctypes.c_bool, c_void_p)(x)
        out = case.mark_output(_mul_mat()(case.ctx, w, x))
        assert list(T(out).ne) == [16, 5, 2, 1]
        ref = case.run([out])
        W, X = ref.input(w)[0, 0], ref.input(x)[0]    # (16, 64), (2, 5, 64)
        expect = np.einsum("kc,bnc->bnk", W.astype(np.float64), X.astype(np.float64))
        assert nmse(expect, ref.arrays[0][0]) < 1e-10


def test_oracle_abort_is_contained_in_a_child_process():
    # ggml's CPU mul_mat asserts nb10 == sizeof(float): a transposed src1 aborts the oracle
    with GgmlCase() as case:
        w = case.new_tensor(F32, (64, 16))
        x = case.permuted(F32, (64, 5), (1, 0, 2, 3))
        out = case.mark_output(_mul_mat()(case.ctx, w, x))
        with pytest.raises(H.GgmlAborted, match=r"MUL_MAT.*GGML_ASSERT\(nb10 == ggml_type_size"):
            case.run([out])


# -- input filling ----------------------------------------------------------------

def test_fill_user_values_f16_bf16_quantized_and_ints():
    vals = np.linspace(-2, 2, 64 * 2, dtype=np.float32)
    with GgmlCase() as case:
        f16 = case.new_tensor(F16, (64, 2), fill=vals)
        bf16 = case.new_tensor(BF16, (64, 2), fill=vals * 1.001)
        q8 = case.new_tensor(Q8_0, (64, 2), fill=vals)
        q4 = case.new_tensor(Q4_0, (64, 2))                       # random, quantized by ggml
        i32 = case.new_tensor(I32, (7,), fill=lambda rng, ne: np.arange(7) * 3)
        raw = case.new_tensor(F32, (4,), fill=np.float32([1, 2, 3, 4]).tobytes())
        outs = [case.mark_output(case.reshape(t, (int(T(t).ne[0]) * int(T(t).ne[1]),)))
                for t in (f16, bf16, q8, q4)]
        outs.append(case.mark_output(case.reshape(i32, (7,))))
        outs.append(case.mark_output(case.reshape(raw, (2, 2))))
        ref = case.run(outs)
        np.testing.assert_array_equal(ref.input(f16).reshape(-1), vals.astype(np.float16))
        bits = (vals * 1.001).view(np.uint32)
        rne = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        np.testing.assert_array_equal(ref.input(bf16, native=True).reshape(-1), rne)
        q = ref.input(q8).reshape(-1)
        assert np.abs(q - vals).max() < 2 / 127 and q.dtype == np.float32
        assert ref.input(q8, native=True).shape == (1, 1, 2, 2 * 34)  # raw Q8_0 rows
        r4 = ref.input(q4)
        assert r4.std() > 0.2 and np.abs(r4).max() <= 1.2
        np.testing.assert_array_equal(ref.input(i32).reshape(-1), np.arange(7) * 3)
        np.testing.assert_array_equal(ref.arrays[5], [[[[1, 2], [3, 4]]]])
        # outputs that are reshapes read the same memory
        np.testing.assert_array_equal(ref.arrays[2].reshape(-1), q)


def test_fill_quantized_type_that_requires_an_imatrix():
    iq2_xxs = 16
    assert fn("ggml_quantize_requires_imatrix", ctypes.c_bool, c_int)(iq2_xxs)
    with GgmlCase() as case:
        t = case.new_tensor(iq2_xxs, (256, 2))
        out = case.mark_output(case.reshape(t, (512,)))
        ref = case.run([out])
        x = ref.input(t)
        assert np.isfinite(x).all() and x.std() > 0.05


def test_fill_rejects_wrong_sizes_and_non_leaves():
    with GgmlCase() as case:
        a = case.new_tensor(F32, (4,), fill=np.zeros(5))
        with pytest.raises(ValueError, match="4 elements"):
            case.run([case.mark_output(case.reshape(a, (2, 2)))])
    with GgmlCase() as case:
        a = case.new_tensor(F32, (4,))
        v = case.reshape(a, (2, 2))
        with pytest.raises(ValueError, match="not a leaf"):
            case.run([v], {v: np.zeros(4)})


# -- rpcserver replays the graph ------------------------------------------------------

@pytest.mark.parametrize("kind", ["view", "reshape", "permute", "transpose", "strided"])
@pytest.mark.parametrize("type_", [F32, F16, Q8_0])
def test_memory_only_ops_are_bit_identical(device, kind, type_):
    ne = (64, 6, 4, 3)
    perm = None
    with GgmlCase(seed=3) as case:
        a = case.new_tensor(type_, ne, name="a")
        if kind == "view":
            row = fn("ggml_row_size", c_size_t, c_int, c_int64)(type_, 64)
            g = T(a)
            out = case.view_4d(a, (64, 3, 2, 2), g.nb[1] * 2, g.nb[2], g.nb[3], row)
        elif kind == "reshape":
            out = case.reshape(a, (64 * 6, 12))
        elif kind == "permute":  # quantized rows cannot be split: keep axis 0 in place
            perm = (0, 2, 1, 3) if type_ == Q8_0 else (2, 0, 3, 1)
            out = case.permute(a, *perm)
        elif kind == "transpose":
            if type_ == Q8_0:
                perm = (0, 1, 3, 2)
                out = case.permute(a, *perm)
            else:
                out = case.transpose(case.reshape(a, (64, 72)))
        else:
            out = case.strided(type_, (32, 5, 3, 2), pad=(32, 1, 1, 1), offset_elems=32)
            a = T(out).view_src
        case.mark_output(out)
        ref = case.run([out])
        ours = case.run_ours(device, native=True)
        # nothing computes: every byte of the buffer is untouched on both sides
        assert ref.image == ref.snapshot and ours.image == ref.snapshot
        r = ref.array(out, native=True)
        np.testing.assert_array_equal(ours.arrays[0], r)
        assert ours.arrays[0].dtype == r.dtype
        # and the views really are the NumPy equivalents of the input
        x, y = ref.input(a), ref.array(out)
        if kind == "reshape":
            np.testing.assert_array_equal(y.reshape(-1), x.reshape(-1))
        elif perm is not None:
            # ggml_permute: the source's axis i becomes the result's axis perm[i] (ne order)
            xg, yg = x.transpose(3, 2, 1, 0), y.transpose(3, 2, 1, 0)
            np.testing.assert_array_equal(np.moveaxis(xg, [0, 1, 2, 3], list(perm)), yg)
        elif kind == "transpose":
            np.testing.assert_array_equal(y[0, 0], x.reshape(72, 64).T)
        elif kind == "view":  # rows 1, 3, 5 of the first two planes / batches
            np.testing.assert_array_equal(y, x[:2, :2, 1:7:2, :])
        else:
            np.testing.assert_array_equal(y, x[:2, :3, :5, 32:64])


def test_serialization_matches_the_rpc_client(device):
    from rpcserver.protocol import pack_graph

    with GgmlCase() as case:
        a = case.new_tensor(F32, (8, 4), name="a")
        b = case.permuted(F32, (8, 4), (1, 0, 2, 3), name="b")
        s = case.mark_output(_add()(case.ctx, a, b))
        ref = case.run([s])
        nodes, tensors = H.serialize_graph(ref.graph, remote_buffer=7, remote_base=1 << 40)
        base_b = T(b).view_src
        # add_tensor order: sources (depth first), view_src, then the tensor itself
        assert nodes == [b, s]
        assert [t.id for t in tensors] == [base_b, b, a, s]
        by = {t.id: t for t in tensors}
        assert by[s].src[:2] == (a, b) and by[b].view_src == base_b and by[b].op == 38
        assert by[b].op_params[:4] == (1, 0, 2, 3)
        assert by[s].data - (1 << 40) == T(s).data - ref.base
        assert by[a].buffer == 7 and by[a].name == "a" and by[b].nb == (16, 4, 128, 128)
        assert by[a].use_count == 1 and by[b].use_count == 1 and by[base_b].use_count == 1
        assert by[s].flags & 2
        assert len(pack_graph(0, nodes, tensors)) == 8 + 8 * 2 + 4 + 296 * 4


def _add_is_unimplemented_or_matches(excinfo_or_result, ref_arrays):
    from rpcserver.errors import GraphError

    if isinstance(excinfo_or_result, GraphError):
        assert "ADD" in str(excinfo_or_result), str(excinfo_or_result)
        return "not implemented"
    for r, o in zip(ref_arrays, excinfo_or_result.arrays):
        assert_close(r, o, 1e-6, what="ADD")
    return "matches"


@pytest.mark.parametrize("noncontig", [False, True])
def test_add_is_refused_by_name_or_matches_ggml(device, noncontig):
    from rpcserver.errors import GraphError

    with GgmlCase(seed=4) as case:
        a = case.new_tensor(F32, (32, 3, 2))
        b = case.permuted(F32, (32, 3, 2), (2, 0, 1, 3)) if noncontig else case.new_tensor(F32, (32, 3, 2))
        out = case.mark_output(_add()(case.ctx, a, b))
        ref = case.run([out])
        np.testing.assert_array_equal(ref.arrays[0], ref.input(a) + ref.input(b))
        try:
            result = H.run_ours(device, ref.graph, ref.snapshot, [out])
        except GraphError as exc:
            result = exc
        _add_is_unimplemented_or_matches(result, ref.arrays)


def test_check_helper_reports_the_op(device):
    from rpcserver.errors import GraphError

    with GgmlCase() as case:
        a = case.new_tensor(F32, (16,))
        out = case.mark_output(_add()(case.ctx, a, a))
        try:
            case.check(device, [out], max_nmse=1e-6)
        except GraphError as exc:
            assert "ADD" in str(exc)


# -- the metric ----------------------------------------------------------------------

def test_nmse_and_assert_close():
    r = np.array([1.0, -2.0, 3.0], np.float32)
    assert nmse(r, r) == 0.0
    assert nmse(np.zeros(3), np.zeros(3)) == 0.0
    assert nmse(np.zeros(3), r) == float("inf")
    assert nmse(r, r * 1.01) == pytest.approx(1e-4, rel=1e-4)
    assert_close(r, r * (1 + 1e-5), 1e-9)
    with pytest.raises(AssertionError, match=r"MUL_MAT.*NMSE = 1\.000e-04 > 1\.0e-07.*max \|diff\| = 0\.03"):
        assert_close(r, r * 1.01, 1e-7, what="MUL_MAT")
    with pytest.raises(AssertionError, match="NaN in ours"):
        assert_close(r, np.array([1, np.nan, 3]), 1.0)
    assert_close(np.array([1, np.nan]), np.array([1, np.nan]), 0, allow_nan=True)
    assert_close(np.array([np.inf, 1]), np.array([np.inf, 1]), 0)
    with pytest.raises(AssertionError, match="infinity mismatch"):
        assert_close(np.array([np.inf, 1]), np.array([-np.inf, 1]), 1.0)
    with pytest.raises(AssertionError, match="shape"):
        assert_close(np.zeros((2, 2)), np.zeros(4), 1.0)


def test_fn_caches_and_refuses_conflicting_declarations():
    f = fn("ggml_add", c_void_p, c_void_p, c_void_p, c_void_p)
    assert fn("ggml_add", c_void_p, c_void_p, c_void_p, c_void_p) is f
    with pytest.raises(TypeError):
        fn("ggml_add", c_void_p, c_void_p, c_void_p)
    with pytest.raises(AttributeError):
        fn("ggml_no_such_function", None)
