"""Builds the tables of docs/kv_format.md from the code, and parses them back from the doc."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from sglang_memha.kvformat import FORMAT_SPECS, FORMAT_VERSION_HISTORY, KVFormat, get_codec, kv_bytes_per_token, page_geometry
from sglang_memha.kvformat.golden import worked_input

DOC = Path(__file__).resolve().parents[2] / "docs" / "kv_format.md"


def _hex(t: torch.Tensor | None) -> str:
    return "" if t is None else bytes(t.contiguous().view(torch.uint8).reshape(-1).tolist()).hex()


def code_tables() -> dict[str, list[list[str]]]:
    formats = [[s.fmt.value, str(s.bits), s.scale_scope, str(s.group_size or "-"), s.scale_dtype,
                str(s.scale_entry_bytes), str(s.head_dim_multiple), s.dequant] for s in FORMAT_SPECS.values()]
    bf16_128, bf16_64 = kv_bytes_per_token("bf16", 8, 128), kv_bytes_per_token("bf16", 3, 64)
    sizes = [[f.value, str(kv_bytes_per_token(f, 3, 64)), str(kv_bytes_per_token(f, 8, 128)),
              f"{kv_bytes_per_token(f, 8, 128) / bf16_128:.4f}", f"{kv_bytes_per_token(f, 3, 64) / bf16_64:.4f}"]
             for f in KVFormat]
    geometry = []
    for f in KVFormat:
        g = page_geometry(f, 16, 8, 128)
        buffers = 4 if g.scale_bytes_per_head else 2  # K data (+ K scale), V data (+ V scale)
        geometry.append([f.value, str(g.data_bytes_per_head), str(g.scale_bytes_per_head),
                         str(g.v_scale_bytes_per_head), str(g.data_bytes), str(g.scale_bytes), str(g.v_scale_bytes),
                         str(buffers)])
    versions = [[str(v), text] for v, text in FORMAT_VERSION_HISTORY]
    worked = []
    for f in KVFormat:
        c = get_codec(f, role="k")
        x = worked_input(f)
        r = x.shape[0] - 1  # the token whose input is worked_example() (int4_kivi: the block's last)
        data, scales = c.quantize(x)
        raw = scales if f == KVFormat.FP8_E4M3_TENSOR else c.scale_bytes(scales)
        raw = raw if raw is None or f == KVFormat.FP8_E4M3_TENSOR else raw[r]
        y = c.dequantize(data, scales, torch.float32)[r, 0, :8].tolist()
        worked.append([f.value, _hex(data[r, 0, :8]), _hex(raw), " ".join(f"{v:.6g}" for v in y)])
    return {"formats": formats, "sizes": sizes, "geometry": geometry, "versions": versions, "worked": worked}


def doc_tables(text: str | None = None) -> dict[str, list[list[str]]]:
    """Every markdown table preceded by ``<!-- table: NAME -->``, header and rule rows dropped."""
    text = DOC.read_text() if text is None else text
    out = {}
    for m in re.finditer(r"<!-- table: (\w+) -->\n((?:\|.*\n)+)", text):
        # cells split on unescaped pipes; "\\|" in a cell is a literal "|" (markdown's escape)
        rows = [[c.strip().strip("`").replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]
                for line in m.group(2).splitlines()]
        out[m.group(1)] = rows[2:]
    return out


def markdown(name: str, header: list[str]) -> str:
    rows = code_tables()[name]
    lines = [f"<!-- table: {name} -->", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    cells = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines += ["| " + " | ".join(f"`{c}`" if i == 0 else c for i, c in enumerate(r)) + " |" for r in cells]
    return "\n".join(lines)
