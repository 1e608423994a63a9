"""``python -m sglang_memha.calibrate`` on the tiny random Qwen3 (HF transformers, CPU).

Reference for the captured K: layer 0's post-RoPE K recomputed from the model's own modules
(embedding -> input norm -> k_proj -> k_norm -> RoPE), averaged over the same tokens.
"""
import pytest
import torch

from sglang_memha import calibrate
from sglang_memha.kvformat import k_offset

transformers = pytest.importorskip("transformers")


def _layer0_k_mean(model, chunks):
    from transformers.models.qwen3.modeling_qwen3 import apply_rotary_pos_emb

    attn, total, n = model.model.layers[0].self_attn, 0, 0
    with torch.no_grad():
        for ids in chunks:
            h = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids[None]))
            k = attn.k_norm(attn.k_proj(h).view(1, len(ids), -1, attn.head_dim)).transpose(1, 2)
            cos, sin = model.model.rotary_emb(h, torch.arange(len(ids))[None])
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            total, n = total + k.float().sum(dim=(0, 2)), n + len(ids)
    return total / n


def test_captured_k_mean_is_the_post_rope_k_mean(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32, attn_implementation="sdpa").eval()
    chunks = calibrate.token_chunks(tok, calibrate.pydoc_texts()[:3], seq_len=64, max_tokens=300)
    assert sum(len(c) for c in chunks) == 300 and all(len(c) <= 64 for c in chunks)
    got = calibrate.k_channel_means(model, chunks)
    assert got.shape == (2, 2, 64)  # tiny_qwen3: 2 layers, 2 kv heads, head_dim 64
    torch.testing.assert_close(got[0], _layer0_k_mean(model, chunks), rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # the capture hook is taken out again


def test_cli_writes_a_file_the_pool_accepts(tiny_model, tmp_path):
    from transformers import AutoConfig

    text = tmp_path / "calib.txt"
    text.write_text("def forward(self, x):\n    return self.linear(x) + 1\n" * 80)
    out = str(tmp_path / "k.safetensors")
    calibrate.main(["--model-path", tiny_model, "--out", out, "--text-file", str(text), "--max-tokens", "256"])
    off = k_offset.load(out)
    assert off.model_id == k_offset.model_id_of(AutoConfig.from_pretrained(tiny_model), tiny_model)
    assert off.values.shape == (2, 2, 64)
    assert torch.equal(off.values, off.values.to(torch.bfloat16).float())
    assert off.calibration["tokens"] == 256 and off.calibration["source"] == f"files: {text}"

    pytest.importorskip("sglang.srt.mem_cache.memory_pool")
    from sglang_memha.sglang_ext.pool.quant_pool import MemhaQuantKVPool

    pool = MemhaQuantKVPool.configured("fp8_e4m3", "none", off.model_id, out)(
        64, page_size=16, dtype=torch.bfloat16, head_num=2, head_dim=64, layer_num=2, device="cpu",
        enable_memory_saver=False)
    assert pool.memha_descriptor.k_offset == off.digest


def test_no_text_is_a_message(tiny_model, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="calibration saw no tokens"):
        calibrate.main(["--model-path", tiny_model, "--out", str(tmp_path / "k"), "--text-file", str(empty)])
