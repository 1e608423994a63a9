"""xPyD on loopback: several prefills and decodes behind one unmodified ``sglang_router``.

Usage (tests)::

    with XPyDCluster(model, prefill_envs=[{...}, {...}], decode_envs=[{...}, {...}]) as c:
        c.generate("Hello")                              # the router picks a prefill and a decode
        c.direct_generate(payload, prefill_index=1, decode_index=0)   # one chosen pair
        url = c.start_decode({"MEMHA_KV_FORMAT": "int4_g64"})         # not routed to yet
        worker_id = c.add_decode(url)                    # the router's worker API: POST /workers
        c.remove_decode(url)                             # DELETE /workers/{id}; the server keeps running

Each server gets its own environment (``MEMHA_KV_FORMAT`` per server, or none: SGLang's own
pool); every server shares ``server_args`` (``--page-size`` ...) and the CPU flags of
``cluster.cpu_server_flags``, then its own entry of ``prefill_args`` / ``decode_args`` (e.g.
another ``--page-size`` for one decode: SGLang's argument parser keeps the last value). Readiness is the same as ``PDCluster``'s: every ``/health`` answers,
the router's ``/workers`` lists every server as healthy, then (``ready="generate"``) one request
through the router succeeds. Logs: ``prefill``, ``prefill1``, ..., ``decode``, ``decode1``, ...
(``<log_dir>/<name>.log``). ``close()`` stops every process, decodes started later included.

The router's worker API (sglang_router 0.3.2): ``POST /workers`` with ``{"url", "worker_type"}``
queues the worker (the reply names its ``worker_id``, a UUID) and the router health-checks it
before routing to it; ``GET /workers`` lists ``{"workers": [{"id", "url", "worker_type",
"is_healthy", ...}]}``; ``DELETE /workers/{worker_id}`` queues its removal. Requests already
sent to a removed worker run to their end (the router only stops choosing it).
"""
from __future__ import annotations

from sglang_memha.testing.cluster import (HOST, STARTUP_TIMEOUT_S, _check_model, _Deployment, _health, _host_port,
                                          cpu_server_flags, direct_pd_generate, router_missing, server_env,
                                          wait_router_workers)
from sglang_memha.testing.procs import ClusterError, check_port_free, free_port, http_call, http_json, wait_until


