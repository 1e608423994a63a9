"""Trace window -> scaled workload: order, gaps, rates and length ratios."""
import numpy as np
import pytest

from eval.goodput.workload import Scaling, load_window, spread_ties, window
from eval.sim.trace import TRACES, Trace


def _trace():
    arr = np.array([0.0, 1.0, 1.5, 4.0, 4.0, 9.0])
    inp = np.array([800, 16000, 40, 2400, 8, 12000])
    out = np.array([80, 400, 8, 24, 1, 1000])
    return Trace("t", arr, inp, out)


def test_lengths_scaled_and_clipped():
    wl = window(_trace(), 6, 0, Scaling(1 / 8, min_input=16, max_input=1024, min_output=2, max_output=32))
    # hand-computed: 800/8=100, 16000/8=2000->1024, 40/8=5->16, 2400/8=300, 8/8=1->16, 12000/8=1500->1024
    assert wl.input_len.tolist() == [100, 1024, 16, 300, 16, 1024]
    # 80/8=10, 400/8=50->32, 8/8=1->2, 24/8=3, 1/8=0->2, 1000/8=125->32
    assert wl.output_len.tolist() == [10, 32, 2, 3, 2, 32]


def test_unclipped_requests_keep_their_length_ratios():
    tr = _trace()
    wl = window(tr, 6, 0, Scaling(1 / 8, min_input=1, max_input=10**6, min_output=1, max_output=10**6))
    # every pair of requests keeps its input ratio (up to rounding to whole tokens)
    np.testing.assert_allclose(wl.input_len / wl.input_len[0], tr.input_len / tr.input_len[0], rtol=0.02)
    # and each request keeps its input:output ratio where both are large enough not to round away
    big = tr.output_len >= 80
    np.testing.assert_allclose((wl.input_len / wl.output_len)[big], (tr.input_len / tr.output_len)[big], rtol=0.02)


def test_arrivals_keep_order_and_relative_gaps_at_any_rate():
    wl = window(_trace(), 6, 0, Scaling())
    assert wl.native_rate == pytest.approx(5 / 9)
    for rate in (0.05, 0.5, 3.0):
        t = wl.arrivals_at(rate)
        assert t[0] == 0 and np.all(np.diff(t) > 0)  # order kept (the tie at 4.0 was spread)
        assert (len(t) - 1) / t[-1] == pytest.approx(rate)  # mean rate is the one asked for
        np.testing.assert_allclose(np.diff(t) / t[-1], np.diff(wl.arrival) / wl.arrival[-1])
        assert wl.multiplier(rate) == pytest.approx(rate * 9 / 5)


def test_window_offset_rebases_time():
    wl = window(_trace(), 3, 2, Scaling(1.0, min_input=1, max_input=10**6))
    # clock resolution 0.5 s (1.0 -> 1.5); the two requests stamped 4.0 become 4.0 and 4.25
    assert wl.arrival.tolist() == [0.0, 2.5, 2.75]
    assert wl.input_len.tolist() == [40, 2400, 8]


@pytest.mark.parametrize("n,offset", [(1, 0), (3, 4), (2, -1)])
def test_bad_windows_are_refused(n, offset):
    with pytest.raises(ValueError):
        window(_trace(), n, offset, Scaling())


def test_bad_scaling_is_refused():
    with pytest.raises(ValueError, match="length_scale"):
        Scaling(0)
    with pytest.raises(ValueError, match="min_output"):
        Scaling(min_output=0)


@pytest.mark.parametrize("name", TRACES)
def test_vendored_traces_give_sorted_windows(name):
    wl = load_window(name, 50, 100, Scaling())
    assert len(wl) == 50 and wl.arrival[0] == 0 and np.all(np.diff(wl.arrival) >= 0)
    assert wl.input_len.min() >= 16 and wl.input_len.max() <= 2048
    assert wl.output_len.min() >= 2 and wl.output_len.max() <= 32


def test_spread_ties_hand_computed():
    # clock 3 s; three requests at 0 -> 0, 1, 2; two at 3 -> 3, 4.5; one at 9 stays
    assert spread_ties(np.array([0.0, 0.0, 0.0, 3.0, 3.0, 9.0])).tolist() == [0, 1, 2, 3, 4.5, 9]
    no_ties = np.array([0.0, 0.25, 1.0])
    assert spread_ties(no_ties).tolist() == no_ties.tolist()


def test_mooncake_conversation_bursts_are_spread_within_its_3s_clock():
    wl = load_window("mooncake_conversation", 20, 0, Scaling())
    assert np.all(np.diff(wl.arrival) > 0) and wl.arrival[-1] < 6.0  # 10 at 0 s, 10 of 16 at 3 s
    assert wl.arrival[:10] == pytest.approx(np.arange(10) * 0.3, abs=0.01)  # its clock: 2.997 s
