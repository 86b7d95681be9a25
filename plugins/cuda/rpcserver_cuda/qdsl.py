"""A tiny expression language for "element ``j`` of a quantized block", with two back ends.

Every ggml block type stores ``QK`` elements in ``type_size`` bytes. Its
dequantization is written here ONCE, as an expression of the element index
``J`` (0 <= J < QK) and of the block's bytes (``u8``, ``i8``, ``f16`` reads at
byte offsets that are themselves expressions). The same expression tree is then

* emitted as CUDA C (:func:`emit_device_function`): a ``__device__`` function
  ``float f(const unsigned char *b, int j)`` in single-assignment form, used
  by the dequantization kernel and by the fused matrix-vector kernel, and
* evaluated with NumPy (:func:`evaluate`) over many blocks at once, which is
  how the formulas are checked against ggml on a machine without a GPU.

Semantics are C's, for the values that occur: integers are ``int`` (the
emulator uses int64; no expression here leaves the int32 range or shifts a
negative number), floats are IEEE float32. Float multiplications, additions
and subtractions are emitted as ``__fmul_rn``/``__fadd_rn``/``__fsub_rn``,
which CUDA never contracts into fused multiply-adds, so the GPU rounds
exactly like the NumPy evaluation (and like ggml's scalar C code compiled
without contraction).
"""

from __future__ import annotations

import numpy as np

__all__ = ["Expr", "J", "u8", "i8", "f16", "const", "fconst", "select", "table", "call",
           "to_float", "evaluate", "emit_device_function", "FUNCTIONS"]


class Expr:
    """A node: ``op`` with ``args``; ``kind`` is "i" (int) or "f" (float32)."""

    __slots__ = ("op", "args", "kind")

    def __init__(self, op: str, args: tuple, kind: str):
        self.op, self.args, self.kind = op, args, kind

    # -- arithmetic ----------------------------------------------------------------
    def _bin(self, other, op, reverse=False):
        a, b = (lift(other), self) if reverse else (self, lift(other))
        if op in _INT_ONLY:
            if a.kind != "i" or b.kind != "i":
                raise TypeError(f"operator {op} needs integers")
            return _fold(Expr(op, (a, b), "i"))
        if op in _COMPARE:
            if a.kind != b.kind:
                a, b = to_float(a), to_float(b)
            return Expr(op, (a, b), "i")
        if "f" in (a.kind, b.kind):
            return Expr(op, (to_float(a), to_float(b)), "f")
        return _fold(Expr(op, (a, b), "i"))

    def __add__(self, o): return self._bin(o, "+")
    def __radd__(self, o): return self._bin(o, "+", True)
    def __sub__(self, o): return self._bin(o, "-")
    def __rsub__(self, o): return self._bin(o, "-", True)
    def __mul__(self, o): return self._bin(o, "*")
    def __rmul__(self, o): return self._bin(o, "*", True)
    def __floordiv__(self, o): return self._bin(o, "/")
    def __mod__(self, o): return self._bin(o, "%")
    def __rshift__(self, o): return self._bin(o, ">>")
    def __lshift__(self, o): return self._bin(o, "<<")
    def __rlshift__(self, o): return self._bin(o, "<<", True)
    def __and__(self, o): return self._bin(o, "&")
    def __or__(self, o): return self._bin(o, "|")
    def __xor__(self, o): return self._bin(o, "^")
    def __lt__(self, o): return self._bin(o, "<")
    def __le__(self, o): return self._bin(o, "<=")
    def __gt__(self, o): return self._bin(o, ">")
    def __ge__(self, o): return self._bin(o, ">=")

    def eq(self, o): return self._bin(o, "==")
    def ne(self, o): return self._bin(o, "!=")

    def __neg__(self): return Expr("neg", (self,), self.kind)

    def __bool__(self):
        raise TypeError("an Expr has no truth value (use select())")

    __hash__ = object.__hash__


_INT_ONLY = {"/", "%", ">>", "<<", "&", "|", "^"}


def _fold(e: Expr) -> Expr:
    """Integer operations on two non-negative constants become a constant."""
    a, b = e.args
    if a.op != "const" or b.op != "const" or a.args[0] < 0 or b.args[0] < 0:
        return e
    x, y = a.args[0], b.args[0]
    if op_is_division(e.op) and y == 0:
        return e
    return const(int(_NP_BIN[e.op](np.int64(x), np.int64(y))))


def op_is_division(op: str) -> bool:
    return op in ("/", "%")
_COMPARE = {"<", "<=", ">", ">=", "==", "!="}


def lift(v) -> Expr:
    if isinstance(v, Expr):
        return v
    if isinstance(v, (bool, np.bool_)):
        raise TypeError("booleans are not expressions")
    if isinstance(v, (int, np.integer)):
        return const(int(v))
    if isinstance(v, (float, np.floating)):
        return fconst(float(v))
    raise TypeError(f"cannot use {v!r} in an expression")


def const(v: int) -> Expr:
    if not -2**31 <= v < 2**31:
        raise ValueError(f"integer constant {v} does not fit in an int")
    return Expr("const", (int(v),), "i")


