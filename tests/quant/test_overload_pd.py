"""Overload through the router (issue 9, CI-sized): 100 requests with Poisson arrivals at 2x the
capacity the same deployment just measured, a decode pool small enough to force SGLang's
retraction on quantized (fp8) pages (150 requests until session 16; 100 still keep the pool, 8
requests deep, full for most of the run, for a third less CI time). Every request completes or is rejected with a message;
none lost; both pools back to 0 used tokens after the drain. The 1,000-request run is
``eval/overload_pd.py`` (eval/results/overload.json)."""
from __future__ import annotations

import pytest

from eval.overload_pd import run
from tests.conftest import descendants

pytestmark = pytest.mark.cluster

N = 100


def test_overload_loses_nothing_and_leaks_nothing(tiny_model, tmp_path):
    res = run(tiny_model, n=N, rate_x=2.0, prompt=64, out=64, probe=20, decode_tokens=1024,
              reserved=16, timeout=600, log_dir=str(tmp_path), progress=False)
    print(res)
    assert res["requests_lost"] == 0, res
    assert res["completed"] + res["rejected"] == N, res
    assert res["completed"] > 0, res
    assert res["pages_leaked"] == 0, res
    assert res["retractions"] > 0, res  # the decode had to retract running requests
    assert descendants() == []
