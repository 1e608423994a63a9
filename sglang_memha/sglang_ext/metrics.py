"""sglang-memha's figures on each server's ``/metrics``, beside SGLang's own (``--enable-metrics``).

SGLang runs prometheus_client in multiprocess mode: its launcher sets ``PROMETHEUS_MULTIPROC_DIR``
before starting the scheduler processes, every process writes its samples to files there, and the
HTTP process merges them when ``/metrics`` is scraped. The transfer runs in the scheduler process
(the Mooncake KV manager, its transfer-worker and pipeline threads), so that is where our metric
objects live: created once, by ``start_in_scheduler`` (AFTER ``Scheduler.__init__``), only when the
server was started with ``--enable-metrics``. No HTTP server of ours; the prometheus_client import
itself waits until then (it must come after the launcher set the multiprocess directory).

Names follow SGLang's (``sglang:`` prefix, counters ending ``_total``, seconds for time), and each
series carries SGLang's scheduler labels (``model_name``, ``engine_type``, ``tp_rank``, ``pp_rank``,
``moe_ep_rank``, and ``dp_rank`` / ``priority`` / ``--extra-metric-labels`` when SGLang has them),
copied from the scheduler's own collector, so one dashboard query can join the two:

| metric | extra labels | recorded by (thread) | when |
|---|---|---|---|
| ``sglang:memha_kv_sent_bytes_total`` | ``format`` | prefill, ``conn_bytes`` (wherever SGLang concludes a room) | per request, at its transfer line: ``kv_bytes`` |
| ``sglang:memha_kv_sent_pages_total`` | ``format`` | same | same: ``pages`` |
| ``sglang:memha_kv_pipelined_pages_total`` | ``format`` | same | same: ``pipelined_pages`` (shipped layer by layer) |
| ``sglang:memha_kv_transfer_seconds`` (histogram) | ``format`` | same | same, ``status=ok`` requests only: ``transfer_ms`` / 1000 |
| ``sglang:memha_kv_received_bytes_total`` | ``format`` | decode, ``arrival.count_arrived`` (scheduler) | per request whose KV arrived (SGLang polled it done) |
| ``sglang:memha_handshake_refusals_total`` | ``reason`` | both, ``conn_handshake`` / ``mooncake_conn`` (bootstrap thread, scheduler) | per refused decode registration, request or metadata message |
| ``sglang:memha_kv_checksum_failures_total`` | | decode, ``integrity`` (scheduler) | per request whose KV failed the checksum |
| ``sglang:memha_send_converted_pages_total`` | ``from_format``, ``to_format`` | prefill, ``conn_bridges`` (transfer worker) | per chunk converted into a decode's format (pages) |
| ``sglang:memha_kv_pool_capacity_tokens`` (gauge) | ``format`` | ``start_in_scheduler`` | once, at start-up |

``format`` is the bytes' format as the transfer line names it (``fp8_e4m3``, ..., ``stock`` for
SGLang's own pools); on a decode, the format that crossed the wire (the prefill's for an fnuz <->
fn pair, which the decode converts on arrival). ``reason``: ``handshake.REFUSAL_KINDS``.

The sent figures are the transfer line's (``testing/transfer_log``), added when the room
concludes, so the counters equal the sum of a prefill's transfer lines exactly. Received bytes
are the decode pages the prefill was asked to fill times their bytes (the decode gets no byte
count from Mooncake): equal to the prefill's ``kv_bytes`` for a pair with one page size, prompt
token rows for a re-paged pair.

Cost: with metrics off, every recording function returns after reading one module global (no
import, no object, no lock). With metrics on, a recording is a few dictionary look-ups and
prometheus_client's per-value lock around an mmap write: it never blocks on I/O or on another
process, so it is safe on the transfer and scheduler threads.
"""
from __future__ import annotations

import logging

logger = logging.getLogger("sglang_memha")

# Transfer seconds per request: ~1 ms (a short prompt over RDMA) up to the minute a stalled
# Mooncake TCP call can take (its timeout is 30 s), a factor ~2.5 per bucket.
TRANSFER_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                            10.0, 30.0, 60.0)


def format_label(desc, stock: bool) -> str:
    """The ``format`` label (and the transfer line's ``fmt=``) of a pool described by ``desc``
    (a ``FormatDescriptor`` or None); ``stock``: SGLang's own pool, only described for memha
    decodes."""
    return "stock" if desc is None or stock else desc.fmt.value


