"""Conformance of ROPE, SOFT_MAX and FLASH_ATTN_EXT with ggml's CPU backend.

Every case builds the op with ggml's own constructors (through ctypes, see
``ggml_harness.py``), computes it on ggml's CPU backend, replays the same
graph bytes through rpcserver's parser and executor, and compares the results
with test-backend-ops' metric (normalized mean squared error).

Tolerances. test-backend-ops allows 1e-7 for ROPE, 1e-6 for SOFT_MAX and 5e-4
for FLASH_ATTN_EXT. rpcserver reproduces ggml's arithmetic step for step where
it can, so tighter bounds are asserted where the remaining differences are
only float reassociation and exp/cos/sin ulps:

* ``ROPE_F32`` (1e-12): ROPE follows ggml's float32 operation order exactly
  (iterated theta, the FMAs ggml's build contracts, cos/sin rounded from
  double like glibc's cosf/sinf); measured NMSE <= 3e-16, over 99% of the
  elements bit-identical (>= 97% asserted), the rest one cos/sin ulp away.
* ``ROPE_F16`` (1e-9): the same, an F16 ulp flipped now and then.
* ``EXACTISH`` (1e-10): SOFT_MAX (ggml's exp is its own SIMD polynomial, the
  row sum is double in both) and FLASH_ATTN_EXT wherever ggml accumulates in
  F32 (F32/BF16/quantized V, or its tiled path): Q is rounded to K's vec_dot
  type exactly as ggml does, so what is left is summation order; measured
  NMSE <= 3e-13. (K types dotted through Q8_1 -- Q4_1, Q5_1 -- get 1e-8: ggml
  rounds Q8_1's d*sum(q) term to F16, rpcserver does not; measured 1.5e-10.)
* ``FA_F16_ACC`` (5e-4, test-backend-ops' bound) for ggml's scalar
  FLASH_ATTN_EXT path with an F16 V (fewer than 64 queries, or mixed K/V
  types): ggml accumulates softmax*V in an F16 vector, rounding after every
  key; rpcserver accumulates in F32. Measured NMSE 1e-6..1e-5, growing with
  the number of keys.
"""

from __future__ import annotations

import ctypes
import math

import numpy as np
import pytest

import ggml_harness as H
from ggml_harness import (BF16, F16, F32, I32, IQ4_NL, Q4_0, Q4_1, Q4_K, Q5_0, Q6_K, Q8_0,
                          GgmlCase, T, assert_close, c_bool, c_float, c_int, c_void_p, fn)
from rpcserver.ggml import TYPES

ROPE_F32 = 1e-12
ROPE_F16 = 1e-9
EXACTISH = 1e-10
FA_F16_ACC = 5e-4

# every test runs on each device of ggml_harness.DEVICE_NAMES (the `device` fixture, conftest.py)
pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"), pytest.mark.usefixtures("device")]


@pytest.fixture(scope="module", autouse=True)
def _ggml():
    H.require_ggml()


# -- ggml constructors ---------------------------------------------------------------------

_ROPE_ARGS = (c_int, c_int, c_int, c_float, c_float, c_float, c_float, c_float, c_float)


def _rope_ext(name="ggml_rope_ext"):
    # (ctx, a, pos, freq_factors, n_dims, mode, n_ctx_orig,
    #  freq_base, freq_scale, ext_factor, attn_factor, beta_fast, beta_slow)
    return fn(name, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, *_ROPE_ARGS)


def _rope_multi(name="ggml_rope_multi"):
    # (ctx, a, pos, freq_factors, n_dims, int sections[4], mode, n_ctx_orig, base, scale, ext, ...)
    return fn(name, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_int, c_void_p,
              *_ROPE_ARGS[1:])


def _rope_set_offset():
    return fn("ggml_rope_set_offset", c_void_p, c_void_p, c_int)


def _soft_max_ext():
    return fn("ggml_soft_max_ext", c_void_p, c_void_p, c_void_p, c_void_p, c_float, c_float)


def _soft_max_add_sinks():
    return fn("ggml_soft_max_add_sinks", None, c_void_p, c_void_p)


def _flash_attn_ext():
    return fn("ggml_flash_attn_ext", c_void_p, c_void_p, c_void_p, c_void_p, c_void_p, c_void_p,
              c_float, c_float, c_float)


def _fa_add_sinks():
    return fn("ggml_flash_attn_ext_add_sinks", None, c_void_p, c_void_p)


def _prec_set_acc():
    return fn("ggml_prec_set_acc", c_bool, c_void_p, c_int)


GGML_PREC_F32 = 10


