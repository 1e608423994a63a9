"""Everything in sglang-memha that imports SGLang internals lives here (plus ``patches/``).

A new SGLang release touches this subpackage only. Pinned: sglang 0.5.23, sglang-router 0.3.2,
mooncake-transfer-engine 0.3.13.post1. Laid out along the path of one request:

- ``plugin``      entry point of the ``sglang.srt.plugins`` group, in every SGLang process;
                  registers the hooks of that process's role.
- ``flags``       the ``--memha-*`` launch flags, copied into ``MEMHA_*`` in the launcher.
- ``kv_hooks``    the HookRegistry table of the quantized-KV path (scheduler processes); each
                  hook lives in the subpackage below that owns its concern.
- ``state``       this scheduler process's KV descriptor and pool (pool side -> manager).
- ``cpu/``        what lets SGLang's PD path run on a CPU host: ``cpu_boot`` (a ``.pth``, at
                  interpreter start), ``sgl_kernel_cpu`` (the ``sgl_kernel`` stand-in),
                  ``cpu_compat`` (HookRegistry fixes).
- ``pool/``       where the bytes live on each server: ``configure`` (pool class, bytes per
                  token, at start-up), ``quant_pool`` (quantize on write, dequantize gathered
                  rows in attention), ``kivi_pool``, ``eager_pool`` (ablation), ``stock_pool``
                  (SGLang's own prefill pool, described).
- ``transfer/``   how they cross, prefill -> decode on Mooncake: ``handshake`` (pure verdicts),
                  ``mooncake_conn`` (the manager SGLang sees, with ``conn_handshake``,
                  ``conn_bridges``, ``conn_bytes``), ``pipeline`` + ``layer_signal`` (per-layer
                  sends), ``transcode`` / ``repage`` (send-time bridges), ``arrival`` +
                  ``integrity`` (the decode's arrival step).
- ``cpu_boot``    the former path of ``cpu/cpu_boot``, for ``.pth`` files written before the move.
"""
SGLANG_VERSION = "0.5.23"
