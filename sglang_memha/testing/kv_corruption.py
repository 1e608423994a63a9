"""Test-only SGLang plugin: flip one byte of chosen requests' arrived KV on a decode server.

What for: a test that sees ``--disaggregation-enable-kv-checksum`` catch a real corrupted
transfer (``tests/quant/test_integrity_pd.py``). Production code has no branch for it.

How it reaches a server, which runs in its own processes: ``server_env(folder, rooms)`` writes a
code-free distribution into ``folder`` (``memha_test_kv_corruption-0.dist-info``: ``METADATA``
and an ``entry_points.txt`` naming ``register`` in SGLang's ``sglang.srt.plugins`` group) and
returns the environment for that one server: ``folder`` first on ``PYTHONPATH``, and
``MEMHA_TEST_CORRUPT_KV_ROOMS`` (comma-separated bootstrap rooms; read here only, a test knob,
not configuration). SGLang's ``load_plugins()`` then finds the entry point in each of that
server's processes, next to memha's own, and calls ``register``, which adds a HookRegistry BEFORE
on ``sglang_ext.transfer.integrity.verify_on_arrival``. SGLang applies every plugin's hooks
after all of them registered, so the order of the two plugins does not matter.

Where the byte flips: ``transfer/arrival.land_on_arrival`` (decode scheduler, once per request
whose KV arrived in a memha pool) calls ``integrity.verify_on_arrival`` through the module
attribute, after its own guards and before any bridge rewrites the rows; the BEFORE hook flips
the first byte of layer 0's K row of a listed room's first token there, as if the wire had, and
logs ``sglang-memha test: corrupted one KV byte of room R on arrival``.
"""
from __future__ import annotations

import logging
import os

logger = logging.getLogger("sglang_memha")

ROOMS_ENV = "MEMHA_TEST_CORRUPT_KV_ROOMS"
ENTRY_POINT = "memha_test_corrupt_kv"
TARGET = "sglang_memha.sglang_ext.transfer.integrity.verify_on_arrival"
_DIST = "memha_test_kv_corruption-0.dist-info"


def server_env(folder: str, rooms) -> dict[str, str]:
    """Install the plugin's distribution into ``folder`` and return the extra environment of the
    server that should corrupt ``rooms`` (e.g. ``PDCluster(..., decode_env=server_env(...))``).
    The current ``PYTHONPATH`` is kept after ``folder``."""
    dist = os.path.join(folder, _DIST)
    os.makedirs(dist, exist_ok=True)
    with open(os.path.join(dist, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: memha-test-kv-corruption\nVersion: 0\n")
    with open(os.path.join(dist, "entry_points.txt"), "w") as f:
        f.write(f"[sglang.srt.plugins]\n{ENTRY_POINT} = {__name__}:register\n")
    path = os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p)
    return {"PYTHONPATH": path, ROOMS_ENV: ",".join(str(int(r)) for r in rooms)}


def rooms_from_env() -> frozenset[int]:
    value = os.environ.get(ROOMS_ENV) or ""
    try:
        return frozenset(int(r) for r in value.split(",") if r.strip())
    except ValueError:
        raise ValueError(f"{ROOMS_ENV}={value!r}: expected comma-separated integer bootstrap rooms") from None


def corrupt(pool, slots, room: int) -> None:
    """Flip the first byte of layer 0's K row of ``slots[0]`` (the request's first token)."""
    if len(slots):
        pool.k_buffer[0][int(slots[0]), 0, 0] ^= 0xFF
        logger.warning("sglang-memha test: corrupted one KV byte of room %s on arrival", room)


def corrupting(rooms: frozenset[int]):
    """The BEFORE hook on ``integrity.verify_on_arrival(scheduler, req)`` for ``rooms``."""

    def before_verify(scheduler, req, *args, **kwargs):
        if req.bootstrap_room in rooms:
            pool = scheduler.token_to_kv_pool_allocator.get_kvcache()
            slots = scheduler.req_to_token_pool.req_to_token[req.kv.req_pool_idx, :len(req.origin_input_ids)]
            corrupt(pool, slots, req.bootstrap_room)
        return None  # arguments unchanged

    return before_verify


def register() -> None:
    """Entry point (``sglang.srt.plugins``), in every process of a server started with
    ``server_env``; inert where ``MEMHA_TEST_CORRUPT_KV_ROOMS`` lists no room."""
    rooms = rooms_from_env()
    if not rooms:
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, corrupting(rooms), HookType.BEFORE)
