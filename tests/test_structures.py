"""``docs/structures.md`` names every module of the package, and only paths that exist.

Package section (the ``## `sglang_memha/` ...`` heading up to the next ``## ``): paths relative to
``sglang_memha/``; every ``.py`` file there except ``__init__.py`` must appear as its full
relative path in backticks. Everywhere in the doc, a backticked path (a token with a ``/`` or
ending in ``.py``, no spaces; ``*`` globs allowed) must exist, relative to ``sglang_memha/`` in
the package section and to the repository root elsewhere. And no module is over 400 lines."""
from __future__ import annotations

import glob
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
PKG = REPO / "sglang_memha"
DOC = REPO / "docs" / "structures.md"
PATH = re.compile(r"^[\w.*-]+(/[\w.*-]*)+$|^[\w-]+\.py$")


def _sections() -> tuple[str, str]:
    text = DOC.read_text()
    start = text.index("\n", text.index("## `sglang_memha/`"))  # after the heading line
    end = text.find("\n## ", start + 1)
    end = len(text) if end < 0 else end
    return text[start:end], text[:start] + text[end:]


def _paths(text: str) -> set[str]:
    return {t for t in re.findall(r"`([^`\n]+)`", text) if PATH.match(t)}


def test_every_module_is_named_by_its_full_path():
    package, _ = _sections()
    named = _paths(package)
    modules = sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if p.name != "__init__.py")
    missing = [m for m in modules if m not in named]
    assert not missing, f"docs/structures.md does not name (full path, in backticks): {missing}"


def test_every_named_path_exists():
    package, rest = _sections()
    gone = []
    for text, root in ((package, PKG), (rest, REPO)):
        for p in sorted(_paths(text)):
            if not glob.glob(str(root / p)):
                gone.append(f"{p} (under {root.relative_to(REPO) or '.'})")
    assert not gone, f"docs/structures.md names paths that do not exist: {gone}"


def test_no_module_over_400_lines():
    long = {str(p.relative_to(PKG)): n for p in PKG.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"split these modules (400 lines at most): {long}"
