"""docs/kv_format.md's "Worked example (v4)" block agrees with the v4 geometry computed from
``format_spec`` alone (pure arithmetic; tests/quant/test_pool_v4.py checks the same block against a
real pool's byte offsets)."""

from __future__ import annotations

import re

import pytest

from sglang_memha.kvformat import KVFormat, format_spec, page_geometry
from sglang_memha.kvformat.layout import PoolLayout

from .doc_tables import DOC

HEADING = "Worked example (v4)"


def parse_example(text: str | None = None) -> tuple[str, dict[str, int]]:
    """(format named on the block's first comment line, {name: int}) of the first fenced block
    after the heading. Every ``name = value`` line must hold an integer (``#`` starts a comment)."""
    text = DOC.read_text() if text is None else text
    lines = text.splitlines()
    heads = [i for i, line in enumerate(lines) if line.startswith("#") and line.lstrip("#").strip() == HEADING]
    assert heads, f"docs/kv_format.md has no '{HEADING}' heading"
    fences = [i for i in range(heads[0] + 1, len(lines)) if lines[i].startswith("```")]
    assert len(fences) >= 2, f"no fenced block under '{HEADING}'"
    assert not any(lines[i].startswith("#") and not lines[i].startswith("#!") and lines[i].lstrip("#").startswith(" ")
                   for i in range(heads[0] + 1, fences[0])), "the block must come before the next heading"
    fmt, values = None, {}
    for line in lines[fences[0] + 1:fences[1]]:
        body, _, comment = line.partition("#")
        if fmt is None and not body.strip() and comment.strip():
            fmt = comment.split(",")[0].strip()
        if "=" in body:
            name, value = (p.strip() for p in body.split("=", 1))
            assert re.fullmatch(r"[a-z_0-9]+", name) and re.fullmatch(r"-?\d+", value), line
            assert name not in values, f"{name} given twice"
            values[name] = int(value)
    return fmt, values


def expected(fmt: str, v: dict[str, int]) -> dict[str, int]:
    """Every number of the block, from the inputs it names and the v4 rules of the doc."""
    spec = format_spec(fmt)
    d, h, p, n_layers = v["head_dim"], v["num_kv_heads"], v["page_size"], v["num_layers"]
    slot, head, layer = v["slot"], v["head"], v["layer"]
    db, sb = spec.data_bytes_per_head(d), spec.scale_bytes_per_head(d)
    page = slot // p
    out = dict(head_dim=d, num_kv_heads=h, page_size=p, num_layers=n_layers, slot=slot, head=head, layer=layer,
               data_bytes_per_head=db, scale_bytes_per_head=sb, page=page,
               k_data_offset=(slot * h + head) * db, k_scale_offset=(slot * h + head) * sb,
               page_data_start=page * p * h * db, page_data_end=(page + 1) * p * h * db,
               page_scale_start=page * p * h * sb, page_scale_end=(page + 1) * p * h * sb)
    kinds = ["k_data", "k_scale", "v_data", "v_scale"] if sb else ["k_data", "v_data"]
    for i, kind in enumerate(kinds):
        out[f"entry_{kind}_layer{layer}"] = i * n_layers + layer
    out["num_entries"] = len(kinds) * n_layers
    return out


def test_worked_example_block_is_the_v4_arithmetic():
    fmt, v = parse_example()
    assert fmt == KVFormat.FP8_E4M3.value
    assert (v["head_dim"], v["num_kv_heads"], v["page_size"], v["num_layers"]) == (128, 8, 16, 28)
    assert (v["slot"], v["head"], v["layer"]) == (37, 3, 5)
    assert v == expected(fmt, v)


def test_worked_example_consistency():
    """The row lies in its page, the data row is 16-byte aligned, and the page lengths are
    ``page_geometry``'s; the entry indices are ``PoolLayout``'s publication order."""
    fmt, v = parse_example()
    assert v["page_data_start"] <= v["k_data_offset"] < v["page_data_end"]
    assert v["page_scale_start"] <= v["k_scale_offset"] < v["page_scale_end"]
    assert v["k_data_offset"] % 16 == 0
    geo = page_geometry(fmt, v["page_size"], v["num_kv_heads"], v["head_dim"])
    assert v["page_data_end"] - v["page_data_start"] == geo.data_bytes
    assert v["page_scale_end"] - v["page_scale_start"] == geo.scale_bytes
    layout = PoolLayout(fmt, v["head_dim"], v["num_kv_heads"], v["num_layers"], v["page_size"])
    assert len(layout.entries) == v["num_entries"]
    for side in "kv":
        for kind in ("data", "scale"):
            e = layout.entries[v[f"entry_{side}_{kind}_layer{v['layer']}"]]
            assert (e.side, e.kind, e.layer) == (side, kind, v["layer"])


@pytest.mark.parametrize("fmt", list(KVFormat), ids=str)
def test_rule_gives_aligned_rows_and_disjoint_pages(fmt):
    """The doc's rules for every format at head_dim 128: data rows 16-byte aligned, pages tile the
    buffers, and formats without scale rows publish [K data, V data] (stock SGLang's order)."""
    v = dict(head_dim=128, num_kv_heads=3, page_size=1, num_layers=4, slot=9, head=2, layer=3)
    e = expected(fmt, v)
    assert e["k_data_offset"] % 16 == 0
    assert e["page_data_start"] == e["k_data_offset"] - v["head"] * e["data_bytes_per_head"]
    layout = PoolLayout(fmt, 128, 3, 4, 1)
    assert [(x.side, x.kind) for x in layout.entries[::4]] == (
        [("k", "data"), ("k", "scale"), ("v", "data"), ("v", "scale")] if e["scale_bytes_per_head"]
        else [("k", "data"), ("v", "data")])
    assert e["num_entries"] == len(layout.entries)


def test_parser_sees_a_changed_value():
    text = f"### {HEADING}\nintro\n\n```\n# fp8_e4m3, x\npage = 2   # note\n```\n"
    assert parse_example(text) == ("fp8_e4m3", {"page": 2})
    assert parse_example(text.replace("= 2", "= 3"))[1] == {"page": 3}
    with pytest.raises(AssertionError):
        parse_example(text.replace("= 2", "= two"))
