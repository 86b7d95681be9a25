"""Which type combinations each op supports, as data.

:data:`SUPPORT` maps every op of :data:`rpcserver.executor.OP_TABLE` -- and,
for UNARY and GLU, every sub-op (``op_params[0]``) -- to a list of
:class:`Rule`. A node is supported when one rule matches its destination
type and the types of its sources (``src0``, ``src1``, ...; a source slot
the rule does not mention must be absent). :func:`check_support` is run by
:class:`rpcserver.executor.GraphPlan` on every node before anything is
computed: a combination that no rule lists fails the graph with a
:class:`~rpcserver.errors.GraphError` naming the op, the types, the shapes
and what is supported, and the session closes the connection.

How the table was made: each op's implementation was read for the types it
handles, ggml's CPU backend for the combinations it computes (ggml's op
constructors and ``ggml-cpu/ops.cpp`` decide the rest: most ops only take
F32, a few F16/BF16, quantized sources only where ggml dequantizes), and
then every combination listed here is checked against ggml's CPU backend by
tests/test_ops_support.py (one conformance case per concrete combination,
on top of the op suites). A combination rpcserver could compute but ggml
refuses (aborts on) is NOT listed: there is nothing to conform to, and no
ggml client produces it.

docs/ops.md is generated from this module by scripts/gen_ops_doc.py.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import lru_cache

from .. import ggml
from ..errors import GraphError
from ..ggml import GGMLType, GluOp, Op, UnaryOp

# --------------------------------------------------------------------------- type sets


class TypeSet(frozenset):
    """A named set of ggml type values."""

    name: str

    def __new__(cls, name: str, types):
        obj = super().__new__(cls, (int(t) for t in types))
        obj.name = name
        return obj

    def __or__(self, other: "TypeSet") -> "TypeSet":
        return TypeSet(f"{self.name} or {other.name}", frozenset(self) | frozenset(other))

    def __sub__(self, other: "TypeSet") -> "TypeSet":
        return TypeSet(f"{self.name} except {other.name}", frozenset(self) - frozenset(other))

    def __reduce__(self):
        return (TypeSet, (self.name, tuple(self)))

    def type_names(self) -> list[str]:
        return [ggml.TYPES[t].name for t in sorted(self)]


def _one(name: str) -> TypeSet:
    return TypeSet(name, [GGMLType[name]])


def _named(name: str, *types: str) -> TypeSet:
    return TypeSet(name, [GGMLType[t] for t in types])


F32, F16, BF16 = _one("F32"), _one("F16"), _one("BF16")
I16, I32, I64 = _one("I16"), _one("I32"), _one("I64")
Q8_0 = _one("Q8_0")

#: the floating-point types ops compute on
FLOAT = _named("FLOAT", "F32", "F16", "BF16")
#: row indices
INDEX = _named("INDEX", "I32", "I64")
#: quantized types rpcserver reads (ArrayLib.dequantize: gguf.quants) and ggml's CPU reads
QUANTIZED_READ = _named(
    "QUANTIZED_READ",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ4_NL", "IQ3_S", "IQ2_S", "IQ4_XS", "IQ1_M",
    "TQ1_0", "TQ2_0", "MXFP4", "NVFP4")
#: quantized types rpcserver also writes (ArrayLib.quantize: gguf.quants) as ggml does
QUANTIZED_WRITE = _named("QUANTIZED_WRITE",
                         "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "TQ1_0", "TQ2_0", "MXFP4")
#: the K/V cache types llama.cpp offers (--cache-type-k/-v)
KV_CACHE = _named("KV_CACHE", "F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "IQ4_NL", "Q5_0",
                  "Q5_1")
#: every type whose bytes can be copied as they are, verified: all but Q8_1 (see SET_NOTES)
COPYABLE = TypeSet("COPYABLE", (t for t in ggml.TYPES if t != GGMLType.Q8_1))
#: quantized types whose vec_dot partner in ggml-cpu is Q8_0 (MUL_MAT takes Q8_0 activations)
DOT_Q8_0 = _named("DOT_Q8_0", "Q4_0", "Q5_0", "Q8_0", "IQ4_NL", "MXFP4", "NVFP4")

#: the named sets, in the order docs/ops.md explains them
NAMED_SETS = (FLOAT, INDEX, QUANTIZED_READ, QUANTIZED_WRITE, KV_CACHE, DOT_Q8_0, COPYABLE)
#: what docs/ops.md says about each named set
SET_NOTES = {
    "QUANTIZED_READ": "quantized types rpcserver dequantizes (with gguf.quants). Not readable: "
                      "Q1_0 and Q2_0 (gguf.quants cannot dequantize them yet), Q8_K and Q8_1 "
                      "(ggml's internal activation formats; gguf.quants has no dequantizer, "
                      "ggml-cpu takes neither as a weight).",
    "QUANTIZED_WRITE": "quantized types rpcserver also writes (quantizes with gguf.quants, "
                       "whose quantizers give ggml's results). The K-quants, IQ types and NVFP4 "
                       "are read-only here: gguf.quants cannot quantize them.",
    "KV_CACHE": "the cache types llama.cpp offers for K and V (`--cache-type-k/-v`); "
                "FLASH_ATTN_EXT takes any mix of them.",
    "DOT_Q8_0": "quantized types ggml-cpu multiplies with Q8_0 activations (their vec_dot "
                "type); MUL_MAT and MUL_MAT_ID also accept src1 already in Q8_0.",
    "COPYABLE": "same-type copies move bytes and need no arithmetic, so they work for every "
                "type; Q8_1 is left out because no conformance test can make valid Q8_1 data "
                "through ggml (it is an activation format with no quantizer of its own).",
}


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Same:
    """A slot whose type must equal another slot's (``"dst"``, ``"src0"``, ...)."""

    slot: str

    def describe(self) -> str:
        return f"={self.slot}"


