"""``eval/bench_serving_pd.summarize``: per-config medians and ranges, and memha/stock ratios taken
per round (same round, page size and workload), hand-computed."""
from __future__ import annotations

from eval.bench_serving_pd import summarize


def _run(cfg, rnd, ttft, tpot, median_tpot, itl, p99=None):
    return {"config": cfg, "round": rnd, "page_size": 1, "workload": "trace", "mean_ttft_ms": ttft,
            "mean_tpot_ms": tpot, "median_tpot_ms": median_tpot, "mean_itl_ms": itl, "p99_tpot_ms": p99}


def test_ratios_are_per_round_and_missing_metrics_are_skipped():
    runs = [_run("stock_bf16", 0, 100.0, 10.0, 4.0, 2.0), _run("memha_fp8_pipelined", 0, 50.0, 30.0, 6.0, 3.0),
            _run("stock_bf16", 1, 200.0, 20.0, 8.0, 4.0), _run("memha_fp8_pipelined", 1, 100.0, 20.0, 8.0, 2.0),
            _run("stock_bf16", 2, 100.0, 10.0, 5.0, 1.0), _run("memha_fp8_pipelined", 2, 150.0, 15.0, 5.0, 1.5)]
    table = summarize(runs, ["stock_bf16", "memha_fp8_pipelined"])
    stock, memha = table["page1/trace/stock_bf16"], table["page1/trace/memha_fp8_pipelined"]
    assert stock["mean_tpot_ms"] == {"median": 10.0, "min": 10.0, "max": 20.0}
    assert "tpot_ratio" not in stock and "p99_tpot_ms" not in stock  # no p99 values were given
    assert memha["tpot_ratio"]["per_round"] == [3.0, 1.0, 1.5] and memha["tpot_ratio"]["median"] == 1.5
    assert memha["ttft_ratio"]["per_round"] == [0.5, 0.5, 1.5]
    assert memha["median_tpot_ratio"]["per_round"] == [1.5, 1.0, 1.0]
    assert memha["itl_ratio"] == {"median": 1.5, "min": 0.5, "max": 1.5, "per_round": [1.5, 0.5, 1.5]}
    assert "p99_tpot_ratio" not in memha


def _client(ttft, itl, out):
    return {"input_len": 100, "output_len": out, "ttft_s": ttft, "itl_s": itl}


def test_paired_tpot_skips_requests_without_text_on_either_side():
    from eval.bench_serving_pd import add_paired_tpot, request_tpot_s

    assert request_tpot_s(_client(2.0, [0.5, 1.5], 3)) == 1.0
    # ttft 0: bench_serving saw no text (its TPOT would be the whole latency); one token: no TPOT
    assert request_tpot_s(_client(0.0, [], 2)) is None and request_tpot_s(_client(1.0, [], 1)) is None
    stock = dict(_run("stock_bf16", 0, 1.0, 1.0, 1.0, 1.0),
                 client=[_client(1.0, [2.0], 2), _client(1.0, [4.0], 2), _client(0.0, [], 2)])
    memha = dict(_run("memha_fp8_pipelined", 0, 1.0, 1.0, 1.0, 1.0),
                 client=[_client(1.0, [1.0], 2), _client(0.0, [], 2), _client(1.0, [9.0], 2)])
    add_paired_tpot([stock, memha])
    # only request 0 streamed text in both runs
    assert memha["paired_requests"] == 1
    assert memha["paired_mean_tpot_ms"] == 1000.0 and memha["paired_base_mean_tpot_ms"] == 2000.0
    table = summarize([stock, memha], ["stock_bf16", "memha_fp8_pipelined"])
    assert table["page1/trace/memha_fp8_pipelined"]["paired_tpot_ratio"] == {
        "median": 0.5, "min": 0.5, "max": 0.5, "per_round": [0.5], "requests": [1]}
