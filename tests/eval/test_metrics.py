"""SLO attainment, goodput and the rate search against hand-computed answers."""
import math

import pytest

from eval.goodput.metrics import (SLO, RequestResult, allowed_misses, attainment, goodput, next_rate, passes,
                                  percentiles)

SLO_ = SLO(ttft_s=2.0, tpot_s=0.1)


def req(i, ttft, tpot, n=11, ok=True):
    """A finished request with ``n`` tokens whose mean TPOT is ``tpot``."""
    return RequestResult(i, 100, n, 0.0, ok, ttft=ttft, latency=ttft + (n - 1) * tpot, generated=n)


def test_tpot_is_mean_time_per_token_after_the_first():
    r = RequestResult(0, 10, 5, 0.0, True, ttft=1.0, latency=1.8, generated=5)
    assert r.tpot == pytest.approx(0.2)
    assert RequestResult(0, 10, 1, 0.0, True, ttft=1.0, latency=1.0, generated=1).tpot == 0.0
    assert RequestResult(0, 10, 5, 0.0, False, error="x").tpot is None


def test_meets_needs_both_slos_and_success():
    assert req(0, 2.0, 0.1).meets(SLO_)  # exactly at both limits
    assert not req(0, 2.01, 0.05).meets(SLO_)
    assert not req(0, 0.5, 0.11).meets(SLO_)
    assert not req(0, 0.5, 0.05, ok=False).meets(SLO_)


def test_deadline_bounds_latency_of_a_request_that_meets_both():
    assert SLO_.deadline(11) == pytest.approx(3.0)
    assert SLO_.deadline(1) == pytest.approx(2.0)
    r = req(0, 2.0, 0.1)
    assert r.latency <= SLO_.deadline(11) + 1e-12


def test_attainment_exactly_at_the_90_percent_boundary():
    good = [req(i, 1.0, 0.05) for i in range(18)]
    bad = [req(18, 3.0, 0.05), req(19, 1.0, 0.2)]
    att = attainment(good + bad, 20, SLO_)
    assert att == pytest.approx(0.9) and passes(att)
    att = attainment(good[:17] + bad, 20, SLO_)  # one more miss: 17/20
    assert att == pytest.approx(0.85) and not passes(att)
    # missing results (cut off, never sent) count as missed
    assert attainment(good, 20, SLO_) == pytest.approx(0.9)
    assert not passes(attainment(good[:17], 20, SLO_))


@pytest.mark.parametrize("n,allowed", [(20, 2), (10, 1), (6, 0), (9, 0), (30, 3), (100, 10), (1, 0)])
def test_allowed_misses(n, allowed):
    assert allowed_misses(n) == allowed
    # the definition: n - allowed requests pass, one fewer does not
    assert passes((n - allowed) / n) and not passes((n - allowed - 1) / n)


def test_goodput_of_a_sweep_hand_computed():
    # attainment falls with rate: 1.0, 0.95, 0.9 (boundary: passes), 0.85, 0.2
    pts = [(0.5, 1.0), (1.0, 0.95), (1.5, 0.9), (2.0, 0.85), (3.0, 0.2)]
    assert goodput(pts) == (1.5, "bracketed")
    assert goodput(list(reversed(pts))) == (1.5, "bracketed")  # order of testing does not matter
    # a noisy pass above a miss does not count: goodput stops at the first miss from below
    assert goodput([(1.0, 0.95), (1.4, 0.8), (2.0, 0.95)]) == (1.0, "bracketed")
    assert goodput([(1.0, 0.95), (2.0, 0.9)]) == (2.0, "lower_bound")
    assert goodput([(1.0, 0.5), (2.0, 0.0)]) == (0.0, "none")
    with pytest.raises(ValueError):
        goodput([])


def test_goodput_from_synthetic_latencies():
    # 10 requests per run; at rate r request i waits i * r seconds in a queue (made-up model):
    # ttft_i = 0.5 + i * r; meets TTFT <= 2.0 iff i * r <= 1.5. TPOT 0.05 always meets.
    def run(rate):
        return attainment([req(i, 0.5 + i * rate, 0.05) for i in range(10)], 10, SLO_)

    # hand count: r=0.1 -> all 10; r=0.15 -> i <= 10 -> 10; r=0.2 -> i <= 7.5 -> 8 (0.8);
    # r=0.166 -> i <= 9.03 -> 10 (1.0)... r=1/6 exactly: i*r<=1.5 -> i<=9 -> 10 meet
    assert run(0.1) == 1.0 and run(0.2) == pytest.approx(0.8)
    assert run(1.5 / 8) == pytest.approx(0.9)  # i <= 8 -> 9 of 10: exactly the target
    pts = [(r, run(r)) for r in (0.1, 0.15, 1.5 / 8, 0.2, 0.3)]
    assert goodput(pts) == (pytest.approx(1.5 / 8), "bracketed")


def test_percentiles():
    p = percentiles([1, 2, 3, 4, None, 5])
    assert p == {"p50": 3.0, "p90": pytest.approx(4.6), "p99": pytest.approx(4.96)}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}


def _search(g, start=1.0, step=2 ** 0.5, refine=1, span=16.0, max_runs=20):
    hist = []
    res = step ** (1 / 2 ** refine)
    while len(hist) < max_runs:
        r = next_rate(hist, start, step, res, start / span, start * span)
        if r is None:
            break
        hist.append((r, r <= g))
    return hist, res


@pytest.mark.parametrize("g", [0.05, 0.3, 0.71, 0.99, 1.0, 1.3, 3.7, 12.0])
def test_search_brackets_the_goodput_within_the_resolution(g):
    hist, res = _search(g)
    rates = [r for r, _ in hist]
    assert len(rates) == len(set(rates))  # never the same rate twice
    ok = [r for r, p in hist if p]
    bad = [r for r, p in hist if not p]
    if g < 1 / 16:  # below the span: nothing passes
        assert not ok and goodput([(r, 1.0 if p else 0.0) for r, p in hist]) == (0.0, "none")
        return
    lo, hi = max(ok), min(bad)
    assert lo <= g < hi and hi / lo <= res * (1 + 1e-6)
    assert goodput([(r, 1.0 if p else 0.0) for r, p in hist]) == (lo, "bracketed")


def test_search_steps_hand_computed():
    # start 1, step 2, one bisection: 1 passes -> 2 misses -> sqrt(2) passes -> done (2 / 1.414 <= 1.414)
    hist = [(1.0, True)]
    assert next_rate(hist, 1.0, 2.0, math.sqrt(2), 0.1, 10) == 2.0
    hist.append((2.0, False))
    assert next_rate(hist, 1.0, 2.0, math.sqrt(2), 0.1, 10) == pytest.approx(math.sqrt(2))
    hist.append((math.sqrt(2), True))
    assert next_rate(hist, 1.0, 2.0, math.sqrt(2), 0.1, 10) is None
    # misses walk down; stops at the bottom of the span
    assert next_rate([(1.0, False)], 1.0, 2.0, 1.4, 0.5, 10) == 0.5
    assert next_rate([(1.0, False), (0.5, False)], 1.0, 2.0, 1.4, 0.5, 10) is None
    # passes walk up; stops at the top of the span (goodput then a lower bound)
    assert next_rate([(1.0, True), (2.0, True)], 1.0, 2.0, 1.4, 0.1, 3.0) is None


def test_bad_slo_and_search_arguments():
    with pytest.raises(ValueError):
        SLO(0, 1)
    with pytest.raises(ValueError):
        next_rate([], 1.0, 1.0, 1.2, 0.1, 10)
    with pytest.raises(ValueError):
        attainment([], 0, SLO_)