@dataclass(frozen=True)
class Opt:
    """An optional source: absent, or of the given types."""

    spec: object  # TypeSet | Same

    def describe(self) -> str:
        return f"{describe_spec(self.spec)} (optional)"


def describe_spec(spec) -> str:
    if isinstance(spec, TypeSet):
        return spec.name
    return spec.describe()


@dataclass(frozen=True)
class Rule:
    """One supported family: ``dst`` and each source slot (a TypeSet, Same or Opt)."""

    dst: object
    srcs: tuple = ()
    note: str = ""

    def slots(self) -> list[tuple[str, object]]:
        return [("dst", self.dst)] + [(f"src{i}", s) for i, s in enumerate(self.srcs)]

    def matches(self, dst: int, srcs: tuple) -> bool:
        if len(srcs) > len(self.srcs) and any(s is not None for s in srcs[len(self.srcs):]):
            return False
        actual = {"dst": dst}
        for i in range(len(self.srcs)):
            actual[f"src{i}"] = srcs[i] if i < len(srcs) else None
        for name, spec in self.slots():
            value = actual[name]
            if isinstance(spec, Opt):
                if value is None:
                    continue
                spec = spec.spec
            if value is None:
                return False
            if isinstance(spec, Same):
                if value != actual.get(spec.slot):
                    return False
            elif value not in spec:
                return False
        return True

    def describe(self) -> str:
        return ", ".join(f"{name} {describe_spec(spec)}" for name, spec in self.slots())


def rule(dst, *srcs, note: str = "") -> Rule:
    return Rule(dst, tuple(srcs), note)


SAME_DST = Same("dst")
SAME_SRC0 = Same("src0")
SAME_SRC1 = Same("src1")

#: (op, sub-op or None) -> the rules. Sub-ops: UNARY's and GLU's op_params[0].
SUPPORT: dict[tuple[int, int | None], tuple[Rule, ...]] = {}

#: ops whose op_params[0] selects a sub-op with its own entry
SUB_OPS = {int(Op.UNARY): UnaryOp, int(Op.GLU): GluOp}


def _add(op, *rules: Rule, sub=None) -> None:
    key = (int(op), None if sub is None else int(sub))
    assert key not in SUPPORT, f"{key} listed twice"
    SUPPORT[key] = tuple(rules)



# --------------------------------------------------------------------------- the table
#
# Every combination below is checked against ggml by tests/test_ops_support.py: widen a rule
# only together with a passing conformance check. Combinations found NOT to conform (and so
# left out on purpose) are named in the notes / comments.

_FLOAT_SAME = rule(FLOAT, SAME_DST)  # one float type in and out

