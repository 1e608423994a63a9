"""Everything in sglang-memha that imports SGLang internals lives here (plus ``patches/``).

A new SGLang release touches this subpackage only. Pinned: sglang 0.5.23, sglang-router 0.3.2,
mooncake-transfer-engine 0.3.13.post1.

- ``plugin``        entry point of the ``sglang.srt.plugins`` group; registers hooks.
- ``cpu_compat``    HookRegistry hooks that let SGLang's PD path run on ``--device cpu``.
- ``cpu_boot``      interpreter-start import hooks (from a ``.pth``) for what must exist before
                    SGLang's own plugin loader runs: the ``sgl_kernel`` stand-in and
                    torchvision's op schemas.
- ``sgl_kernel_cpu`` the pure-torch ``sgl_kernel`` stand-in.
"""
SGLANG_VERSION = "0.5.23"
