"""eval/request_timeline.py reads the per-request lines SGLang itself writes: the lines here are made
by SGLang's own SchedulerReqTimeStats.convert_to_duration, so a change of its format fails here."""
from __future__ import annotations

import pytest

pytest.importorskip("sglang")
from sglang.srt.disaggregation.utils import DisaggregationMode  # noqa: E402
from sglang.srt.observability import req_time_stats as rts  # noqa: E402

from eval import request_timeline  # noqa: E402


def _line(mode, room: int, out_len: int, **times) -> str:
    stats = rts.SchedulerReqTimeStats(disagg_mode=mode)
    for k, v in times.items():
        setattr(stats, k, v)
    head = (f"ReqTimeStats(rid=abc, bootstrap_room={room}, input_len=100, cached_input_len=0, "
            f"output_len={out_len}, attempts=1, type={stats.disagg_mode_str()})")
    return f"[2026-12-07 10:00:00] {head}: {stats.convert_to_duration()}"


def test_prefill_and_decode_lines_join_by_room_with_sglangs_stage_times():
    # prefill: bootstrap queue at t=10, bootstrap done 10.5, waiting queue 11, forward 12..14.
    p = _line(DisaggregationMode.PREFILL, 7, 1, prefill_bootstrap_queue_entry_time=10.0,
              bootstrap_done_time=10.5, wait_queue_entry_time=11.0, forward_entry_time=12.0,
              completion_time=14.0)
    # decode: prealloc at 10.2, bootstrap done 10.4, transfer queue 10.6, KV committed 14.5,
    # forward (first token) 15.0, done 18.0.
    d = _line(DisaggregationMode.DECODE, 7, 2, decode_prealloc_queue_entry_time=10.2, bootstrap_done_time=10.4,
              decode_transfer_queue_entry_time=10.6, wait_queue_entry_time=14.5, forward_entry_time=15.0,
              completion_time=18.0)
    other = _line(DisaggregationMode.DECODE, 8, 2, decode_prealloc_queue_entry_time=1.0)  # no prefill line
    (row,) = request_timeline.join([p, "noise"], [d, other])
    assert row["room"] == 7 and row["input_len"] == 100 and row["output_len"] == 2
    assert row["p_bootstrap"] == pytest.approx(0.5) and row["p_forward"] == pytest.approx(2.0)
    assert row["d_bootstrap"] == pytest.approx(0.2) and row["d_alloc_wait"] == pytest.approx(0.2)
    assert row["d_transfer"] == pytest.approx(3.9) and row["d_forward"] == pytest.approx(3.0)
    # SGLang's queue time is its own (the seconds counted in queue_duration_s); 0 here.
    assert row["d_queue"] == pytest.approx(0.0)
    # the decode's forward began 0.2 + 0.2 + 3.9 + 0 s after its prealloc entry, which is 0.2 s
    # after the prefill's entry: 4.5 s after it (wall clock offsets cancel).
    assert row["d_lag"] == pytest.approx(4.5, abs=2e-3)
    summary = request_timeline.summarize([row, dict(row, d_forward=5.0)])
    assert summary["d_forward"] == {"median": 4.0, "mean": 4.0, "max": 5.0}