# element-wise binary ops: ggml-cpu's binary_op; a quantized ADD is add_q_f32
_BINARY = (
    rule(FLOAT, SAME_DST, SAME_DST),
    rule(F16 | BF16, SAME_DST, F32),
)
_add(Op.ADD, *_BINARY,
     rule(F32, F16 | BF16, F32, note="ggml_add_cast"),
     rule(F32, QUANTIZED_READ, F32, note="quantized src0: ggml_add_cast"),
     rule(QUANTIZED_WRITE, SAME_DST, F32, note="quantized src0, result re-quantized"))
for _op in (Op.SUB, Op.MUL, Op.DIV):
    _add(_op, *_BINARY)
# (src1 F16/BF16/I32 with an F32 src0: ggml reads src1's bits as a float, not listed)
_add(Op.ADD1,
     rule(FLOAT, SAME_DST, SAME_DST),
     rule(F16 | BF16, SAME_DST, F32),
     rule(QUANTIZED_WRITE, SAME_DST, F32, note="result re-quantized"))
_add(Op.ADD_ID, rule(F32, F32, F32, I32))
_add(Op.ACC, rule(F32, F32, F32))
_add(Op.SET, rule(F32 | I32, SAME_DST, SAME_DST))
_add(Op.SCALE, rule(F32 | BF16, SAME_DST))
_add(Op.CLAMP, rule(F32 | F16, SAME_DST))
for _op in (Op.SQR, Op.SQRT, Op.LOG, Op.SIN, Op.COS, Op.SUM):
    _add(_op, _FLOAT_SAME)
for _op in (Op.SUM_ROWS, Op.MEAN, Op.CUMSUM, Op.NORM, Op.RMS_NORM, Op.L2_NORM, Op.GROUP_NORM,
            Op.TRI, Op.DIAG_MASK_INF, Op.DIAG_MASK_ZERO, Op.PAD, Op.ROLL, Op.UPSCALE,
            Op.TIMESTEP_EMBEDDING):
    _add(_op, rule(F32, F32))
_add(Op.LEAKY_RELU, rule(F32 | F16, SAME_DST))
_add(Op.FILL, rule(F32 | F16, SAME_DST))
_add(Op.ARANGE, rule(F32))
_add(Op.ARGMAX, rule(I32, F32))
_add(Op.ARGSORT, rule(I32, F32))
_add(Op.TOP_K, rule(I32, F32))
_add(Op.COUNT_EQUAL, rule(I64, I32, I32))
_add(Op.REPEAT, rule(F32 | F16 | BF16 | I16 | I32, SAME_DST))
_add(Op.CONCAT, rule(COPYABLE, SAME_DST, SAME_DST, note="quantized: whole blocks"))

# copies
_add(Op.DUP, rule(COPYABLE, SAME_DST, note="bytes copied"))
_add(Op.CONT, rule(COPYABLE, SAME_DST, note="bytes copied"))
_add(Op.CPY,
     rule(COPYABLE, SAME_DST, SAME_DST, note="same type: bytes copied"),
     rule(FLOAT, FLOAT, SAME_DST),
     rule(F32, QUANTIZED_READ, SAME_DST, note="dequantize"),
     rule(QUANTIZED_WRITE, F32 | F16, SAME_DST, note="quantize"),
     rule(QUANTIZED_WRITE - Q8_0, BF16, SAME_DST,
          note="quantize (BF16 -> Q8_0: ggml-cpu's SIMD quantizer rounds ties differently)"),
     rule(I32, F32, SAME_DST), rule(F32, I32, SAME_DST))

# rows (src2 of SET_ROWS is the destination tensor itself)
_add(Op.GET_ROWS, rule(F32, FLOAT | QUANTIZED_READ, I32), rule(I32, I32, I32))
_add(Op.GET_ROWS_BACK, rule(F32, F32 | F16, I32))
_add(Op.SET_ROWS, rule(FLOAT | QUANTIZED_WRITE, F32 | F16, INDEX, SAME_DST,
                       note="src2: the destination"))

# matrix products
_MATMUL = (
    rule(F32, FLOAT | QUANTIZED_READ, F32),
    rule(F32, F16 | BF16, SAME_SRC0, note="src1 already in src0's vec_dot type"),
    rule(F32, DOT_Q8_0, Q8_0, note="src1 already in src0's vec_dot type"),
)
# (src0 F32 with an F16 src1 computes, but ggml-cpu's supports_op refuses it: not listed)
_add(Op.MUL_MAT, *_MATMUL, rule(F32, F32, BF16, note="BF16 src1 widened to F32"))
_add(Op.MUL_MAT_ID, *(rule(r.dst, *r.srcs, I32, note=r.note) for r in _MATMUL))

