"""Real SGLang deployments on this machine for tests, demos and benchmarks.

``PDCluster``: prefill + decode (Mooncake over TCP) + the unmodified ``sglang_router`` in PD mode.
``SingleServer``: one non-PD server, the reference a PD cluster must match token for token.
Both start on free loopback ports, wait for real readiness, keep logs, and tear down by PID.
"""
from sglang_memha.testing.cluster import ClusterError, PDCluster, SingleServer, cpu_server_flags

__all__ = ["ClusterError", "PDCluster", "SingleServer", "cpu_server_flags"]