def _check(case, out, device, max_nmse, *, allow_nan=False):
    """Run ggml and rpcserver on ``out``; assert closeness; return (ref, ours, nmse)."""
    ref = case.run([out]) if case.ref is None else case.ref
    ours = case.run_ours(device)
    r, o = ref.arrays[0], ours.arrays[0]
    assert r.shape == o.shape
    if allow_nan:
        assert np.array_equal(np.isnan(r), np.isnan(o)), "NaN pattern differs"
    err = assert_close(r, o, max_nmse, what=H.op_name(out), allow_nan=allow_nan)
    return ref, ours, err


# -- ROPE ----------------------------------------------------------------------------------

N_CTX_ORIG = 4096
YARN = dict(freq_scale=0.25, ext_factor=1.0, attn_factor=1.0, beta_fast=32.0, beta_slow=1.0)
PLAIN = dict(freq_scale=1.0, ext_factor=0.0, attn_factor=1.0, beta_fast=32.0, beta_slow=1.0)


def _positions(rng, n, n_streams=1, high=4096):
    """Non-monotonic positions, with repeats, zero and large values."""
    p = rng.integers(0, high, n * n_streams).astype(np.int32)
    p[0] = 0
    if p.size > 3:
        p[1] = high * 8 + 3  # far beyond n_ctx_orig: exercises large thetas
        p[2] = p[0]
        p[3] = -7  # ggml takes any int32
    return p


def _rope_case(device, *, mode, ne, n_dims, type_=F32, yarn=False, freq_factors=False, n_offs=0,
               sections=None, view=0, back=False, inplace=False, freq_base=10000.0, attn_factor=1.0,
               seed=0, max_nmse=None):
    multi = bool(mode & 8)
    with GgmlCase(seed=seed) as case:
        ne = list(ne) + [1] * (4 - len(ne))
        if view == 1:  # a view with gaps in every dim (test-backend-ops v=1)
            base = case.new_tensor(type_, (ne[0] * 2, ne[1] * 4, ne[2] * 3, ne[3]))
            g = T(base)
            a = case.view_4d(base, ne, g.nb[1], g.nb[2], g.nb[3])
        elif view == 2:  # the second half of each row (clip's rope_2d): a view offset
            base = case.new_tensor(type_, (ne[0] * 2, ne[1], ne[2], ne[3]))
            g = T(base)
            a = case.view_4d(base, ne, g.nb[1], g.nb[2], g.nb[3], offset=ne[0] * g.nb[0])
        else:
            a = case.new_tensor(type_, ne)
        n_streams = 4 if multi else 1
        pos = case.new_tensor(I32, (ne[2] * n_streams,),
                              fill=lambda rng, _ne: _positions(rng, ne[2], n_streams))
        ff = None
        if freq_factors:
            n_ff = ne[0] // 2 if mode == 24 else n_dims // 2
            ff = case.new_tensor(F32, (n_ff,), fill=lambda rng, n: rng.uniform(0.5, 4.0, n[0]))
        p = dict(yarn if isinstance(yarn, dict) else YARN if yarn else PLAIN)
        p["attn_factor"] = attn_factor
        args = (p.get("n_ctx_orig", N_CTX_ORIG), freq_base, p["freq_scale"], p["ext_factor"], p["attn_factor"],
                p["beta_fast"], p["beta_slow"])
        if multi:
            secs = (c_int * 4)(*sections)
            name = "ggml_rope_multi_back" if back else (
                "ggml_rope_multi_inplace" if inplace else "ggml_rope_multi")
            # ggml copies the sections into op_params: secs only has to live through the call
            out = _rope_multi(name)(case.ctx, a, pos, ff, n_dims, ctypes.addressof(secs), mode,
                                    *args)
        else:
            name = "ggml_rope_ext_back" if back else (
                "ggml_rope_ext_inplace" if inplace else "ggml_rope_ext")
            out = _rope_ext(name)(case.ctx, a, pos, ff, n_dims, mode, *args)
        if n_offs:
            out = _rope_set_offset()(out, n_offs)
        case.mark_output(out)
        if max_nmse is None:
            max_nmse = ROPE_F16 if type_ == F16 else ROPE_F32
        ref, ours, err = _check(case, out, device, max_nmse)
        if type_ == F32:
            r, o = ref.arrays[0], ours.arrays[0]
            same = float(np.mean(r == o))
            assert same >= 0.97, f"only {same:.1%} of the ROPE results are bit-identical to ggml's"
            assert float(np.max(np.abs(r - o))) <= 1e-6
        return ref, ours, err, (a, out)


