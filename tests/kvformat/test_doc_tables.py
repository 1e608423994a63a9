"""docs/kv_format.md tables agree with the code (read both, compare cell by cell)."""

from __future__ import annotations

import pytest

from .doc_tables import code_tables, doc_tables


@pytest.mark.parametrize("name", ["formats", "sizes", "geometry", "versions", "worked"])
def test_doc_table_matches_code(name):
    doc = doc_tables()
    assert name in doc, f"docs/kv_format.md has no '<!-- table: {name} -->' table"
    assert doc[name] == code_tables()[name]


def test_parser_sees_a_changed_cell():
    text = "<!-- table: t -->\n| a | b |\n|---|---|\n| `x` | 1 |\n"
    assert doc_tables(text) == {"t": [["x", "1"]]}
    assert doc_tables(text.replace("| 1 |", "| 2 |")) != {"t": [["x", "1"]]}


def test_parser_keeps_an_escaped_pipe_in_a_cell():
    text = "<!-- table: t -->\n| a | b |\n|---|---|\n| `x` | [data \\| scale] |\n"
    assert doc_tables(text) == {"t": [["x", "[data | scale]"]]}
