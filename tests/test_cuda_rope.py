"""The CUDA plugin's ROPE / ROPE_BACK kernel (rpcserver_cuda.rope_kernel) against ggml's CPU
backend.

Each case is built with ggml's own constructors and run three ways: ggml's CPU backend (the
reference), the CUDA device (``cuda`` fixture: the host-compiled stand-in for CuPy, then a
real CUDA0 where there is one) and the shared NumPy implementation on rpcserver's CPU
device. The kernel repeats the shared code's float32 operations one for one, so on the
stand-in its results must be bit-identical to the shared implementation's (on a GPU, whose
double cos/sin may differ by an ulp, all but a handful of elements), and as close to ggml
as the shared code is: _rope_case's checks (for F32 >= 97% of the elements bit-identical,
none off by more than 1e-6) and the NMSE bounds below, tighter than test_ops_attention's.
On the stand-in every case also asserts the kernel really ran (the plugin falls back to the
shared code silently when its kernel declines).
"""

from __future__ import annotations

import ctypes
import types

import numpy as np
import pytest

import cuda_standin
import ggml_harness as H
from cuda_standin import cuda, launches  # noqa: F401 (fixture)
from ggml_harness import F16, F32, I32, GgmlCase, T, c_int
from test_ops_attention import (N_CTX_ORIG, YARN, _check, _positions, _rope_case,
                                _rope_ext, _rope_multi)

from rpcserver import ggml
from rpcserver.executor import TensorView
from rpcserver_cuda import rope_kernel

ROPE_F32 = 1e-14  # measured <= 2e-16 (98-100% of the elements bit-identical to ggml)
ROPE_F16 = 1e-13  # measured <= 5e-15 (one F16 ulp flipped now and then)

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # YaRN's log(0) cases


@pytest.fixture(scope="module", autouse=True)
def _ggml():
    H.require_ggml()


def _on_standin(device) -> bool:
    return isinstance(device.cupy, cuda_standin.NumpyCupy)


def _assert_launched(device, type_):
    if _on_standin(device):
        name = rope_kernel.ROPE_KERNELS["F16" if type_ == F16 else "F32"]
        assert launches(device, name) >= 1, f"{name} was not launched (the shared code ran)"


