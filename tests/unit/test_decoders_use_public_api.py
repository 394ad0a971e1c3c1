"""The decoders (rsd/speculative.py, rsd/fastpath.py) drive the heads and the tokenizer through their public
API only: no ``obj._private`` attribute of another object (RFSQHead, DraftHead, RFSQTokenizer, ...), checked
on the source with ``ast``. A decoder's own ``self._x`` is its own business."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from rsd.heads import DraftHead, RFSQHead
from rsd.tokenizer import RFSQTokenizer

pytestmark = pytest.mark.unit

PKG = Path(__file__).resolve().parents[2] / "rsd"
DECODERS = ("speculative.py", "fastpath.py")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def foreign_private_uses(source: str) -> list[str]:
    """``line: expression`` for every private attribute read on anything but ``self`` (``head._step``,
    ``self.head._step``, ``getattr(tok, "_sum_layers")``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                found.append(f"{node.lineno}: {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "setattr")
              and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant)
              and isinstance(node.args[1].value, str) and _private(node.args[1].value)):
            found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_checker_finds_private_uses() -> None:
    """The rule below cannot pass for want of finding anything."""
    source = ("def f(self, head, tok):\n    head._step(s)\n    self.main._advance(s, c)\n"
              "    getattr(tok, '_sum_layers')\n    self._mine()\n    head.__class__\n")
    assert sorted(use.split(": ")[1] for use in foreign_private_uses(source)) == [
        "getattr(tok, '_sum_layers')", "head._step", "self.main._advance"]


@pytest.mark.parametrize("module", DECODERS)
def test_decoders_use_no_private_attribute_of_heads_or_tokenizer(module: str) -> None:
    uses = foreign_private_uses((PKG / module).read_text())
    private_api = {n for cls in (RFSQHead, DraftHead, RFSQTokenizer) for n in dir(cls) if _private(n)}
    assert not uses, (f"rsd/{module} reads private attributes of other objects: {uses}. Use the public API "
                      f"(RFSQHead.start/step/advance/teacher_forced/rollout, "
                      f"RFSQTokenizer.decode_from_indices(validate=False)); the heads' and tokenizer's private "
                      f"names include {sorted(private_api & {u.rsplit('.', 1)[-1] for u in uses})}.")
