"""ggml op implementations, written once against the NumPy/CuPy array API.

Each module registers its ops in :data:`rpcserver.executor.OP_TABLE` with
:func:`op`. An implementation receives a :class:`rpcserver.executor.NodeContext`
and writes the node's result with ``ctx.store`` (or into views it obtains
from the context). Semantics follow ggml's CPU backend (ggml-cpu/ops.cpp).

Portability (NumPy, CuPy and MLX run the same code): write results through
``ctx.store`` (MLX arrays do not alias buffer memory, so assigning into a view
of a buffer writes nothing there; assigning into arrays an op made itself is
fine); make float32 scalars with ``np.float32(...)`` (``xp.float32`` is a
dtype, not a constructor, in MLX) and keep NumPy scalars to the right of
array operands or use Python floats (``np.float32(2) * a`` turns an MLX array
into a NumPy one).
"""

from __future__ import annotations

from ..executor import OP_TABLE
from ..ggml import Op


def op(*ops: Op):
    """Register the decorated function as the implementation of ``ops``."""

    def register(fn):
        for o in ops:
            OP_TABLE[int(o)] = fn
        return fn

    return register


def broadcast_like(xp, b, shape):
    """ggml's broadcasting of src1 over src0: each dim of ``b`` repeats (tiles) to fill ``shape``."""
    if tuple(b.shape) == tuple(shape):
        return b
    reps = []
    for have, want in zip(b.shape, shape):
        if have == want or have == 1:
            reps.append(1)
        elif want % have == 0:
            reps.append(want // have)
        else:
            raise ValueError(f"cannot repeat a dim of {have} to {want}")
    if any(r > 1 for r in reps):
        b = xp.tile(b, reps)
    return xp.broadcast_to(b, shape)


from . import attention, elementwise, matmul, misc, moe, norm, rope, rows  # noqa: E402,F401  (registration)