def fconst(v: float) -> Expr:
    if float(np.float32(v)) != v:
        raise ValueError(f"float constant {v!r} is not exactly a float32")
    return Expr("fconst", (float(v),), "f")


#: the element index within the block
J = Expr("j", (), "i")


def u8(offset) -> Expr:
    """The unsigned byte at ``offset`` (an int expression) of the block."""
    return Expr("u8", (lift(offset),), "i")


def i8(offset) -> Expr:
    """The byte at ``offset``, read as a signed char."""
    return Expr("i8", (lift(offset),), "i")


def u16(offset) -> Expr:
    """Little-endian unsigned 16-bit value at ``offset`` (any alignment)."""
    return u8(offset) | (u8(lift(offset) + 1) << 8)


def f16(offset) -> Expr:
    """The IEEE half at ``offset``, as float32."""
    return Expr("f16", (u16(offset),), "f")


def to_float(e) -> Expr:
    e = lift(e)
    return e if e.kind == "f" else Expr("i2f", (e,), "f")


def select(cond, a, b) -> Expr:
    """``cond ? a : b`` (both branches evaluated by the emulator; they must be safe)."""
    cond, a, b = lift(cond), lift(a), lift(b)
    if cond.kind != "i":
        raise TypeError("select() needs an integer condition")
    if a.kind != b.kind:
        a, b = to_float(a), to_float(b)
    return Expr("select", (cond, a, b), a.kind)


def table(name: str, values, index) -> Expr:
    """``name[index]`` for a constant table of small signed integers (emitted as ``__constant__``)."""
    values = tuple(int(v) for v in values)
    if not all(-128 <= v < 128 for v in values):
        raise ValueError("tables hold signed chars")
    return Expr("table", (name, values, lift(index)), "i")


# -- named scalar functions: (C helper source, NumPy implementation, result kind) -------------------

def _np_e8m0_half(x):
    x = x.astype(np.uint32)
    bits = np.where(x < 2, np.uint32(0x00200000) << x, (x - 1) << 23).astype(np.uint32)
    return bits.view(np.float32)


def _np_ue4m3(x):
    x = x.astype(np.int64)
    exp = (x >> 3) & 0xF
    man = (x & 0x7).astype(np.float32)
    with np.errstate(all="ignore"):
        sub = np.ldexp(man, -9).astype(np.float32)
        norm = np.ldexp((np.float32(1.0) + man / np.float32(8.0)).astype(np.float32),
                        exp - 7).astype(np.float32)
    raw = np.where(exp == 0, sub, norm).astype(np.float32)
    out = (raw * np.float32(0.5)).astype(np.float32)
    return np.where((x == 0) | (x == 0x7F), np.float32(0.0), out).astype(np.float32)


FUNCTIONS = {
    # E8M0 exponent byte -> 2**(e-127) / 2 (ggml's "half" scale, for the doubled FP4 values)
    "rpc_e8m0_half": ("""\
__device__ __forceinline__ float rpc_e8m0_half(int x) {
    const unsigned int bits = x < 2 ? (0x00200000u << x) : ((unsigned int)(x - 1) << 23);
    return __uint_as_float(bits);
}
""", _np_e8m0_half, "f"),
    # unsigned E4M3 (bias 7) -> value / 2; 0 and 0x7F give 0
    "rpc_ue4m3_half": ("""\
__device__ __forceinline__ float rpc_ue4m3_half(int x) {
    if (x == 0 || x == 0x7F) return 0.0f;
    const int e = (x >> 3) & 0xF;
    const int m = x & 0x7;
    const float raw = e == 0 ? ldexpf((float)m, -9) : ldexpf(__fadd_rn(1.0f, __fdiv_rn((float)m, 8.0f)), e - 7);
    return __fmul_rn(raw, 0.5f);
}
""", _np_ue4m3, "f"),
}


def call(name: str, arg) -> Expr:
    if name not in FUNCTIONS:
        raise KeyError(name)
    return Expr("call", (name, lift(arg)), FUNCTIONS[name][2])


# ------------------------------------------------------------------------------ NumPy back end