# attention
_add(Op.SOFT_MAX, rule(F32, F32, Opt(F32 | F16), Opt(F32), note="src1: mask, src2: sinks"))
for _op in (Op.ROPE, Op.ROPE_BACK):
    _add(_op, rule(F32 | F16, SAME_DST, I32, Opt(F32), note="src2: frequency factors"))
_add(Op.FLASH_ATTN_EXT,
     rule(F32, F32, FLOAT | QUANTIZED_READ, SAME_SRC1, Opt(F16), Opt(F32),
          note="q, k, v, mask, sinks"),
     rule(F32, F32, FLOAT | QUANTIZED_READ, F32, Opt(F16), Opt(F32)),
     rule(F32, F32, KV_CACHE, KV_CACHE, Opt(F16), Opt(F32), note="K and V of different types"))

for _u in UnaryOp:
    _add(Op.UNARY, _FLOAT_SAME, sub=_u)
for _g in GluOp:
    _types = {GluOp.SWIGLU_OAI: F32, GluOp.SWIGLU_CLAMP: F32 | F16}.get(_g, FLOAT)
    _add(Op.GLU, rule(_types, SAME_DST, Opt(SAME_DST), note="src1: the gate (split form)"),
         sub=_g)


# --------------------------------------------------------------------------- queries


def expand(rules):
    """Every concrete (dst, srcs) a list of rules allows; srcs without trailing absent slots."""
    seen = set()
    for r in rules:
        names = [name for name, _ in r.slots()]
        choices = []
        for _, spec in r.slots():
            optional = isinstance(spec, Opt)
            base = spec.spec if optional else spec
            values = [base] if isinstance(base, Same) else sorted(base)
            choices.append(([None] if optional else []) + values)
        for combo in itertools.product(*choices):
            actual = dict(zip(names, combo))
            resolved = tuple(actual[v.slot] if isinstance(v, Same) else v for v in combo)
            if any(isinstance(v, Same) for v in combo) and None in (
                    actual[v.slot] for v in combo if isinstance(v, Same)):
                continue
            dst, srcs = resolved[0], list(resolved[1:])
            while srcs and srcs[-1] is None:
                srcs.pop()
            key = (dst, tuple(srcs))
            if key not in seen and r.matches(*key):
                seen.add(key)
                yield key


def op_label(op: int, sub=None) -> str:
    name = ggml.op_name(op)
    enum = SUB_OPS.get(int(op))
    if enum is not None and sub is not None:
        try:
            name += f"({enum(sub).name})"
        except ValueError:
            name += f"(<{enum.__name__} {sub}>)"
    return name


def _type_name(t) -> str:
    return "-" if t is None else ggml.TYPES[t].name if t in ggml.TYPES else f"<type {t}>"


@lru_cache(maxsize=8192)
def is_supported(op: int, sub, dst: int, srcs: tuple) -> bool:
    """Whether the table lists this combination (``sub``: op_params[0] for UNARY/GLU, else None)."""
    rules = SUPPORT.get((int(op), sub))
    return bool(rules) and any(r.matches(dst, srcs) for r in rules)


def node_key(node):
    """(op, sub, dst type, src types) of a graph node (rpcserver.graph.GraphTensor)."""
    t = node.rpc
    sub = t.op_params[0] if t.op in SUB_OPS else None
    srcs = tuple(s.rpc.type if s is not None else None for s in node.src)
    return t.op, sub, t.type, srcs


def check_support(node) -> None:
    """Raise GraphError unless the table lists the node's op and type combination."""
    op, sub, dst, srcs = node_key(node)
    if is_supported(op, sub, dst, srcs):
        return
    label = op_label(op, sub)
    types = ", ".join([f"dst={_type_name(dst)}"]
                      + [f"src{i}={_type_name(s)}" for i, s in enumerate(srcs) if s is not None])
    shapes = ", ".join([f"dst {list(node.rpc.ne)}"]
                       + [f"src{i} {list(s.rpc.ne)}" for i, s in enumerate(node.src)
                          if s is not None])
    rules = SUPPORT.get((int(op), sub))
    if rules:
        supported = "; ".join(r.describe() for r in rules)
        raise GraphError(f"op {label} does not support types {types} (shapes {shapes}); "
                         f"supported: {supported}")
    raise GraphError(f"op {label} is not supported for any types (got {types}; shapes {shapes})")
