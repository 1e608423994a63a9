"""``--attention-backend memha_triton``: registration through SGLang's own extension points, the
refusal when that fails, and the start-up refusals (in-process; the served path is in
``test_memha_triton_pd.py``)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("sglang")

from sglang_memha.kvformat import KVFormat  # noqa: E402
from sglang_memha.sglang_ext import attention_backend as ab  # noqa: E402


def test_register_adds_the_choice_and_the_factory_once():
    from sglang.srt.arg_groups.choices import ATTENTION_BACKEND_CHOICES
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    ab.register()
    ab.register()
    assert ATTENTION_BACKEND_CHOICES.count("memha_triton") == 1
    assert ATTENTION_BACKENDS["memha_triton"] is ab.create_backend


def test_sglang_argparse_accepts_the_backend():
    from sglang.srt.server_args import prepare_server_args

    ab.register()
    sa = prepare_server_args(["--model-path", "x", "--attention-backend", "memha_triton", "--device", "cpu"])
    assert sa.attention_backend == "memha_triton"


def test_failed_registration_refuses_only_servers_that_ask_for_it(monkeypatch):
    from sglang.srt.plugins.hook_registry import HookType

    from sglang_memha.sglang_ext import plugin

    def broken():
        raise ImportError("cannot import name 'add_attention_backend_choices'")

    monkeypatch.setattr(ab, "register", broken)
    hooks = []
    registry = SimpleNamespace(register=lambda target, hook, kind: hooks.append((target, hook, kind)))
    plugin._register_attention_backend(registry, HookType, in_scheduler=False)
    (target, refuse, kind), = hooks
    assert target == "sglang.srt.server_args.prepare_server_args" and kind == HookType.BEFORE
    with pytest.raises(SystemExit, match=r"--attention-backend memha_triton is unavailable: registering it with "
                                         r"SGLang failed \(ImportError\("):
        refuse(["--model-path", "m", "--attention-backend", "memha_triton"])
    refuse(["--model-path", "m", "--attention-backend", "torch_native"])  # others start
    plugin._register_attention_backend(registry, HookType, in_scheduler=True)
    target, refuse, _ = hooks[-1]
    assert target == "sglang.srt.managers.scheduler.Scheduler.__init__"
    with pytest.raises(SystemExit, match="memha_triton is unavailable"):
        refuse(SimpleNamespace(attention_backend="memha_triton", prefill_attention_backend=None,
                               decode_attention_backend=None), None)
    refuse(SimpleNamespace(attention_backend="torch_native", prefill_attention_backend=None,
                           decode_attention_backend=None), None)


def _runner(**kw):
    hf = SimpleNamespace(attn_logit_softcapping=kw.pop("softcap", None))
    mc = SimpleNamespace(hf_config=hf, hf_text_config=hf, is_encoder_decoder=kw.pop("encdec", False))
    spec = SimpleNamespace(is_none=lambda: not kw.get("spec", False))
    pool = SimpleNamespace(k_offset=kw.get("k_offset"))
    return SimpleNamespace(model_config=mc, use_mla_backend=kw.get("mla", False), token_to_kv_pool=pool,
                           sliding_window_size=kw.get("window"), spec_algorithm=spec)


@pytest.mark.parametrize("kw, words", [
    ({"mla": True}, "MLA models"),
    ({"window": 4096}, "sliding-window attention"),
    ({"spec": True}, "speculative decoding"),
    ({"encdec": True}, "encoder-decoder"),
    ({"softcap": 50.0, "k_offset": "c"}, "logit soft-capping with MEMHA_K_OFFSET (attn_logit_softcapping=50.0"),
])
def test_refusals_name_the_reason(kw, words):
    assert ab.refusals(_runner(), dcp_size=1) == []
    (reason,) = ab.refusals(_runner(**kw), dcp_size=1)
    assert words in reason
    assert ab.refusals(_runner(), dcp_size=2) == [
        "decode context parallelism (the kernel reads whole requests, not DCP shards)"]


def test_soft_capping_alone_is_served():
    assert ab.refusals(_runner(softcap=50.0), dcp_size=1) == []  # the kernel applies the cap


def test_format_refusal_names_the_formats_it_reads():
    for ok in ("bf16", "fp8_e4m3", "fp8_e4m3fnuz", "int8", "int4_g32", "int4_g64"):
        assert ab.format_refusal(KVFormat(ok)) is None
    assert "int4_kivi (its open K block lives in a side table" in ab.format_refusal(KVFormat.INT4_KIVI)
    assert "MEMHA_KV_FORMAT=int4_kivi_g64 (its open K block lives in a side table the kernel does not read)" in \
        ab.format_refusal(KVFormat.INT4_KIVI_G64)
    assert "--kv-cache-dtype fp8_e4m3" in ab.format_refusal(KVFormat.FP8_E4M3_TENSOR)


def test_quantized_pool_accepts_memha_triton_and_refuses_other_backends():
    from sglang_memha.sglang_ext.pool.configure import _refusals

    def kvc(backend, prefill=None, kv_dtype="auto"):
        sa = SimpleNamespace(attention_backend=backend, prefill_attention_backend=prefill,
                             decode_attention_backend=None, kv_cache_dtype=kv_dtype, speculative_algorithm=None,
                             enable_hierarchical_cache=False)
        return SimpleNamespace(server_args=sa)

    assert _refusals(kvc("memha_triton")) == []
    assert _refusals(kvc("memha_triton", prefill="torch_native")) == []
    (bad,) = _refusals(kvc("flashinfer"))
    assert bad.startswith("attention backend ['flashinfer'] (use --attention-backend memha_triton on a GPU")
    # bfloat16 only names the dtype reads return (fp32-compute benches); an fp8 cache is a format
    assert _refusals(kvc("torch_native", kv_dtype="bfloat16")) == []
    assert _refusals(kvc("torch_native", kv_dtype="fp8_e4m3")) == [
        "--kv-cache-dtype fp8_e4m3 (MEMHA_KV_FORMAT replaces it; drop the flag)"]