def _assert_matches_shared(device, ours, shared):
    """The kernel's result against the shared implementation's, bit for bit (see module doc)."""
    a = np.asarray(ours).view(np.uint8)
    b = np.asarray(shared).view(np.uint8)
    assert a.shape == b.shape
    if _on_standin(device):
        np.testing.assert_array_equal(a, b, err_msg="kernel and shared implementation differ")
    else:
        differ = np.count_nonzero(ours != shared)
        assert differ <= max(2, ours.size // 10000), f"{differ} of {ours.size} elements differ"


def _compare(device, *, type_=F32, **case):
    """Run one _rope_case on ``device`` and on the shared code; the kernel must have run, be
    within the tight bound of ggml and equal the shared implementation. Returns the NMSE."""
    bound = ROPE_F16 if type_ == F16 else ROPE_F32
    _ref, ours, err, _ = _rope_case(device, type_=type_, max_nmse=bound, **case)
    _assert_launched(device, type_)
    _ref2, shared, _, _ = _rope_case(H.cpu_device(), type_=type_, max_nmse=bound, **case)
    _assert_matches_shared(device, ours.arrays[0], shared.arrays[0])
    return err


# -- every mode, both types -------------------------------------------------------------------

@pytest.mark.parametrize("type_", [F32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("yarn", [False, True], ids=["plain", "yarn"])
@pytest.mark.parametrize("mode,n_dims", [(0, 128), (0, 64), (2, 128), (2, 32)],
                         ids=["normal", "normal-partial", "neox", "neox-partial"])
def test_rope_normal_neox(cuda, mode, n_dims, yarn, type_):
    """Adjacent pairs (NORMAL) and half-row pairs (NEOX); partial n_dims copies the rest."""
    _compare(cuda, mode=mode, ne=(128, 4, 9), n_dims=n_dims, yarn=yarn, type_=type_)


@pytest.mark.parametrize("type_", [F32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("yarn", [False, True], ids=["plain", "yarn"])
@pytest.mark.parametrize("mode,n_dims,sections", [
    (8, 128, (16, 24, 24, 0)),   # Qwen2-VL
    (8, 96, (10, 10, 10, 0)),    # fewer section dims than pairs: the sectors wrap
    (8, 64, (8, 8, 8, 8)),       # a fourth (e) section
    (40, 128, (24, 20, 20, 0)),  # Qwen3-VL interleaved
    (40, 96, (10, 10, 10, 0)),
], ids=["mrope-qwen2vl", "mrope-wrap", "mrope-4sec", "imrope-qwen3vl", "imrope-wrap"])
def test_rope_multi_section(cuda, mode, n_dims, sections, yarn, type_):
    _compare(cuda, mode=mode, ne=(128, 3, 6), n_dims=n_dims, sections=sections, yarn=yarn,
             type_=type_)


@pytest.mark.parametrize("type_", [F32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("yarn", [False, True], ids=["plain", "yarn"])
@pytest.mark.parametrize("ne0,sections", [(64, (16, 16, 0, 0)), (80, (12, 8, 0, 0)),
                                          (64, (8, 8, 8, 8)), (64, (0, 8, 8, 0))],
                         ids=["even", "uneven", "4sec", "empty-first"])
def test_rope_vision(cuda, ne0, sections, yarn, type_):
    """VISION: pairs (k, k + n_dims) over the whole row, each section restarting its series
    (an empty first section, the sectors wrapping: ggml's if/else-if reset chain then never
    restarts the second stream)."""
    _compare(cuda, mode=24, ne=(ne0, 3, 6), n_dims=ne0 // 2, sections=sections, yarn=yarn,
             type_=type_)


# -- parameters -------------------------------------------------------------------------------

@pytest.mark.parametrize("yarn", [False, True], ids=["plain", "yarn"])
@pytest.mark.parametrize("mode,n_dims,sections", [(0, 48, None), (2, 48, None),
                                                  (8, 48, (8, 8, 8, 0)), (24, 32, (8, 8, 0, 0))],
                         ids=["normal", "neox", "mrope", "vision"])
def test_rope_freq_factors(cuda, mode, n_dims, sections, yarn):
    """src2: theta divided by a per-pair factor (ne3 = 2: the factors apply to every batch)."""
    ne0 = 2 * n_dims if mode == 24 else 64
    _compare(cuda, mode=mode, ne=(ne0, 3, 7, 2), n_dims=n_dims, sections=sections,
             freq_factors=True, yarn=yarn)


@pytest.mark.parametrize("mode,n_offs,sections", [(0, 2, None), (2, 16, None),
                                                  (8, 32, (12, 10, 10, 0))],
                         ids=["normal", "neox", "mrope"])
def test_rope_offset(cuda, mode, n_offs, sections):
    """op_param 15: rotation starts at channel n_offs; both sides of the range are copied."""
    ne0 = 128 if mode == 8 else 64
    _compare(cuda, mode=mode, ne=(ne0, 2, 5), n_dims=32 if mode != 8 else 64, n_offs=n_offs,
             sections=sections, yarn=True, freq_factors=mode == 8)


@pytest.mark.parametrize("yarn", [
    dict(YARN),  # ext_factor 1, freq_scale 0.25
    dict(freq_scale=0.125, ext_factor=0.5, beta_fast=16.0, beta_slow=2.0, n_ctx_orig=2048),
    dict(freq_scale=0.5, ext_factor=1.0, beta_fast=32.0, beta_slow=1.0, n_ctx_orig=0),
    dict(freq_scale=1.0, ext_factor=1.0, beta_fast=0.0, beta_slow=0.0, n_ctx_orig=8192),
], ids=["yarn", "half-ext", "no-ctx-orig", "zero-betas"])
@pytest.mark.parametrize("mode", [0, 2], ids=["normal", "neox"])
def test_rope_yarn_parameters(cuda, mode, yarn):
    """YaRN's ramp between the correction dims and its mscale, degenerate inputs included."""
    _compare(cuda, mode=mode, ne=(64, 2, 6), n_dims=64, yarn=dict(yarn, attn_factor=1.0))


def test_rope_attn_factor_and_base(cuda):
    _compare(cuda, mode=0, ne=(96, 2, 5), n_dims=96, attn_factor=0.7, freq_base=500000.0,
             yarn=True)


@pytest.mark.parametrize("type_", [F32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("mode,sections", [(0, None), (2, None), (8, (8, 12, 12, 0)),
                                           (24, (16, 16, 0, 0))],
                         ids=["normal", "neox", "mrope", "vision"])
def test_rope_back(cuda, mode, sections, type_):
    """ROPE_BACK: the inverse rotation (sine negated)."""
    _compare(cuda, mode=mode, ne=(64, 3, 5), n_dims=32 if mode == 24 else 64, back=True,
             sections=sections, yarn=True, type_=type_)


def test_rope_back_inverts_rope(cuda):
    """ROPE then ROPE_BACK with the same parameters gives the input back (to rounding)."""
    with GgmlCase(seed=11) as case:
        a = case.new_tensor(F32, (64, 4, 6))
        pos = case.new_tensor(I32, (6,), fill=lambda rng, _ne: _positions(rng, 6))
        args = (64, 2, N_CTX_ORIG, 10000.0, 0.25, 1.0, 1.0, 32.0, 1.0)
        fwd = _rope_ext()(case.ctx, a, pos, None, *args)
        back = case.mark_output(_rope_ext("ggml_rope_ext_back")(case.ctx, fwd, pos, None, *args))
        ref, ours, _ = _check(case, back, cuda, ROPE_F32)
        x = ours.arrays[0]
        # YaRN's mscale (1 + 0.1 ln 4) scales both ways: the round trip multiplies by its square
        mscale = np.float32(1.0 + 0.1 * np.log(4.0))
        np.testing.assert_allclose(x / (mscale * mscale), ref.input(a), atol=1e-5)
    assert not _on_standin(cuda) or launches(cuda, rope_kernel.ROPE_KERNELS["F32"]) == 2


# -- layouts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("type_", [F32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("view", [1, 2], ids=["gaps", "row-slice"])
@pytest.mark.parametrize("mode", [0, 2], ids=["normal", "neox"])
def test_rope_strided_source(cuda, mode, view, type_):
    """Views with gaps in every dimension, and the second half of each row (a byte offset)."""
    _compare(cuda, mode=mode, ne=(32, 3, 5), n_dims=32, view=view, yarn=True, type_=type_)


@pytest.mark.parametrize("type_", [F32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("mode,sections", [(0, None), (8, (8, 8, 8, 0))], ids=["normal", "mrope"])
def test_rope_permuted_source(cuda, mode, sections, type_):
    """A permuted input (heads and tokens swapped in memory): rows at arbitrary byte strides."""
    n_streams = 4 if mode & 8 else 1
    outs = {}
    for device in (cuda, H.cpu_device()):
        with GgmlCase(seed=12) as case:
            a = case.permuted(type_, (64, 5, 7, 2), (0, 2, 1, 3))
            pos = case.new_tensor(I32, (7 * n_streams,),
                                  fill=lambda rng, _ne: _positions(rng, 7, n_streams))
            p = YARN
            args = (N_CTX_ORIG, 10000.0, p["freq_scale"], p["ext_factor"], p["attn_factor"],
                    p["beta_fast"], p["beta_slow"])
            if sections:
                secs = (c_int * 4)(*sections)
                out = _rope_multi()(case.ctx, a, pos, None, 48, ctypes.addressof(secs), mode,
                                    *args)
            else:
                out = _rope_ext()(case.ctx, a, pos, None, 48, mode, *args)
            case.mark_output(out)
            assert T(a).nb[1] > T(a).nb[2]  # really permuted
            _ref, ours, _err = _check(case, out, device, ROPE_F16 if type_ == F16 else ROPE_F32)
            outs[device is cuda] = ours.arrays[0]
    _assert_launched(cuda, type_)
    _assert_matches_shared(cuda, outs[True], outs[False])


@pytest.mark.parametrize("type_", [F32, F16], ids=["f32", "f16"])
def test_rope_inplace(cuda, type_):
    """ggml_rope_ext_inplace: dst is src (the pass-through channels are not copied)."""
    _compare(cuda, mode=2, ne=(64, 4, 6), n_dims=32, inplace=True, type_=type_)


def test_rope_many_rows(cuda):
    """More rows (heads x batches) per token than one block takes: several row groups."""
    n_rows = 21 * 3
    assert n_rows > rope_kernel.ROPE_ROWS_PER_BLOCK
    _compare(cuda, mode=2, ne=(64, 21, 4, 3), n_dims=64, yarn=True)


# -- what the kernel leaves to the shared code --------------------------------------------------

def _view(type_name: str, ne, nb=None):
    info = ggml.TYPES_BY_NAME[type_name]
    if nb is None:
        nb = [info.type_size]
        for n in ne[:3]:
            nb.append(nb[-1] * n)
    return TensorView(object(), 0, info, tuple(ne), tuple(nb))


def _ctx(src, dst, *, n_dims=64, mode=0, sections=(0, 0, 0, 0), n_offs=0, pos=None):
    params = [0] * 16
    params[1], params[2], params[4] = n_dims, mode, N_CTX_ORIG
    params[11:15] = sections
    params[15] = n_offs
    pos = pos or _view("I32", (src.ne[2], 1, 1, 1))
    srcs = [src, pos]

    def fail(why):
        raise AssertionError(f"the kernel must decline, not fail: {why}")

    return types.SimpleNamespace(
        src=lambda i: srcs[i] if i < len(srcs) else None, has_src=lambda i: i < len(srcs),
        dst=dst, param_i32=lambda i: params[i], param_f32=lambda i: 0.0, fail=fail,
        node=types.SimpleNamespace(op=ggml.Op.ROPE))


@pytest.mark.parametrize("why,ctx", [
    ("bf16", _ctx(_view("BF16", (64, 2, 3, 1)), _view("BF16", (64, 2, 3, 1)))),
    ("f16 to f32", _ctx(_view("F16", (64, 2, 3, 1)), _view("F32", (64, 2, 3, 1)))),
    ("gapped elements", _ctx(_view("F32", (64, 2, 3, 1), (8, 512, 1024, 3072)),
                             _view("F32", (64, 2, 3, 1)))),
    ("shape mismatch", _ctx(_view("F32", (64, 2, 3, 1)), _view("F32", (64, 2, 4, 1)))),
    ("2**31 tokens", _ctx(_view("F32", (64, 1, 2**31, 1)), _view("F32", (64, 1, 2**31, 1)))),
    ("odd n_dims", _ctx(_view("F32", (64, 2, 3, 1)), _view("F32", (64, 2, 3, 1)), n_dims=63)),
    ("n_dims > ne0", _ctx(_view("F32", (64, 2, 3, 1)), _view("F32", (64, 2, 3, 1)), n_dims=66)),
    ("unknown mode", _ctx(_view("F32", (64, 2, 3, 1)), _view("F32", (64, 2, 3, 1)), mode=1)),
    ("odd n_offs", _ctx(_view("F32", (64, 2, 3, 1)), _view("F32", (64, 2, 3, 1)), n_dims=32,
                        n_offs=3)),
    ("offset past ne0", _ctx(_view("F32", (64, 2, 3, 1)), _view("F32", (64, 2, 3, 1)),
                             n_dims=48, n_offs=32)),
    ("no section", _ctx(_view("F32", (64, 2, 3, 1)), _view("F32", (64, 2, 3, 1)), mode=8,
                        sections=(0, 0, 0, 4))),
    ("negative section", _ctx(_view("F32", (64, 2, 3, 1)), _view("F32", (64, 2, 3, 1)),
                              mode=8, sections=(8, -1, 8, 0))),
    ("sections past ne0", _ctx(_view("F32", (64, 2, 3, 1)), _view("F32", (64, 2, 3, 1)),
                               mode=8, sections=(30, 30, 30, 0))),
    ("vision n_dims", _ctx(_view("F32", (64, 2, 3, 1)), _view("F32", (64, 2, 3, 1)), mode=24,
                           sections=(8, 8, 0, 0), n_dims=64)),
    ("f32 positions", _ctx(_view("F32", (64, 2, 3, 1)), _view("F32", (64, 2, 3, 1)),
                           pos=_view("F32", (3, 1, 1, 1)))),
], ids=lambda v: v if isinstance(v, str) else "")
def test_rope_declines(why, ctx):
    """What the kernel does not cover goes to the shared code (which reports invalid input):
    rope() returns False before looking up a kernel (the stub context has no device)."""
    assert rope_kernel.rope(ctx) is False
