"""Attention that reads the quantized pool directly: the last step of a request's path
(prefill quantize -> pack -> send -> receive -> raw quantized pool -> **dequantize inside
attention**).

``decode.decode_attention``: paged flash-decoding (split-KV) over one layer's format-v4 code and
scale buffers, dequantizing in the kernel (``_decode_jit``: the Triton source, loaded lazily).
No SGLang import, and importable without Triton; registering it as an SGLang attention backend
belongs in ``sglang_ext/``.
"""
