"""The served-quality metrics (eval/quality_served.py) on hand-built SGLang meta_info."""
import math

import pytest

from eval.quality_served import step_metrics, summarize, topk_kl


def test_topk_kl_hand_computed():
    # p = (0.5, 0.5), q = (0.8, 0.2) after renormalizing over the served ids {1, 2}
    ref = {1: math.log(0.25), 2: math.log(0.25), 3: math.log(0.5)}  # id 3 is not in the served top-k
    got = {1: math.log(0.4), 2: math.log(0.1)}
    want = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert topk_kl(ref, got) == pytest.approx(want, rel=1e-12)
    assert topk_kl(got, got) == 0.0
    with pytest.raises(KeyError):
        topk_kl({1: 0.0}, got)


def _served(tokens, tops):
    return {"output_token_logprobs": [[-0.1, t, None] for t in tokens],
            "output_top_logprobs": [[[lp, t, None] for t, lp in top.items()] for top in tops]}


def _scored(last, tokens, argmax, id_logps):
    """SGLang's shape with logprob_start_len = prompt length - 1: entry 0 is the prompt's last
    token, with no logprob (None in the top and ids lists)."""
    return {"input_token_logprobs": [[None, last, None]] + [[-0.2, t, None] for t in tokens],
            "input_top_logprobs": [None] + [[[-0.1, m, None]] for m in argmax],
            "input_token_ids_logprobs": [None] + [[[lp, t, None] for t, lp in d.items()] for d in id_logps]}


def test_step_metrics_agreement_and_kl_per_step():
    tops = [{7: -0.1, 8: -2.5}, {9: -0.3, 7: -1.5}]
    served = _served([7, 9], tops)
    # step 0: the reference's argmax is 7 (agrees), same logprobs on {7, 8} -> KL 0;
    # step 1: the reference's argmax is 7 (disagrees), logprobs differ -> KL > 0
    scored = _scored(3, [7, 9], [7, 7], [{7: -0.1, 8: -2.5}, {9: -1.5, 7: -0.3}])
    agree, kls = step_metrics(served, scored, prompt_last=3)
    assert agree == [True, False]
    assert kls[0] == pytest.approx(0.0, abs=1e-15) and kls[1] == pytest.approx(
        topk_kl({9: -1.5, 7: -0.3}, {9: -0.3, 7: -1.5}))
    s = summarize(agree, kls)
    assert s["top1_agreement"] == 0.5 and s["steps"] == 2 and s["kl_topk_mean"] == pytest.approx(kls[1] / 2)


def test_step_metrics_refuses_misaligned_scoring():
    served = _served([7, 9], [{7: -0.1}, {9: -0.1}])
    scored = _scored(5, [3, 7], [7, 9], [{7: -0.1}, {9: -0.1}])  # scored from one position too early
    with pytest.raises(ValueError, match="does not line up"):
        step_metrics(served, scored, prompt_last=3)
