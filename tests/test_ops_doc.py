"""docs/ops.md is generated from the op table and can never drift from it.

* docs/ops.md equals what scripts/gen_ops_doc.py renders now (regenerate with
  ``python scripts/gen_ops_doc.py`` after changing rpcserver.ops.support);
* every op in rpcserver.executor.OP_TABLE has a type-support entry, and every
  entry names an implemented op (UNARY and GLU: every sub-op of ggml).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from rpcserver import ggml
from rpcserver.executor import OP_TABLE
from rpcserver.ops import support

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ops.md"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_ops_doc", ROOT / "scripts" / "gen_ops_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_ops_md_is_the_generators_output():
    want = _generator().render()
    assert DOC.exists(), "docs/ops.md is missing: run `python scripts/gen_ops_doc.py`"
    have = DOC.read_text(encoding="utf-8")
    assert have == want, ("docs/ops.md is out of date with rpcserver.ops.support / OP_TABLE: "
                          "run `python scripts/gen_ops_doc.py`")


def test_every_implemented_op_has_a_support_entry_and_vice_versa():
    implemented = set(OP_TABLE)
    listed = {op for op, _ in support.SUPPORT}
    assert implemented - listed == set(), (
        "ops in OP_TABLE without a type-support entry (every node of theirs would be refused): "
        + ", ".join(ggml.op_name(o) for o in sorted(implemented - listed)))
    assert listed - implemented == set(), (
        "type-support entries for ops that are not implemented: "
        + ", ".join(ggml.op_name(o) for o in sorted(listed - implemented)))
    assert not implemented & set(ggml.VIEW_OPS), "view ops never reach the op table"


def test_sub_op_entries_are_complete():
    for op, enum in support.SUB_OPS.items():
        have = {sub for o, sub in support.SUPPORT if o == op}
        assert have == {int(s) for s in enum}, (
            f"{ggml.op_name(op)}: sub-ops without an entry: "
            f"{sorted(enum(s).name for s in set(map(int, enum)) - have)}")
    for op, sub in support.SUPPORT:
        assert (sub is None) == (op not in support.SUB_OPS), (ggml.op_name(op), sub)
        assert support.SUPPORT[(op, sub)], f"{ggml.op_name(op)} {sub}: no rule"


def test_generator_check_mode_agrees():
    gen = _generator()
    assert gen.main(["--check"]) == 0
