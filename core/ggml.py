"""ggml's vocabulary as data: tensor types, ops, unary and GLU ops, limits.

Everything here mirrors ggml 0.25.3 (the version behind RPC protocol 7.0.0):
the numeric values are what travels on the wire, so the order of each table
is the order of the corresponding enum in ``ggml.h``.

The type table (``_TYPE_ROWS``) is ggml's ``enum ggml_type`` with each type's
block size and bytes per block (``ggml_blck_size``/``ggml_type_size``), as data:
``tests/test_ops_support.py`` checks it against ggml's own library. (It used
to be derived from the ``gguf`` package, whose table lags ggml's: importing
gguf cost every server 5 MiB it never used.)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

MAX_DIMS = 4
MAX_SRC = 10
MAX_OP_PARAMS = 64  # bytes, i.e. 16 int32 values
MAX_NAME = 64

# ggml_tensor_flag
FLAG_INPUT = 1
FLAG_OUTPUT = 2
FLAG_PARAM = 4
FLAG_LOSS = 8
FLAG_COMPUTE = 16


@dataclass(frozen=True)
class TypeInfo:
    """One entry of ggml's type table."""

    value: int
    name: str
    block_size: int  # elements per block (1 for plain types)
    type_size: int  # bytes per block

    @property
    def is_quantized(self) -> bool:
        return self.block_size > 1

    def row_size(self, n: int) -> int:
        """Bytes taken by ``n`` consecutive elements (``n`` a multiple of the block size)."""
        return self.type_size * n // self.block_size


#: (value, name, elements per block, bytes per block) of every live ggml type, in enum order
_TYPE_ROWS = (
    (0, "F32", 1, 4), (1, "F16", 1, 2), (2, "Q4_0", 32, 18), (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22), (7, "Q5_1", 32, 24), (8, "Q8_0", 32, 34), (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84), (11, "Q3_K", 256, 110), (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176), (14, "Q6_K", 256, 210), (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66), (17, "IQ2_XS", 256, 74), (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50), (20, "IQ4_NL", 32, 18), (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82), (23, "IQ4_XS", 256, 136), (24, "I8", 1, 1), (25, "I16", 1, 2),
    (26, "I32", 1, 4), (27, "I64", 1, 8), (28, "F64", 1, 8), (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2), (34, "TQ1_0", 256, 54), (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17), (40, "NVFP4", 64, 36), (41, "Q1_0", 128, 18), (42, "Q2_0", 64, 18),
)

TYPE_COUNT = 43  # GGML_TYPE_COUNT


#: value -> TypeInfo for every live ggml type. Values missing from this table
#: (4, 5, 31-33, 36-38: removed types) are invalid on the wire.
TYPES: dict[int, TypeInfo] = {v: TypeInfo(v, name, block, size)
                              for v, name, block, size in _TYPE_ROWS}
TYPES_BY_NAME: dict[str, TypeInfo] = {t.name: t for t in TYPES.values()}

GGMLType = IntEnum("GGMLType", {t.name: t.value for t in TYPES.values()})
GGMLType.__doc__ = "enum ggml_type: a tensor's element type, by its wire value (TYPES has sizes)."

#: enum ggml_op, in order. GGML_OP_COUNT == 101 for protocol 7.0.0.
OPS: tuple[str, ...] = (
    "NONE", "DUP", "ADD", "ADD_ID", "ADD1", "ACC", "SUB", "MUL", "DIV", "SQR",
    "SQRT", "LOG", "SIN", "COS", "SUM", "SUM_ROWS", "CUMSUM", "MEAN", "ARGMAX",
    "COUNT_EQUAL", "REPEAT", "REPEAT_BACK", "CONCAT", "SILU_BACK", "NORM",
    "RMS_NORM", "RMS_NORM_BACK", "GROUP_NORM", "L2_NORM", "MUL_MAT", "MUL_MAT_ID",
    "OUT_PROD", "SCALE", "SET", "CPY", "CONT", "RESHAPE", "VIEW", "PERMUTE",
    "TRANSPOSE", "GET_ROWS", "GET_ROWS_BACK", "SET_ROWS", "DIAG", "DIAG_MASK_INF",
    "DIAG_MASK_ZERO", "SOFT_MAX", "SOFT_MAX_BACK", "ROPE", "ROPE_BACK", "CLAMP",
    "CONV_TRANSPOSE_1D", "IM2COL", "IM2COL_BACK", "IM2COL_3D", "COL2IM_1D",
    "CONV_2D", "CONV_3D", "CONV_2D_DW", "CONV_TRANSPOSE_2D", "POOL_1D", "POOL_2D",
    "POOL_2D_BACK", "UPSCALE", "PAD", "PAD_REFLECT_1D", "ROLL", "ARANGE",
    "TIMESTEP_EMBEDDING", "ARGSORT", "TOP_K", "LEAKY_RELU", "TRI", "FILL",
    "FLASH_ATTN_EXT", "FLASH_ATTN_BACK", "SSM_CONV", "SSM_SCAN", "WIN_PART",
    "WIN_UNPART", "GET_REL_POS", "ADD_REL_POS", "RWKV_WKV6", "GATED_LINEAR_ATTN",
    "RWKV_WKV7", "SOLVE_TRI", "GATED_DELTA_NET", "LIGHTNING_INDEXER",
    "DSV4_HC_COMB", "DSV4_HC_PRE", "DSV4_HC_POST", "UNARY", "MAP_CUSTOM1",
    "MAP_CUSTOM2", "MAP_CUSTOM3", "CUSTOM", "CROSS_ENTROPY_LOSS",
    "CROSS_ENTROPY_LOSS_BACK", "OPT_STEP_ADAMW", "OPT_STEP_SGD", "GLU",
)
OP_COUNT = len(OPS)
assert OP_COUNT == 101, "protocol 7.0.0 is defined for GGML_OP_COUNT == 101"

