import pytest

from eval.sim.transfer import Link, pipelined_transfer, whole_transfer


def test_whole_transfer_hand():
    link = Link(gbps=8.0, latency_s=0.01, slice_overhead_s=0.001)  # 1e9 B/s
    arrive, free = whole_transfer(link, 2e9, ready=5.0, link_free=6.0, n_slices=10)
    assert free == pytest.approx(6.0 + 2.0 + 0.01)
    assert arrive == pytest.approx(free + 0.01)


def test_pipelined_link_faster_than_compute_exposes_one_slice():
    link = Link(gbps=8.0)  # 1e9 B/s; 10 slices of 1e8 B = 0.1 s each
    # compute makes a slice every 0.5 s (prefill 0.5 -> 5.0); link keeps up
    arrive, _ = pipelined_transfer(link, 1e9, first_ready=0.5, prefill_end=5.0, n_slices=10, link_free=0.0)
    assert arrive == pytest.approx(5.1)


def test_pipelined_link_slower_than_compute_runs_back_to_back():
    link = Link(gbps=0.8)  # 1e8 B/s; slices of 1e8 B = 1 s each
    arrive, free = pipelined_transfer(link, 1e9, first_ready=0.1, prefill_end=1.0, n_slices=10, link_free=0.0)
    assert arrive == pytest.approx(0.1 + 10.0)
    # and a busy link delays the start
    arrive2, _ = pipelined_transfer(link, 1e9, first_ready=0.1, prefill_end=1.0, n_slices=10, link_free=3.0)
    assert arrive2 == pytest.approx(13.0)


def test_pipelining_never_slower_than_whole():
    link = Link(gbps=10.0, latency_s=1e-4, slice_overhead_s=0.0)
    for end, nbytes in [(0.2, 1e6), (1.0, 5e9), (3.0, 1e8)]:
        w, _ = whole_transfer(link, nbytes, end, 0.0)
        p, _ = pipelined_transfer(link, nbytes, 0.01, end, 36, 0.0)
        assert p <= w + 1e-12


def test_link_rejects_bad_bandwidth():
    with pytest.raises(ValueError, match="gbps"):
        Link(gbps=0.0)