def evaluate(expr: Expr, blocks: np.ndarray, qk: int) -> np.ndarray:
    """Evaluate ``expr`` for every element of every block: (n_blocks, type_size) uint8 -> (n_blocks, qk) float32."""
    blocks = np.ascontiguousarray(blocks, dtype=np.uint8)
    n = blocks.shape[0]
    rows = np.arange(n).reshape(-1, 1)
    memo: dict[int, np.ndarray] = {}

    def ev(e: Expr):
        key = id(e)
        if key in memo:
            return memo[key]
        op, a = e.op, e.args
        if op == "j":
            r = np.arange(qk, dtype=np.int64).reshape(1, -1)
        elif op == "const":
            r = np.int64(a[0])
        elif op == "fconst":
            r = np.float32(a[0])
        elif op in ("u8", "i8"):
            off = np.broadcast_to(np.asarray(ev(a[0]), dtype=np.int64), (n, qk))
            if off.size and (off.min() < 0 or off.max() >= blocks.shape[1]):
                raise IndexError(f"byte offset out of the block: [{off.min()}, {off.max()}]")
            r = blocks[rows, off].astype(np.int64)
            if op == "i8":
                r = np.where(r >= 128, r - 256, r)
        elif op == "f16":
            bits = np.asarray(ev(a[0])).astype(np.uint16)
            r = bits.view(np.float16).astype(np.float32)
        elif op == "i2f":
            r = np.asarray(ev(a[0])).astype(np.float32)
        elif op == "neg":
            r = -ev(a[0])
        elif op == "select":
            c, x, y = ev(a[0]), ev(a[1]), ev(a[2])
            r = np.where(np.asarray(c) != 0, x, y)
            if e.kind == "f":
                r = r.astype(np.float32)
        elif op == "table":
            values = np.array(a[1], dtype=np.int64)
            idx = np.asarray(ev(a[2]))
            r = values[idx]
        elif op == "call":
            r = FUNCTIONS[a[0]][1](np.asarray(ev(a[1])))
        else:
            x, y = ev(a[0]), ev(a[1])
            if e.kind == "f" and op in ("+", "-", "*"):
                x, y = np.float32(x) if np.isscalar(x) else x, np.float32(y) if np.isscalar(y) else y
            with np.errstate(all="ignore"):
                r = _NP_BIN[op](x, y)
            if op in _COMPARE:
                r = np.asarray(r).astype(np.int64)
            elif e.kind == "f":
                r = np.asarray(r).astype(np.float32)
        memo[key] = r
        return r

    out = ev(to_float(expr))
    return np.broadcast_to(np.asarray(out, dtype=np.float32), (n, qk)).copy()


_NP_BIN = {
    "+": np.add, "-": np.subtract, "*": np.multiply, "/": np.floor_divide, "%": np.remainder,
    ">>": np.right_shift, "<<": np.left_shift, "&": np.bitwise_and, "|": np.bitwise_or,
    "^": np.bitwise_xor, "<": np.less, "<=": np.less_equal, ">": np.greater,
    ">=": np.greater_equal, "==": np.equal, "!=": np.not_equal,
}


# ------------------------------------------------------------------------------ CUDA C back end

_C_FLOAT_BIN = {"+": "__fadd_rn", "-": "__fsub_rn", "*": "__fmul_rn"}


def _c_float(v: float) -> str:
    text = repr(float(v))
    if "inf" in text or "nan" in text:
        raise ValueError("no inf/nan constants")
    if "e" not in text and "." not in text:
        text += ".0"
    return text + "f"


def collect(expr: Expr):
    """(tables {name: values}, helper function names) used by ``expr``."""
    tables, funcs, seen = {}, [], set()

    def walk(e):
        if id(e) in seen:
            return
        seen.add(id(e))
        if e.op == "table":
            name, values = e.args[0], e.args[1]
            if tables.setdefault(name, values) != values:
                raise ValueError(f"table {name} defined twice with different values")
        elif e.op == "call" and e.args[0] not in funcs:
            funcs.append(e.args[0])
        for a in e.args:
            if isinstance(a, Expr):
                walk(a)

    walk(expr)
    return tables, funcs


def emit_device_function(name: str, expr: Expr) -> str:
    """``__device__ float name(const unsigned char *b, int j)`` computing ``expr``, one statement per node."""
    lines: list[str] = []
    names: dict[int, str] = {}

    def ref(e: Expr) -> str:
        key = id(e)
        if key in names:
            return names[key]
        op, a = e.op, e.args
        if op == "j":
            return "j"
        if op == "const":
            return str(a[0]) if a[0] >= 0 else f"({a[0]})"
        if op == "fconst":
            return _c_float(a[0])
        if op == "u8":
            text = f"(int)b[{ref(a[0])}]"
        elif op == "i8":
            text = f"(int)(signed char)b[{ref(a[0])}]"
        elif op == "f16":
            text = f"rpc_h2f((unsigned short)({ref(a[0])}))"
        elif op == "i2f":
            text = f"(float)({ref(a[0])})"
        elif op == "neg":
            text = f"-({ref(a[0])})"
        elif op == "select":
            text = f"({ref(a[0])}) ? ({ref(a[1])}) : ({ref(a[2])})"
        elif op == "table":
            text = f"(int){a[0]}[{ref(a[2])}]"
        elif op == "call":
            text = f"{a[0]}({ref(a[1])})"
        elif e.kind == "f" and op in _C_FLOAT_BIN:
            text = f"{_C_FLOAT_BIN[op]}({ref(a[0])}, {ref(a[1])})"
        else:
            text = f"({ref(a[0])}) {op} ({ref(a[1])})"
        var = f"v{len(names)}"
        ctype = "float" if e.kind == "f" else "int"
        lines.append(f"    const {ctype} {var} = {text};")
        names[key] = var
        return var

    result = ref(to_float(expr))
    body = "\n".join(lines)
    return (f"__device__ __forceinline__ float {name}(const unsigned char * __restrict__ b, const int j) {{\n"
            f"{body}\n    return {result};\n}}\n")