Op = IntEnum("Op", {name: i for i, name in enumerate(OPS)})
Op.__doc__ = "enum ggml_op: a graph node's operation, by its wire value (protocol 7.0.0)."

#: Ops whose parameters are host function pointers: meaningless (and dangerous)
#: on another machine, so a server refuses any graph that contains them.
FUNCTION_POINTER_OPS = frozenset({Op.MAP_CUSTOM1, Op.MAP_CUSTOM2, Op.MAP_CUSTOM3, Op.CUSTOM})

#: Ops that only reinterpret memory: they compute nothing.
VIEW_OPS = frozenset({Op.NONE, Op.VIEW, Op.RESHAPE, Op.PERMUTE, Op.TRANSPOSE})

#: enum ggml_unary_op, in order (op_params[0] of a UNARY node).
UNARY_OPS: tuple[str, ...] = (
    "ABS", "SGN", "NEG", "STEP", "TANH", "ELU", "RELU", "SIGMOID", "GELU",
    "GELU_QUICK", "SILU", "HARDSWISH", "HARDSIGMOID", "EXP", "EXPM1", "SOFTPLUS",
    "GELU_ERF", "XIELU", "FLOOR", "CEIL", "ROUND", "TRUNC",
)
UnaryOp = IntEnum("UnaryOp", {name: i for i, name in enumerate(UNARY_OPS)})

#: enum ggml_glu_op, in order (op_params[0] of a GLU node; op_params[1] = swapped).
GLU_OPS: tuple[str, ...] = (
    "REGLU", "GEGLU", "SWIGLU", "SWIGLU_OAI", "GEGLU_ERF", "GEGLU_QUICK", "SWIGLU_CLAMP",
)
GluOp = IntEnum("GluOp", {name: i for i, name in enumerate(GLU_OPS)})
GluOp.__doc__ = "enum ggml_glu_op: the kind of a GLU node (its op_params[0]), by its wire value."


def type_info(value: int) -> TypeInfo:
    """The type table entry for ``value``; ``ValueError`` names the bad value."""
    try:
        return TYPES[value]
    except KeyError:
        raise ValueError(
            f"unknown ggml type {value}: valid types are {sorted(TYPES)} (GGML_TYPE_COUNT={TYPE_COUNT})"
        ) from None


def check_shape(type_value: int, ne) -> TypeInfo:
    """The TypeInfo of a tensor with this type and shape; ValueError if ggml could not create it."""
    info = type_info(type_value)
    if info.block_size > 1 and ne[0] % info.block_size:
        raise ValueError(f"ne[0]={ne[0]} is not a multiple of {info.name}'s block size "
                         f"{info.block_size}")
    return info


def op_name(value: int) -> str:
    return OPS[value] if 0 <= value < OP_COUNT else f"<op {value}>"


def nbytes(info: TypeInfo, ne, nb) -> int:
    """ggml_nbytes: bytes spanned by a tensor with element counts ``ne`` and byte strides ``nb``.

    Computed with Python integers, so hostile 32-bit ne/nb values cannot overflow.
    """
    if any(n <= 0 for n in ne):
        return 0
    if info.block_size == 1:
        size = info.type_size
        for n, stride in zip(ne, nb):
            size += (n - 1) * stride
        return size
    size = ne[0] * nb[0] // info.block_size
    for n, stride in zip(ne[1:], nb[1:]):
        size += (n - 1) * stride
    return size


def contiguous_strides(info: TypeInfo, ne) -> tuple[int, int, int, int]:
    """The nb a freshly created contiguous tensor of shape ``ne`` has."""
    nb0 = info.type_size
    nb1 = nb0 * (ne[0] // info.block_size)
    nb2 = nb1 * ne[1]
    nb3 = nb2 * ne[2]
    return (nb0, nb1, nb2, nb3)