class XPyDCluster(_Deployment):
    """``len(prefill_envs)`` prefill servers + ``len(decode_envs)`` decode servers + the router in
    PD mode (Mooncake over TCP, loopback). ``env``: extra environment of every process;
    ``prefill_args`` / ``decode_args``: one flag list per server (missing entries: none)."""

    def __init__(self, model_path: str, prefill_envs: list[dict[str, str]], decode_envs: list[dict[str, str]],
                 server_args: list[str] = (), env: dict[str, str] | None = None, log_dir: str | None = None,
                 max_total_tokens: int = 4096, router_args: list[str] = (), ready: str = "generate",
                 prefill_args: list[list[str]] = (), decode_args: list[list[str]] = ()):
        super().__init__(log_dir)
        if not prefill_envs or not decode_envs:
            raise ValueError(f"XPyDCluster needs at least one prefill and one decode, got "
                             f"{len(prefill_envs)} prefill_envs and {len(decode_envs)} decode_envs")
        for what, args, envs in (("prefill", prefill_args, prefill_envs), ("decode", decode_args, decode_envs)):
            if len(args) > len(envs):
                raise ValueError(f"{what}_args has {len(args)} entries for {len(envs)} {what} servers "
                                 f"({what}_envs): give one flag list per server, or fewer")
        if ready not in ("generate", "health"):
            raise ValueError(f"ready={ready!r}: expected 'generate' or 'health'")
        self.model_path, self.server_args, self.env = model_path, list(server_args), env
        self.max_total_tokens, self.router_args, self.ready = max_total_tokens, list(router_args), ready
        self.prefill_envs, self.decode_envs = [dict(e) for e in prefill_envs], [dict(e) for e in decode_envs]
        self.prefill_args = [list(a) for a in prefill_args] + [[]] * (len(prefill_envs) - len(prefill_args))
        self.decode_args = [list(a) for a in decode_args] + [[]] * (len(decode_envs) - len(decode_args))
        self.prefill_urls = [f"http://{HOST}:{free_port()}" for _ in prefill_envs]
        self.bootstrap_ports = [free_port() for _ in prefill_envs]
        self.decode_urls = [f"http://{HOST}:{free_port()}" for _ in decode_envs]
        self.router_port = free_port()
        self.url = f"http://{HOST}:{self.router_port}"

    @staticmethod
    def _name(kind: str, i: int) -> str:
        return kind if i == 0 else f"{kind}{i}"

    def _server(self, name: str, url: str, mode_args: list[str], env: dict[str, str], own_args: list[str]):
        _, port = _host_port(url)
        return self._spawn(name, ["-m", "sglang.launch_server", "--model-path", self.model_path, "--host", HOST,
                                  "--port", port, *cpu_server_flags(self.max_total_tokens),
                                  "--disaggregation-transfer-backend", "mooncake_tcp", *mode_args,
                                  *self.server_args, *own_args], {**server_env(self.env), **env})

    def start(self) -> "XPyDCluster":
        _check_model(self.model_path)
        check_port_free(self.router_port, "router")
        servers = [self._server(self._name("prefill", i), url,
                                ["--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(bp)], env,
                                args)
                   for i, (url, bp, env, args) in enumerate(zip(self.prefill_urls, self.bootstrap_ports,
                                                                self.prefill_envs, self.prefill_args))]
        servers += [self._server(self._name("decode", i), url, ["--disaggregation-mode", "decode"], env, args)
                    for i, (url, env, args) in enumerate(zip(self.decode_urls, self.decode_envs, self.decode_args))]
        for url in [*self.prefill_urls, *self.decode_urls]:
            wait_until(lambda u=url: _health(u), STARTUP_TIMEOUT_S, servers, f"{url}/health")
        prefills = [a for u, bp in zip(self.prefill_urls, self.bootstrap_ports) for a in ("--prefill", u, str(bp))]
        decodes = [a for u in self.decode_urls for a in ("--decode", u)]
        router = self._spawn("router", ["-m", "sglang_router.launch_router", "--pd-disaggregation", *prefills,
                                        *decodes, "--host", HOST, "--port", str(self.router_port),
                                        "--prometheus-port", str(free_port()), *self.router_args],
                             server_env(self.env))
        wait_router_workers(self.url, self.prefill_urls, self.decode_urls, STARTUP_TIMEOUT_S, [*servers, router])
        if self.ready == "generate":
            ping = {"text": "ping", "sampling_params": {"max_new_tokens": 1}}
            wait_until(lambda: http_json(f"{self.url}/generate", ping, timeout=30)[0] == 200,
                       STARTUP_TIMEOUT_S, [*servers, router], f"a request through the router {self.url}", poll_s=1.0)
        return self

    # --- decodes joining and leaving the running router --------------------------------------
    def start_decode(self, env: dict[str, str], args: list[str] = ()) -> str:
        """Start one more decode server (log ``decode<N>``; ``args`` after ``server_args``) and
        wait for its ``/health``; the router does not know it yet (``add_decode``). Returns its URL."""
        url = f"http://{HOST}:{free_port()}"
        p = self._server(self._name("decode", len(self.decode_urls)), url, ["--disaggregation-mode", "decode"],
                         env, list(args))
        self.decode_urls.append(url)
        self.decode_envs.append(dict(env))
        self.decode_args.append(list(args))
        wait_until(lambda: _health(url), STARTUP_TIMEOUT_S, [p], f"{url}/health")
        return url

    def workers(self) -> list[dict]:
        """The router's ``GET /workers`` list (``ClusterError`` when it does not answer one)."""
        status, body = http_call("GET", f"{self.url}/workers")
        if status != 200 or not isinstance(body, dict):
            raise ClusterError(f"the router's {self.url}/workers answered {status}: {str(body)[:200]}")
        return body.get("workers", [])

    def worker_id(self, url: str) -> str | None:
        """The router's id of the worker at ``url``, or None when it lists none."""
        return next((w.get("id") for w in self.workers() if str(w.get("url", "")).rstrip("/") == url.rstrip("/")),
                    None)

    def add_decode(self, url: str, timeout_s: float = 60.0) -> str:
        """``POST /workers`` a running decode server; returns once the router lists it healthy
        (it routes to it from then on). Returns its worker id."""
        status, body = http_call("POST", f"{self.url}/workers", {"url": url, "worker_type": "decode"})
        if status not in (200, 201, 202):
            raise ClusterError(f"the router refused to add decode {url}: {status} {str(body)[:300]}")
        wait_until(lambda: not router_missing(self.url, [], [url]), timeout_s, self.procs,
                   f"router {self.url} to list decode {url} as healthy")
        return self.worker_id(url)

    def remove_decode(self, url: str, timeout_s: float = 60.0) -> None:
        """``DELETE /workers/{id}`` of the decode at ``url``; returns once the router no longer
        lists it. The server keeps running (``close()`` stops it)."""
        wid = self.worker_id(url)
        if wid is None:
            raise ClusterError(f"the router lists no worker at {url}: {self.workers()}")
        status, body = http_call("DELETE", f"{self.url}/workers/{wid}")
        if status not in (200, 202, 204):
            raise ClusterError(f"the router refused to remove decode {url} ({wid}): {status} {str(body)[:300]}")
        wait_until(lambda: self.worker_id(url) is None, timeout_s, self.procs,
                   f"router {self.url} to drop decode {url}")

    # --- requests ---------------------------------------------------------------------------
    def direct_generate(self, payload: dict, prefill_index: int, decode_index: int, timeout: float = 300.0,
                        room: int | None = None) -> tuple[int, dict | str]:
        """What the router does for one request, aimed at a chosen prefill and decode: POST the
        payload plus ``bootstrap_host/port/room`` to both at once; the decode's answer."""
        return direct_pd_generate(self.prefill_urls[prefill_index], self.bootstrap_ports[prefill_index],
                                  self.decode_urls[decode_index], payload, timeout, room)


__all__ = ["XPyDCluster", "http_call"]
