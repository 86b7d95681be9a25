"""Mixture-of-experts ops: MUL_MAT_ID (per-token expert matmul) and ADD_ID (per-expert bias).

MUL_MAT_ID, as ggml defines it (ggml.c, ggml_mul_mat_id)::

    as  = src0 [K, M, n_expert]             one weight matrix per expert (any type)
    b   = src1 [K, n_b, n_tokens]           n_b == n_expert_used, or a divisor of it
    ids = src2 [n_expert_used, n_tokens]    I32 expert numbers
    dst        [M, n_expert_used, n_tokens] F32

    dst[:, e, t] = as[:, :, ids[e, t]] @ b[:, e % n_b, t]

``n_b == 1`` is the common "broadcast" form: every selected expert of a
token multiplies the same activation row. Like ggml's CPU backend, the
(token, slot) pairs are grouped by expert so each expert used by the batch
costs one matmul; experts no token selected are never read (each expert is
widened on its own, a tile of rows at a time, for this op only).

ADD_ID: ``dst[:, i1, i2, i3] = src0[:, i1, i2, i3] + src1[:, ids[i1, i2]]`` with
ids = src2 (I32, [ne1, ne2] of src0); only src1's rows (dim 1) are selected.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..ggml import GGMLType, Op
from . import op
from .matmul import mul_mat_tiled


def _expert_view(tv, e: int):
    """The 2-D slice ``as[:, :, e]`` of a 3-D expert tensor, as its own TensorView.

    A separate view per expert means a quantized expert is read only when some token uses it.
    """
    return replace(tv, offset=tv.offset + e * tv.nb[2], ne=(tv.ne[0], tv.ne[1], 1, 1),
                   nb=(tv.nb[0], tv.nb[1], tv.nb[1] * tv.ne[1], tv.nb[1] * tv.ne[1]))


def _host_ids(ctx, tv, what: str, limit: int):
    """An I32 index tensor as a host int64 NumPy array, shape (ne3, ne2, ne1, ne0), range-checked."""
    if tv.type.value != GGMLType.I32:
        ctx.fail(f"{what} must be I32, got {tv.type.name}")
    ids = np.asarray(ctx.lib.to_numpy(ctx.raw(tv))).astype(np.int64)
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= limit):
        ctx.fail(f"{what} out of range [0, {limit})")
    return ids


@op(Op.MUL_MAT_ID)
def mul_mat_id(ctx):
    xp, lib = ctx.xp, ctx.lib
    as_v, b_v, ids_v, dst = ctx.src(0), ctx.src(1), ctx.src(2), ctx.dst
    k, m, n_expert = as_v.ne[0], as_v.ne[1], as_v.ne[2]
    n_used, n_tokens = ids_v.ne[0], ids_v.ne[1]
    n_b = b_v.ne[1]
    if (as_v.ne[3] != 1 or b_v.ne[3] != 1 or b_v.ne[0] != k or b_v.ne[2] != n_tokens
            or n_b == 0 or n_used % n_b or ids_v.ne[2] != 1 or ids_v.ne[3] != 1
            or dst.ne[:3] != (m, n_used, n_tokens)):
        ctx.fail("MUL_MAT_ID shapes do not agree")
    ids = _host_ids(ctx, ids_v, "MUL_MAT_ID expert id", n_expert)[0, 0]  # (n_tokens, n_used)

    out = xp.zeros((n_tokens, n_used, m), dtype=xp.float32)
    if ids.size == 0 or m == 0:
        ctx.store(out.reshape(dst.shape))
        return
    b = ctx.f32(b_v)[0]  # (n_tokens, n_b, K)

    # group the (token, slot) pairs by expert, keeping token order within an expert
    flat = ids.reshape(-1)
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=n_expert)
    tok = order // n_used
    slot = order % n_used
    tok_d = lib.from_numpy(tok)
    slot_d = lib.from_numpy(slot)
    rows = b[tok_d, slot_d % n_b]  # (pairs, K), in expert order

    results = xp.empty((flat.size, m), dtype=xp.float32)
    start = 0
    for e in np.flatnonzero(counts):
        stop = start + int(counts[e])
        results[start:stop] = mul_mat_tiled(ctx, _expert_view(as_v, int(e)), rows[start:stop])
        start = stop
    out[tok_d, slot_d] = results
    ctx.store(out.reshape(dst.shape))


@op(Op.ADD_ID)
def add_id(ctx):
    a_v, b_v, ids_v = ctx.src(0), ctx.src(1), ctx.src(2)
    ne0, ne1, ne2 = a_v.ne[0], a_v.ne[1], a_v.ne[2]
    if b_v.ne[0] != ne0 or ids_v.ne[0] != ne1 or ids_v.ne[1] != ne2:
        ctx.fail("ADD_ID shapes do not agree")
    ids = _host_ids(ctx, ids_v, "ADD_ID row id", b_v.ne[1])[0, 0]  # (ne2, ne1)
    a = ctx.f32(a_v)  # (ne3, ne2, ne1, ne0)
    rows = ctx.f32(b_v)[0, 0]  # (n_rows, ne0): only dim 1 of src1 is indexed
    ctx.store(a + rows[ctx.lib.from_numpy(ids)][None])
