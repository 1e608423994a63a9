"""sglang-memha: memory-heterogeneous prefill/decode disaggregation for SGLang.

Package map (one request's path, see docs/structures.md):
- ``config``     the one place that reads ``MEMHA_*`` environment variables.
- ``kvformat``   what the bytes look like: KV page formats, geometry, codecs (no SGLang import).
- ``sglang_ext`` everything that imports SGLang internals: the plugin entry point and hook table,
                 ``pool/`` (where the bytes live), ``transfer/`` (how they cross), ``cpu/``.
- ``calibrate``  the K offset calibration (``python -m sglang_memha.calibrate``).
- ``testing``    real PD deployments (prefill + decode + router), faults, test-only plugins.
- ``models``     tiny random Qwen3 and SmolLM2 builders (no model hub).

Importing this package is cheap and never imports SGLang or torch.
"""
__version__ = "0.1.0"