class MemhaMetrics:
    """The metric objects of one scheduler process; ``labels``: SGLang's scheduler labels (name
    -> value), ``registry``: prometheus_client's default one unless given (tests pass their own)."""

    def __init__(self, labels: dict, registry=None):
        from prometheus_client import REGISTRY, Counter, Gauge, Histogram

        self.labels = {str(k): str(v) for k, v in labels.items()}
        registry = REGISTRY if registry is None else registry
        base = list(self.labels)

        def make(cls, name: str, doc: str, extra: tuple[str, ...] = (), **kw):
            return cls(name, doc, labelnames=[*base, *extra], registry=registry, **kw)

        self.sent_bytes = make(Counter, "sglang:memha_kv_sent_bytes_total",
                               "KV page bytes the prefill's Mooncake calls moved (sglang-memha).", ("format",))
        self.sent_pages = make(Counter, "sglang:memha_kv_sent_pages_total",
                               "KV pages the prefill's requests sent, per decode session (sglang-memha).",
                               ("format",))
        self.pipelined_pages = make(Counter, "sglang:memha_kv_pipelined_pages_total",
                                    "Of those pages, the ones shipped layer by layer during the forward "
                                    "(MEMHA_PIPELINE=1).", ("format",))
        self.transfer_seconds = make(Histogram, "sglang:memha_kv_transfer_seconds",
                                     "First to last transfer call of a request that succeeded (sglang-memha).",
                                     ("format",), buckets=TRANSFER_SECONDS_BUCKETS)
        self.received_bytes = make(Counter, "sglang:memha_kv_received_bytes_total",
                                   "KV page bytes that arrived on this decode (sglang-memha).", ("format",))
        self.refusals = make(Counter, "sglang:memha_handshake_refusals_total",
                             "Peers, requests or metadata messages the sglang-memha handshake refused.",
                             ("reason",))
        self.checksum_failures = make(Counter, "sglang:memha_kv_checksum_failures_total",
                                      "Requests whose arrived KV failed the checksum (sglang-memha).")
        self.converted_pages = make(Counter, "sglang:memha_send_converted_pages_total",
                                    "KV pages the prefill converted into a decode's format on send "
                                    "(sglang-memha).", ("from_format", "to_format"))
        # "mostrecent": the value a live process last set, SGLang's choice for its own constants.
        self.pool_capacity = make(Gauge, "sglang:memha_kv_pool_capacity_tokens",
                                  "Tokens this server's KV pool holds, by its format (sglang-memha).",
                                  ("format",), multiprocess_mode="mostrecent")

    def at(self, metric, **extra):
        """``metric``'s child for this process's labels plus ``extra``."""
        return metric.labels(**self.labels, **extra)


_active: MemhaMetrics | None = None  # set once per scheduler process, only with --enable-metrics


def enabled() -> bool:
    return _active is not None


def active() -> MemhaMetrics | None:
    return _active


def start(labels: dict, pool_format: str, capacity_tokens: int, registry=None) -> MemhaMetrics:
    """Create this process's metrics (once; a second call returns the first's) and set the pool
    gauge. Called by ``start_in_scheduler``; tests call it with their own ``registry``."""
    global _active
    if _active is None:
        _active = MemhaMetrics(labels, registry)
        _active.at(_active.pool_capacity, format=pool_format).set(capacity_tokens)
    return _active


def stop() -> None:
    """Forget this process's metrics (tests): recording becomes a no-op again."""
    global _active
    _active = None


def start_in_scheduler(result, scheduler, *args, **kwargs):
    """AFTER ``Scheduler.__init__`` (scheduler process, once, before it serves a request; the KV
    pool, SGLang's metrics collector and the PD manager exist by then). Without
    ``--enable-metrics``, nothing. Never raises: a metrics failure is logged, serving goes on."""
    if not getattr(scheduler.server_args, "enable_metrics", False):
        return result
    try:
        from sglang_memha.sglang_ext import state

        fmt = format_label(state.local_descriptor(), state.local_is_stock())
        start(_scheduler_labels(scheduler), fmt, int(scheduler.max_total_num_tokens))
    except Exception as e:  # noqa: BLE001 - metrics must never stop a server
        logger.error("sglang-memha: metrics not started: %r", e)
    return result


def _scheduler_labels(scheduler) -> dict:
    """SGLang's own scheduler labels (its collector's), so our series join its series; built
    the same way from the scheduler if its collector has none (a replaced collector class)."""
    labels = getattr(getattr(scheduler, "metrics_collector", None), "labels", None)
    if labels:
        return dict(labels)
    from sglang.srt.disaggregation.utils import DisaggregationMode

    args = scheduler.server_args
    labels = {"model_name": args.served_model_name,
              "engine_type": DisaggregationMode.to_engine_type(args.disaggregation_mode),
              "tp_rank": getattr(scheduler, "tp_rank", 0), "pp_rank": getattr(scheduler, "pp_rank", 0),
              "moe_ep_rank": getattr(scheduler, "moe_ep_rank", 0)}
    if getattr(scheduler, "dp_rank", None) is not None:
        labels["dp_rank"] = scheduler.dp_rank
    return labels


# ---- recording: one call per accounting point; each returns at once when metrics are off ----

def room_concluded(fmt: str, pages: int, pipelined_pages: int, kv_bytes: int, seconds: float,
                   ok: bool) -> None:
    """Prefill, from ``ByteAccountingMixin._log_room`` with the transfer line's figures (any
    thread that concludes a room). ``seconds`` goes to the histogram only when ``ok``."""
    m = _active
    if m is None:
        return
    m.at(m.sent_bytes, format=fmt).inc(kv_bytes)
    m.at(m.sent_pages, format=fmt).inc(pages)
    m.at(m.pipelined_pages, format=fmt).inc(pipelined_pages)
    if ok:
        m.at(m.transfer_seconds, format=fmt).observe(seconds)


def kv_received(fmt: str, nbytes: int) -> None:
    """Decode scheduler, from ``arrival.count_arrived``, once per request whose KV arrived."""
    m = _active
    if m is not None:
        m.at(m.received_bytes, format=fmt).inc(nbytes)


def handshake_refused(kind: str) -> None:
    """Either side, where a handshake check refused something; ``kind``: ``Refusal.kind``."""
    m = _active
    if m is not None:
        m.at(m.refusals, reason=kind).inc()


def checksum_failed() -> None:
    """Decode scheduler, once per request whose arrived KV failed the checksum."""
    m = _active
    if m is not None:
        m.at(m.checksum_failures).inc()


def pages_converted(from_format: str, to_format: str, pages: int) -> None:
    """Prefill transfer worker, once per chunk whose pages were converted and sent."""
    m = _active
    if m is not None:
        m.at(m.converted_pages, from_format=from_format, to_format=to_format).inc(pages)
