"""CPU support: what lets SGLang's PD path run on a host without CUDA; it never touches KV bytes.

In the order a server process meets them: ``cpu_boot`` runs at interpreter start, from a
``.pth`` that ``scripts/setup_cpu.sh`` installs (before ``import sglang``), and serves
``sgl_kernel_cpu`` as ``sgl_kernel`` when SGLang's modules import it and no real one is
installed; ``cpu_compat`` is registered by ``plugin.register()`` in every SGLang process
(``MEMHA_CPU_COMPAT``) and fills SGLang's CPU gaps on the PD path through HookRegistry. This
package imports nothing at import time: the ``.pth`` imports it in every interpreter.
"""
