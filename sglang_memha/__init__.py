"""sglang-memha: memory-heterogeneous prefill/decode disaggregation for SGLang.

Package map (one request's path, see docs/structures.md):
- ``kvformat``   KV page formats and codecs (no SGLang import).
- ``sglang_ext`` everything that imports SGLang internals: the plugin entry point, CPU compat.
- ``testing``    a real PD cluster launcher (prefill + decode + router) for tests and demos.
- ``models``     tiny random Qwen3 and SmolLM2 builders (no model hub).
- ``config``     the one place that reads ``MEMHA_*`` environment variables.

Importing this package is cheap and never imports SGLang or torch.
"""
__version__ = "0.1.0"