@pytest.mark.parametrize("type_", [F32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("yarn", [False, True], ids=["plain", "yarn"])
@pytest.mark.parametrize("n_dims", [128, 64, 32], ids=lambda d: f"ndims{d}")
@pytest.mark.parametrize("mode", [0, 2], ids=["normal", "neox"])
def test_rope_normal_neox(device, mode, n_dims, yarn, type_):
    _rope_case(device, mode=mode, ne=(128, 4, 9), n_dims=n_dims, type_=type_, yarn=yarn)


@pytest.mark.parametrize("mode", [0, 2], ids=["normal", "neox"])
@pytest.mark.parametrize("yarn", [False, True], ids=["plain", "yarn"])
def test_rope_freq_factors(device, mode, yarn):
    _rope_case(device, mode=mode, ne=(64, 3, 7, 2), n_dims=48, freq_factors=True, yarn=yarn)


@pytest.mark.parametrize("mode", [0, 2], ids=["normal", "neox"])
@pytest.mark.parametrize("n_offs", [2, 16], ids=lambda n: f"offs{n}")
def test_rope_offset(device, mode, n_offs):
    """ggml_rope_set_offset: rotation starts at channel n_offs; the rest passes through."""
    ref, ours, _, (a, _out) = _rope_case(device, mode=mode, ne=(64, 2, 5), n_dims=32, n_offs=n_offs)
    x = ref.input(a)
    r = ref.arrays[0]
    np.testing.assert_array_equal(r[..., :n_offs], x[..., :n_offs])
    np.testing.assert_array_equal(r[..., n_offs + 32:], x[..., n_offs + 32:])
    np.testing.assert_array_equal(ours.arrays[0][..., n_offs + 32:], x[..., n_offs + 32:])


@pytest.mark.parametrize("view", [1, 2], ids=["gaps", "row-slice"])
@pytest.mark.parametrize("mode", [0, 2], ids=["normal", "neox"])
def test_rope_non_contiguous_source(device, mode, view):
    _rope_case(device, mode=mode, ne=(32, 3, 5), n_dims=32, view=view, yarn=True)


@pytest.mark.parametrize("yarn", [
    dict(freq_scale=0.125, ext_factor=0.5, beta_fast=16.0, beta_slow=2.0, n_ctx_orig=2048),
    dict(freq_scale=0.5, ext_factor=1.0, beta_fast=32.0, beta_slow=1.0, n_ctx_orig=0),
    dict(freq_scale=1.0, ext_factor=1.0, beta_fast=0.0, beta_slow=0.0, n_ctx_orig=8192),
], ids=["half-ext", "no-ctx-orig", "zero-betas"])
@pytest.mark.parametrize("mode", [0, 2], ids=["normal", "neox"])
def test_rope_yarn_parameters(device, mode, yarn):
    """YaRN's correction dims and ramp, including the degenerate inputs (log(0), division by 0)."""
    _rope_case(device, mode=mode, ne=(64, 2, 6), n_dims=64, yarn=dict(yarn, attn_factor=1.0))


def test_rope_inplace(device):
    _rope_case(device, mode=2, ne=(64, 4, 6), n_dims=64, inplace=True)


def test_rope_attn_factor_and_base(device):
    _rope_case(device, mode=0, ne=(96, 2, 5), n_dims=96, attn_factor=0.7, freq_base=500000.0,
               yarn=True)


@pytest.mark.parametrize("mode", [0, 2, 8], ids=["normal", "neox", "mrope"])
def test_rope_back_is_inverse_rotation(device, mode):
    secs = (8, 12, 12, 0) if mode == 8 else None
    _rope_case(device, mode=mode, ne=(64, 3, 5), n_dims=64, back=True, sections=secs, yarn=True)


@pytest.mark.parametrize("type_", [F32, F16], ids=["f32", "f16"])
@pytest.mark.parametrize("yarn", [False, True], ids=["plain", "yarn"])
@pytest.mark.parametrize("mode,n_dims,sections", [
    (8, 128, (16, 24, 24, 0)),   # Qwen2-VL: sections cover n_dims/2 pairs
    (8, 96, (10, 10, 10, 0)),    # test-backend-ops style: fewer section dims than pairs (wraps)
    (8, 64, (8, 8, 8, 8)),       # a fourth (e) section
    (40, 128, (24, 20, 20, 0)),  # Qwen3-VL interleaved M-RoPE
    (40, 96, (10, 10, 10, 0)),
], ids=["mrope-qwen2vl", "mrope-wrap", "mrope-4sec", "imrope-qwen3vl", "imrope-wrap"])
def test_rope_multi_section(device, mode, n_dims, sections, yarn, type_):
    _rope_case(device, mode=mode, ne=(128, 3, 6), n_dims=n_dims, sections=sections, yarn=yarn,
               type_=type_, freq_factors=False)


def test_rope_mrope_freq_factors_and_offset(device):
    _rope_case(device, mode=8, ne=(128, 2, 5), n_dims=64, sections=(12, 10, 10, 0),
               freq_factors=True, n_offs=32, yarn=True)


@pytest.mark.parametrize("yarn", [False, True], ids=["plain", "yarn"])
@pytest.mark.parametrize("ne0,sections", [(64, (16, 16, 0, 0)), (80, (12, 8, 0, 0)),
                                          (64, (8, 8, 8, 8))], ids=["even", "uneven", "4sec"])
def test_rope_vision(device, ne0, sections, yarn):
    """VISION: n_dims == ne0/2, pairs (k, k + n_dims) over the whole row, theta restarting
    at each section."""
    _rope_case(device, mode=24, ne=(ne0, 3, 6), n_dims=ne0 // 2, sections=sections, yarn=yarn)


def test_rope_vision_freq_factors(device):
    _rope_case(device, mode=24, ne=(64, 2, 4), n_dims=32, sections=(16, 16, 0, 0),
               freq_factors=True)


# -- SOFT_MAX ------------------------------------------------------------------------------

def _mask_fill(n_inf_cols=(), row_inf=None):
    def fill(rng, ne):
        m = rng.uniform(-1, 1, (ne[3], ne[2], ne[1], ne[0])).astype(np.float32)
        for c in n_inf_cols:
            m[..., c] = -np.inf
        # a causal pattern in the first rows, like llama.cpp's KQ mask
        rows = min(ne[1], ne[0])
        for i in range(rows):
            m[..., i, ne[0] - rows + i + 1:] = -np.inf
        if row_inf is not None:
            m[..., row_inf, :] = -np.inf
        return m
    return fill


def _soft_max_case(device, *, ne, mask_type=None, mask_ne=None, scale=1.0, max_bias=0.0,
                   sinks=False, row_inf=None, seed=0, max_nmse=EXACTISH, allow_nan=False):
    with GgmlCase(seed=seed, fill_range=(-5.0, 5.0)) as case:
        ne = list(ne) + [1] * (4 - len(ne))
        a = case.new_tensor(F32, ne)
        m = None
        if mask_type is not None:
            mne = list(mask_ne or (ne[0], ne[1], 1, 1))
            m = case.new_tensor(mask_type, mne, fill=_mask_fill((3,), row_inf))
        out = _soft_max_ext()(case.ctx, a, m, scale, max_bias)
        if sinks:
            s = case.new_tensor(F32, (ne[2],), fill=lambda rng, n: rng.uniform(-10, 10, n[0]))
            _soft_max_add_sinks()(out, s)
        case.mark_output(out)
        return _check(case, out, device, max_nmse, allow_nan=allow_nan)


def test_soft_max_plain(device):
    _soft_max_case(device, ne=(37, 5, 4, 3))


def test_soft_max_scale(device):
    _soft_max_case(device, ne=(64, 7, 3), scale=0.125)


@pytest.mark.parametrize("mask_type", [F16, F32], ids=["f16mask", "f32mask"])
@pytest.mark.parametrize("mask_ne", [None, "more_rows", "per_head", "mod_heads", "per_batch"])
def test_soft_max_mask(device, mask_type, mask_ne):
    ne = (48, 6, 4, 2)
    shapes = {None: (48, 6, 1, 1), "more_rows": (48, 16, 1, 1), "per_head": (48, 6, 4, 1),
              "mod_heads": (48, 8, 2, 1), "per_batch": (48, 6, 2, 2)}
    _soft_max_case(device, ne=ne, mask_type=mask_type, mask_ne=shapes[mask_ne], scale=0.3)


@pytest.mark.parametrize("n_head", [4, 6, 12], ids=lambda h: f"heads{h}")
@pytest.mark.parametrize("mask_type", [F16, F32], ids=["f16mask", "f32mask"])
def test_soft_max_alibi(device, n_head, mask_type):
    """max_bias > 0: per-head slopes, including the m1 branch for non-power-of-2 head counts."""
    _soft_max_case(device, ne=(32, 5, n_head), mask_type=mask_type, mask_ne=(32, 5, 1, 1),
                   max_bias=8.0, scale=0.5)


@pytest.mark.parametrize("with_mask", [False, True], ids=["nomask", "mask"])
def test_soft_max_sinks(device, with_mask):
    _soft_max_case(device, ne=(40, 6, 8), mask_type=F16 if with_mask else None,
                   mask_ne=(40, 6, 1, 1), sinks=True, scale=0.7)


def test_soft_max_sinks_alibi_broadcast(device):
    _soft_max_case(device, ne=(40, 3, 6, 2), mask_type=F32, mask_ne=(40, 4, 3, 2), sinks=True,
                   max_bias=4.0)


def test_soft_max_fully_masked_row_with_sinks_is_zero(device):
    ref, ours, _ = _soft_max_case(device, ne=(16, 4, 3), mask_type=F16, mask_ne=(16, 4, 1, 1),
                                  sinks=True, row_inf=2)
    assert np.all(ref.arrays[0][:, :, 2, :] == 0)
    assert np.all(ours.arrays[0][:, :, 2, :] == 0)


def test_soft_max_fully_masked_row_is_nan_like_ggml(device):
    ref, ours, _ = _soft_max_case(device, ne=(16, 4, 3), mask_type=F32, mask_ne=(16, 4, 1, 1),
                                  row_inf=1, allow_nan=True)
    assert np.isnan(ref.arrays[0][:, :, 1, :]).all()
    assert np.isnan(ours.arrays[0][:, :, 1, :]).all()


def test_soft_max_large_rows(device):
    _soft_max_case(device, ne=(1024, 16, 2), mask_type=F16, mask_ne=(1024, 16, 1, 1), max_bias=8.0)


# -- FLASH_ATTN_EXT ------------------------------------------------------------------------

def _kq_mask(n_kv, n_q, *, causal_tail=True, inf_cols=(), inf_rows=()):
    """A llama.cpp-like KQ mask: values in [-1, 1], -inf blocks, a causal tail."""
    def fill(rng, ne):
        m = rng.uniform(-1, 1, (ne[3], ne[2], ne[1], ne[0])).astype(np.float32)
        if causal_tail:
            for i in range(min(ne[1], n_q)):
                m[..., i, n_kv - n_q + i + 1:] = -np.inf
        for c in inf_cols:
            m[..., c] = -np.inf
        for r in inf_rows:
            m[..., r, :] = -np.inf
        return m
    return fill


def _fa_case(device, *, hsk=64, hsv=None, n_head=4, n_head_kv=None, n_head_v=None, n_kv=96,
             n_q=7, n_batch=1, tk=F16, tv=None, mask=True, mask_heads=1, mask_batch=None,
             mask_pad=0, sinks=False, max_bias=0.0, softcap=0.0, kv_view=True, permute=False,
             llama_layout=False, garbage_kv=None, mask_fill=None, seed=0, max_nmse=None,
             prec=GGML_PREC_F32):
    hsv = hsv or hsk
    tv = tk if tv is None else tv
    n_head_kv = n_head_kv or n_head
    n_head_v = n_head_v or n_head_kv
    mask_batch = n_batch if mask_batch is None else mask_batch
    with GgmlCase(seed=seed) as case:
        if llama_layout:
            # llama.cpp: q_cur [hsk, n_head, n_q] permuted (0,2,1,3); the K/V caches are 2-D
            # [hs*n_head_kv, kv_size] tensors viewed as [hs, n_head_kv, n_kv] and permuted.
            assert n_batch == 1
            q_cur = case.new_tensor(F32, (hsk, n_head, n_q))
            q = case.permute(q_cur, 0, 2, 1, 3)
            kv_size = n_kv + 32
            k_cache = case.new_tensor(tk, (hsk * n_head_kv, kv_size), fill=garbage_kv)
            v_cache = case.new_tensor(tv, (hsv * n_head_kv, kv_size), fill=garbage_kv)
            kc, vc = T(k_cache), T(v_cache)
            k = case.view_4d(k_cache, (hsk, n_head_kv, n_kv, 1), TYPES[tk].row_size(hsk),
                             kc.nb[1], kc.nb[1] * n_kv)
            v = case.view_4d(v_cache, (hsv, n_head_kv, n_kv, 1), TYPES[tv].row_size(hsv),
                             vc.nb[1], vc.nb[1] * n_kv)
            k = case.permute(k, 0, 2, 1, 3)
            v = case.permute(v, 0, 2, 1, 3)
        else:
            if permute:
                q = case.permuted(F32, (hsk, n_q, n_head, n_batch), (0, 2, 1, 3))
            else:
                q = case.new_tensor(F32, (hsk, n_q, n_head, n_batch))

            def kv_tensor(t, hs, heads):
                shape = (hs, n_kv, heads, n_batch)
                if permute:
                    return case.permuted(t, shape, (0, 2, 1, 3), fill=garbage_kv)
                if kv_view:  # a view of a cache twice as long
                    base = case.new_tensor(t, (hs, 2 * n_kv, heads, n_batch), fill=garbage_kv)
                    g = T(base)
                    return case.view_4d(base, shape, g.nb[1], g.nb[2], g.nb[3])
                return case.new_tensor(t, shape, fill=garbage_kv)

            k = kv_tensor(tk, hsk, n_head_kv)
            v = kv_tensor(tv, hsv, n_head_v)
        m = None
        if mask:
            fill = mask_fill or _kq_mask(n_kv, n_q)
            m = case.new_tensor(F16, (n_kv, n_q + mask_pad, mask_heads, mask_batch), fill=fill)
        out = _flash_attn_ext()(case.ctx, q, k, v, m, 1.0 / math.sqrt(hsk), max_bias, softcap)
        if sinks:
            s = case.new_tensor(F32, (n_head,), fill=lambda rng, n: rng.uniform(-10, 10, n[0]))
            _fa_add_sinks()(out, s)
        assert _prec_set_acc()(out, prec)
        case.mark_output(out)
        if max_nmse is None:
            max_nmse = _fa_tolerance(tk, tv, n_q)
        ref, ours, err = _check(case, out, device, max_nmse)
        assert list(T(out).ne) == [hsv, n_head, n_q, n_batch]
        return ref, ours, err


def _fa_tolerance(tk, tv, n_q):
    tiled = tk == tv and tk in (F32, F16) and n_q >= 64
    if tv == F16 and not tiled:
        return FA_F16_ACC  # ggml accumulates in F16 on this path; rpcserver in F32
    return EXACTISH


@pytest.mark.parametrize("tk,tv", [(F16, F16), (F32, F32), (BF16, BF16), (Q8_0, Q8_0),
                                   (Q4_0, Q4_0), (F16, Q8_0), (Q8_0, F16)],
                         ids=["f16", "f32", "bf16", "q8_0", "q4_0", "f16-q8_0", "q8_0-f16"])
@pytest.mark.parametrize("n_q", [1, 7, 64], ids=["decode", "batch7", "batch64"])
def test_flash_attn_kv_types(device, tk, tv, n_q):
    _fa_case(device, tk=tk, tv=tv, n_q=n_q, n_kv=128)


@pytest.mark.parametrize("tk,max_nmse", [
    (Q5_0, EXACTISH), (IQ4_NL, EXACTISH),  # Q rounded like Q8_0
    (Q4_K, EXACTISH), (Q6_K, EXACTISH),    # Q rounded like Q8_K (256-element blocks)
    # Q8_1: ggml's dot adds min * (d*sum(q)) with that product stored as F16; rpcserver dots
    # the dequantized values (measured NMSE 1.5e-10)
    (Q4_1, 1e-8),
], ids=["q5_0", "iq4_nl", "q4_k", "q6_k", "q4_1"])
def test_flash_attn_other_k_types(device, tk, max_nmse):
    """K types whose vec_dot partner is Q8_0, Q8_K or Q8_1 (V F32: ggml accumulates in F32)."""
    _fa_case(device, hsk=256, hsv=64, tk=tk, tv=F32, n_q=3, n_kv=40, n_head=2, max_nmse=max_nmse)


def _batch(n_q: int) -> str:
    return "decode" if n_q == 1 else f"batch{n_q}"


def _flash_attn_cases() -> dict[str, dict]:
    """FLASH_ATTN_EXT's option matrix, as ``_fa_case`` arguments by name. Every device runs it
    (test_flash_attn_case), and the CUDA plugin's fused kernel runs it too
    (tests/test_cuda_flash_attn.py), so a case added here reaches both."""
    t = {F16: "f16", F32: "f32", Q8_0: "q8_0"}
    cases = {}
    for tk in (F16, F32, Q8_0):
        for n_q in (1, 9):  # 8 query heads on 2 K/V heads
            cases[f"gqa-{t[tk]}-{_batch(n_q)}"] = dict(n_head=8, n_head_kv=2, tk=tk, n_q=n_q,
                                                       n_kv=80)
    # ggml broadcasts K and V heads independently (h // (H/Hk) and h // (H/Hv))
    for n_head, n_head_kv, n_head_v in ((8, 4, 2), (8, 1, 4), (12, 4, 6)):
        cases[f"heads-{n_head}-k{n_head_kv}-v{n_head_v}"] = dict(
            n_head=n_head, n_head_kv=n_head_kv, n_head_v=n_head_v, n_q=3, n_kv=40, tk=F32)
    # MLA-like: K heads longer than V heads (dst rows are DV long)
    for tk in (F16, F32):
        cases[f"dk96-dv64-{t[tk]}"] = dict(hsk=96, hsv=64, tk=tk, n_q=5, n_kv=70)
    cases["dk128-dv64-q8_0"] = dict(hsk=128, hsv=64, tk=Q8_0, n_q=3, n_kv=64, n_head=2)
    for tk in (F16, F32, Q8_0):
        for n_q in (3, 64):
            cases[f"softcap-{t[tk]}-{_batch(n_q)}"] = dict(softcap=30.0, tk=tk, n_q=n_q, n_kv=96)
    for n_head in (4, 6):  # 6 heads: ALiBi's m1 branch too
        for n_q in (2, 64):
            cases[f"alibi-heads{n_head}-{_batch(n_q)}"] = dict(max_bias=8.0, n_head=n_head,
                                                               n_q=n_q, n_kv=80, tk=F32)
    for tk in (F16, F32):
        for n_q in (1, 5, 64):
            cases[f"sinks-{t[tk]}-{_batch(n_q)}"] = dict(sinks=True, tk=tk, n_q=n_q, n_kv=96,
                                                         n_head=4)
    for tv in (F32, F16):
        cases[f"everything-v{t[tv]}"] = dict(sinks=True, softcap=20.0, max_bias=4.0, n_head=6,
                                             n_head_kv=3, n_q=5, n_kv=64, tk=F32, tv=tv)
    for tk, n_q in ((F32, 4), (F16, 4), (Q8_0, 1)):
        cases[f"no-mask-{t[tk]}-{_batch(n_q)}"] = dict(mask=False, n_q=n_q, n_kv=50, tk=tk)
    # llama.cpp pads the mask's rows (GGML_KQ_MASK_PAD); only the first n_q rows count
    cases["padded-mask-rows"] = dict(n_q=3, n_kv=64, mask_pad=13, tk=F32)
    # two batches; the mask repeats over heads and batches (modulo)
    for mask_heads, mask_batch in ((1, 1), (2, 1), (4, 2)):
        cases[f"mask-heads{mask_heads}-batch{mask_batch}"] = dict(
            n_batch=2, n_head=4, n_head_kv=2, mask_heads=mask_heads, mask_batch=mask_batch,
            n_q=3, n_kv=48, tk=F32)
    # Q permuted from [hs, n_head, n_q]; K/V permuted views of 2-D caches (llama.cpp's graph)
    for tk in (F16, Q8_0):
        for n_q in (1, 6):
            cases[f"llama-layout-{t[tk]}-{_batch(n_q)}"] = dict(
                llama_layout=True, n_head=8, n_head_kv=4, tk=tk, n_q=n_q, n_kv=96)
    for tk, tv in ((F16, F16), (F32, F32), (F32, Q8_0)):
        cases[f"permuted-kv-{t[tk]}-{t[tv]}"] = dict(permute=True, n_q=5, n_kv=40, tk=tk, tv=tv)
    return cases


FLASH_ATTN_CASES = _flash_attn_cases()


@pytest.mark.parametrize("name", list(FLASH_ATTN_CASES))
def test_flash_attn_case(device, name):
    _fa_case(device, **FLASH_ATTN_CASES[name])


def test_flash_attn_row_chunks(device, monkeypatch):
    """Long query batches are computed in row chunks; the chunking must not show."""
    import rpcserver.ops.attention as attention

    monkeypatch.setattr(attention, "SCORE_CHUNK_ELEMENTS", 4 * 2 * 48 * 5)  # 5 rows per chunk
    _fa_case(device, n_q=23, n_kv=48, n_head=4, n_batch=2, tk=F32, sinks=True, max_bias=2.0,
             mask_heads=2)
    _fa_case(device, n_q=70, n_kv=48, n_head=4, tk=F16)


@pytest.mark.parametrize("tk", [F16, F32], ids=["f16", "f32"])
def test_flash_attn_decode_long_context(device, tk):
    """n_q == 1 with >= 512 keys: ggml's split-KV path (partials reduced across threads)."""
    _fa_case(device, n_q=1, n_kv=700, tk=tk, n_head=4)


@pytest.mark.parametrize("sinks", [False, True], ids=["nosinks", "sinks"])
@pytest.mark.parametrize("n_q", [3, 64], ids=["batch3", "batch64"])
def test_flash_attn_fully_masked_row_is_zero(device, sinks, n_q):
    ref, ours, _ = _fa_case(device, n_q=n_q, n_kv=64, tk=F32, sinks=sinks,
                            mask_fill=_kq_mask(64, n_q, inf_rows=(1,)))
    # dst is [DV, H, n_q, B]: array (B, n_q, H, DV); query row 1 attends to nothing
    assert np.all(ref.arrays[0][:, 1] == 0)
    assert np.all(ours.arrays[0][:, 1] == 0)


MASKED_COLS = (5, 17, 40)


def _kv_with_garbage(rng, ne):
    """Random K/V values with NaN, +inf and -inf in the KV positions MASKED_COLS."""
    a = rng.uniform(-1, 1, (ne[3], ne[2], ne[1], ne[0])).astype(np.float32)
    for c, bad in zip(MASKED_COLS, (np.nan, np.inf, -np.inf)):
        a[:, :, c, :] = bad
    return a


@pytest.mark.parametrize("tk", [F16, F32, Q8_0], ids=["f16", "f32", "q8_0"])
@pytest.mark.parametrize("n_q", [1, 4], ids=["decode", "batch4"])
def test_flash_attn_masked_keys_never_leak(device, tk, n_q):
    """ggml's scalar path skips keys whose mask is -inf: NaN/inf stored there never show."""
    garbage = _kv_with_garbage if tk != Q8_0 else None  # quantizing NaN is meaningless
    ref, ours, _ = _fa_case(device, tk=tk, n_q=n_q, n_kv=64, kv_view=False, garbage_kv=garbage,
                            mask_fill=_kq_mask(64, n_q, causal_tail=False, inf_cols=MASKED_COLS))
    assert np.isfinite(ref.arrays[0]).all() and np.isfinite(ours.arrays[0]).all()


@pytest.mark.parametrize("tk", [F16, F32], ids=["f16", "f32"])
@pytest.mark.parametrize("n_q", [1, 4, 64], ids=["decode", "batch4", "batch64"])
def test_flash_attn_masked_garbage_equals_clean_reference(device, tk, n_q):
    """rpcserver on K/V holding NaN/inf at masked keys == ggml on the same K/V with zeros there.

    (ggml's tiled path, taken for F16/F32 K/V with >= 64 queries, multiplies the masked keys'
    zero weights into the GEMMs and so turns such garbage into NaN; its scalar path skips them.
    rpcserver always skips them: a -inf mask entry means the key does not take part.)
    """
    n_kv, hs = 64, 64
    with GgmlCase(seed=5) as case:
        q = case.new_tensor(F32, (hs, n_q, 4, 1))
        k = case.new_tensor(tk, (hs, n_kv, 2, 1))
        v = case.new_tensor(tk, (hs, n_kv, 2, 1))
        m = case.new_tensor(F16, (n_kv, n_q, 1, 1),
                            fill=_kq_mask(n_kv, n_q, causal_tail=False, inf_cols=MASKED_COLS))
        out = case.mark_output(_flash_attn_ext()(case.ctx, q, k, v, m, 0.125, 0.0, 0.0))
        ref = case.run([out])
        snapshot = bytearray(ref.snapshot)
        dtype = np.float16 if tk == F16 else np.float32
        for t in (k, v):
            g = T(t)
            off = g.data - ref.base
            arr = np.ndarray((1, 2, n_kv, hs), dtype=dtype, buffer=snapshot, offset=off)
            for c, bad in zip(MASKED_COLS, (np.nan, np.inf, -np.inf)):
                arr[:, :, c, :] = bad
        ours = H.run_ours(device, ref.graph, bytes(snapshot), [out])
        assert np.isfinite(ref.arrays[0]).all() and np.isfinite(ours.arrays[0]).all()
        assert_close(ref.arrays[0], ours.arrays[0], _fa_tolerance(tk, tk, n_q),
                     what="FLASH_ATTN_EXT")


@pytest.mark.parametrize("tk", [F16, F32], ids=["f16", "f32"])
def test_flash_attn_unmasked_nan_propagates(device, tk):
    """A NaN in a key that is NOT masked poisons its rows in ggml and in rpcserver alike."""
    def kv_fill(rng, ne):
        a = rng.uniform(-1, 1, (ne[3], ne[2], ne[1], ne[0])).astype(np.float32)
        a[:, 0, 9, :] = np.nan  # head 0, key 9
        return a

    with GgmlCase(seed=2) as case:
        q = case.new_tensor(F32, (32, 3, 2, 1))
        k = case.new_tensor(tk, (32, 16, 2, 1))
        v = case.new_tensor(tk, (32, 16, 2, 1), fill=kv_fill)
        m = case.new_tensor(F16, (16, 3, 1, 1), fill=_kq_mask(16, 3, causal_tail=False))
        out = case.mark_output(_flash_attn_ext()(case.ctx, q, k, v, m, 0.2, 0.0, 0.0))
        ref = case.run([out])
        ours = case.run_ours(device)
        r, o = ref.arrays[0], ours.arrays[0]  # (B, n_q, H, DV)
        assert np.isnan(r[:, :, 0]).all() and np.isnan(o[:, :, 0]).all()
        assert_close(r[:, :, 1], o[:, :, 1], _fa_tolerance(tk, tk, 3), what="FLASH_ATTN_EXT head 1")


def test_flash_attn_prec_default(device):
    _fa_case(device, n_q=3, n_kv=32, tk=F32, prec=0)
