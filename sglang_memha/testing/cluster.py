"""Start a real SGLang PD deployment (or a single server) on loopback, and stop it by PID.

Usage (tests, demos, benchmarks)::

    with PDCluster(model_path) as c:          # prefill + decode + router, CPU flags by default
        status, out = c.generate("Hello", max_new_tokens=8)

Readiness is real: each server's ``/health`` answers 200, then the router is started (its
worker registration backs off if started earlier), then the router's ``/workers`` must list every
prefill and decode server as healthy (its ``/health`` answers 200 before it has any worker, and
requests get 503 "No prefill workers available" for a few seconds after that), then, with
``ready="generate"`` (the default), a 1-token ``/generate`` through the router must succeed. Any server
that dies on the way raises ``ClusterError`` with its log tail; ``close()`` always stops every
process, and so does SIGTERM / SIGINT / SIGHUP to the owner, or its death (``procs`` says how).
Each process logs to ``<log_dir>/<name>.log``, truncated at start: a reused folder holds one run.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import random
import sys
import tempfile
import time

from sglang_memha.testing.netns import ns_cmd
from sglang_memha.testing.procs import (ClusterError, ManagedProcess, check_port_free, free_port,
                                        http_json, stop_all, wait_until)

HOST = "127.0.0.1"
STARTUP_TIMEOUT_S = float(os.environ.get("MEMHA_STARTUP_TIMEOUT_S", "240"))


def cpu_server_flags(max_total_tokens: int | None = 4096) -> list[str]:
    """Flags every SGLang server needs on this CPU-only machine kind.

    torch_native attention and pytorch sampling are what SGLang resolves to on a non-AMX CPU;
    ``--sleep-on-idle`` keeps an idle scheduler from spinning a core (2 cores in all).
    """
    cap = [] if max_total_tokens is None else ["--max-total-tokens", str(max_total_tokens)]
    return ["--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
            "--disable-cuda-graph", *cap,
            "--mem-fraction-static", "0.2", "--grammar-backend", "none", "--sleep-on-idle"]


def server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["SGLANG_USE_CPU_ENGINE"] = "1"   # SGLang's switch for its CPU engine paths (is_cpu())
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    # SGLang's "spawn" becomes "fork" (sglang_ext/cpu/cpu_boot.py): the scheduler and detokenizer
    # inherit the launcher's imports, which halves a cluster's start on 2 cores (73 s -> 34 s).
    env.setdefault("MEMHA_CPU_FORK", "1")
    env.update(extra or {})
    return env


def used_tokens(url: str) -> int:
    """KV tokens a server's pool holds right now, read from the server: ``/flush_cache`` (drops
    the radix cache's unreferenced pages; refused while requests are pending) then the
    ``num_used_tokens`` of ``/v1/loads``. ``ClusterError`` when the server does not answer."""
    http_json(f"{url}/flush_cache", {}, timeout=30)
    status, body = http_json(f"{url}/v1/loads", timeout=30)
    if status != 200 or not isinstance(body, dict):
        raise ClusterError(f"{url}/v1/loads answered {status}: {str(body)[:200]}")
    return sum(load["num_used_tokens"] for load in body["loads"])


def wait_idle(urls: list[str], timeout_s: float = 90.0) -> list[int]:
    """Poll ``used_tokens`` of each server until all are 0 or ``timeout_s`` passed; return the
    last reading. A decode holds an aborted request's pages until the prefill acks that nothing
    more will be written (SGLang's deferred release, bounded by
    ``SGLANG_DISAGGREGATION_DEFERRED_DECODE_KV_RELEASE_TIMEOUT``), so idle can take a while."""
    deadline = time.monotonic() + timeout_s
    while True:
        used = [used_tokens(u) for u in urls]
        if not any(used) or time.monotonic() > deadline:
            return used
        time.sleep(1.0)


def _check_model(model_path: str) -> None:
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        raise ClusterError(f"model path {model_path!r} has no config.json: build the tiny model with "
                           f"`memha-build-tiny-model` or SmolLM2 with `memha-build-smollm2`, "
                           f"and pass the folder it prints")


def _host_port(url: str) -> tuple[str, str]:
    """``http://10.200.0.1:30001`` -> (``10.200.0.1``, ``30001``)."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    return host, port


def _health(url: str):
    status, _ = http_json(f"{url}/health", timeout=5)
    return status == 200


def router_missing(router_url: str, prefill_urls: list[str], decode_urls: list[str]) -> list[str]:
    """The expected workers that the router's ``/workers`` (sglang_router 0.3.2) does not list as
    healthy, e.g. ``["prefill http://127.0.0.1:20001"]``; [] once it routes to all of them. An
    unreachable or failing ``/workers`` is named as such."""
    status, body = http_json(f"{router_url}/workers", timeout=5)
    if status != 200 or not isinstance(body, dict):
        return [f"the router's {router_url}/workers (answered {status or 'nothing'}: {str(body)[:120]})"]
    healthy = {(w.get("worker_type"), str(w.get("url", "")).rstrip("/"))
               for w in body.get("workers", []) if w.get("is_healthy")}
    want = [("prefill", u) for u in prefill_urls] + [("decode", u) for u in decode_urls]
    return [f"{kind} {url}" for kind, url in want if (kind, url.rstrip("/")) not in healthy]


def wait_router_workers(router_url: str, prefill_urls: list[str], decode_urls: list[str],
                        timeout_s: float, procs: list[ManagedProcess]) -> None:
    """Wait until ``router_missing`` is empty; ``ClusterError`` naming the workers still missing
    after ``timeout_s``, or at once when one of ``procs`` dies."""
    missing: list[str] = []

    def ready() -> bool:
        missing[:] = router_missing(router_url, prefill_urls, decode_urls)
        return not missing

    wait_until(ready, timeout_s, procs,
               lambda: f"router {router_url} to list its workers as healthy; missing: {', '.join(missing)}")


class LogWindow:
    """The lines each process of a deployment logged since this object was made: a deployment's
    log files hold everything it served (truncated once, at start), so a scenario or a benchmark
    run that needs only its own lines records the sizes first."""

    def __init__(self, deployment: "_Deployment"):
        self._paths = {p.name: p.log_path for p in deployment.procs}
        self._start = {name: os.path.getsize(path) for name, path in self._paths.items()}

    def lines(self, name: str) -> list[str]:
        with open(self._paths[name], "rb") as f:
            f.seek(self._start[name])
            return f.read().decode(errors="replace").splitlines()


class _Deployment:
    """Shared life cycle: a list of processes, a log folder, context-manager teardown."""

    def __init__(self, log_dir: str | None):
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="memha-cluster-")
        os.makedirs(self.log_dir, exist_ok=True)
        self.procs: list[ManagedProcess] = []

    def _spawn(self, name: str, args: list[str], env: dict[str, str], ns: str | None = None) -> ManagedProcess:
        argv = [sys.executable, *args]
        p = ManagedProcess(name, argv if ns is None else ns_cmd(ns, argv),
                           os.path.join(self.log_dir, f"{name}.log"), env)
        self.procs.append(p.start())
        return p

    def close(self) -> None:
        stop_all(self.procs)

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def logs(self) -> dict[str, str]:
        return {p.name: open(p.log_path, errors="replace").read() for p in self.procs}

    # --- requests -------------------------------------------------------------------------
    url: str

    def generate(self, text: str | None = None, input_ids: list[int] | None = None,
                 max_new_tokens: int = 16, timeout: float = 300.0, **sampling) -> tuple[int, dict | str]:
        payload: dict = {"sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0,
                                             **sampling}}
        if input_ids is not None:
            payload["input_ids"] = input_ids
        else:
            payload["text"] = text
        return http_json(f"{self.url}/generate", payload, timeout=timeout)


class SingleServer(_Deployment):
    """One non-PD SGLang server: the token-for-token reference for a PD cluster."""

    def __init__(self, model_path: str, extra_args: list[str] = (), port: int = 0,
                 max_total_tokens: int = 4096, env: dict[str, str] | None = None,
                 log_dir: str | None = None):
        super().__init__(log_dir)
        self.model_path, self.extra_args, self.env = model_path, list(extra_args), env
        self.port = port or free_port()
        self.max_total_tokens = max_total_tokens
        self.url = f"http://{HOST}:{self.port}"

    def start(self) -> "SingleServer":
        _check_model(self.model_path)
        check_port_free(self.port, "server")
        p = self._spawn("server", ["-m", "sglang.launch_server", "--model-path", self.model_path,
                                   "--host", HOST, "--port", str(self.port),
                                   *cpu_server_flags(self.max_total_tokens), *self.extra_args],
                        server_env(self.env))
        wait_until(lambda: _health(self.url), STARTUP_TIMEOUT_S, [p], f"server {self.url}/health")
        return self


class PDCluster(_Deployment):
    """Prefill server + decode server (Mooncake over TCP) + ``sglang_router`` in PD mode.

    prefill_url: use an already running prefill server (``(url, bootstrap_port)``) instead of
    starting one; it must answer ``/health`` before anything is started.
    env: extra environment of every process; prefill_env / decode_env: of that server only
    (e.g. a different ``MEMHA_KV_FORMAT`` per side).
    extra_decode_envs: one more decode server per entry, with that environment;
    extra_decode_args: flags of those servers, after ``decode_args`` (e.g. another
    ``--page-size``), one list per entry of ``extra_decode_envs`` (missing: none).
    link: a ``netns.ShapedLink`` that is up: the prefill server runs in its prefill namespace and
    the decode server(s) in its decode namespace, so KV crosses the shaped veth; the router and
    the client stay in the root namespace (unshaped paths to both).
    ready: ``"generate"`` returns once a 1-token request through the router succeeded;
    ``"health"`` once every server answers ``/health`` and the router lists them all as healthy
    workers, without a request (for deployments whose requests are meant to fail).
    """

    def __init__(self, model_path: str, prefill_args: list[str] = (), decode_args: list[str] = (),
                 max_total_tokens: int = 4096, env: dict[str, str] | None = None,
                 log_dir: str | None = None, router_port: int = 0,
                 prefill_url: tuple[str, int] | None = None,
                 prefill_env: dict[str, str] | None = None, decode_env: dict[str, str] | None = None,
                 extra_decode_envs: list[dict[str, str]] = (), router_args: list[str] = (),
                 ready: str = "generate", link=None, extra_decode_args: list[list[str]] = ()):
        super().__init__(log_dir)
        self.link = link
        p_host, d_host = (link.prefill_ip, link.decode_ip) if link is not None else (HOST, HOST)
        if ready not in ("generate", "health"):
            raise ValueError(f"ready={ready!r}: expected 'generate' or 'health'")
        self.model_path = model_path
        self.prefill_args, self.decode_args = list(prefill_args), list(decode_args)
        self.max_total_tokens, self.env = max_total_tokens, env
        self.prefill_env = prefill_env or {}
        self.decode_envs = [decode_env or {}, *extra_decode_envs]
        if len(extra_decode_args) > len(extra_decode_envs):
            raise ValueError(f"extra_decode_args has {len(extra_decode_args)} entries for "
                             f"{len(extra_decode_envs)} extra decode servers (extra_decode_envs)")
        self.decode_extra_args = [[], *map(list, extra_decode_args)]
        self.decode_extra_args += [[]] * (len(self.decode_envs) - len(self.decode_extra_args))
        self.router_args, self.ready = list(router_args), ready
        self.router_port = router_port or free_port()
        self.external_prefill = prefill_url
        if prefill_url:
            self.prefill_url, self.bootstrap_port = prefill_url
        else:
            self.prefill_url, self.bootstrap_port = f"http://{p_host}:{free_port()}", free_port()
        self.decode_urls = [f"http://{d_host}:{free_port()}" for _ in self.decode_envs]
        self.decode_url = self.decode_urls[0]
        self.url = f"http://{HOST}:{self.router_port}"

    def _server_args(self, url: str) -> list[str]:
        host, port = _host_port(url)
        return ["-m", "sglang.launch_server", "--model-path", self.model_path, "--host", host,
                "--port", port, *cpu_server_flags(self.max_total_tokens),
                "--disaggregation-transfer-backend", "mooncake_tcp"]

    def start(self) -> "PDCluster":
        _check_model(self.model_path)
        check_port_free(self.router_port, "router")
        env = server_env(self.env)
        if self.external_prefill:
            if not _health(self.prefill_url):
                raise ClusterError(f"prefill server at {self.prefill_url} is not reachable (/health did "
                                   f"not answer 200): start the prefill server first, or fix prefill_url")
            servers = []
        else:
            prefill = self._spawn("prefill", [*self._server_args(self.prefill_url),
                                              "--disaggregation-mode", "prefill",
                                              "--disaggregation-bootstrap-port", str(self.bootstrap_port),
                                              *self.prefill_args], {**env, **self.prefill_env, **self._ns_env("prefill")},
                                  self._ns("prefill"))
            servers = [prefill]
        for i, (url, denv, dargs) in enumerate(zip(self.decode_urls, self.decode_envs, self.decode_extra_args)):
            servers.append(self._spawn("decode" if i == 0 else f"decode{i}",
                                       [*self._server_args(url), "--disaggregation-mode", "decode",
                                        *self.decode_args, *dargs], {**env, **denv, **self._ns_env("decode")},
                                       self._ns("decode")))
        for url in ([] if self.external_prefill else [self.prefill_url]) + self.decode_urls:
            wait_until(lambda u=url: _health(u), STARTUP_TIMEOUT_S, servers, f"{url}/health")
        decodes = [a for u in self.decode_urls for a in ("--decode", u)]
        # A free metrics port: the router's default (29000) collides between concurrent clusters.
        router = self._spawn("router", ["-m", "sglang_router.launch_router", "--pd-disaggregation",
                                        "--prefill", self.prefill_url, str(self.bootstrap_port),
                                        *decodes, "--host", HOST, "--port", str(self.router_port),
                                        "--prometheus-port", str(free_port()), *self.router_args], env)
        wait_router_workers(self.url, [self.prefill_url], self.decode_urls, STARTUP_TIMEOUT_S,
                            [*servers, router])
        if self.ready == "health":
            return self
        ping = {"text": "ping", "sampling_params": {"max_new_tokens": 1}}
        wait_until(lambda: http_json(f"{self.url}/generate", ping, timeout=30)[0] == 200,
                   STARTUP_TIMEOUT_S, [*servers, router], f"a request through the router {self.url}",
                   poll_s=1.0)
        return self

    def _ns(self, side: str) -> str | None:
        return None if self.link is None else getattr(self.link, f"{side}_ns")

    def _ns_env(self, side: str) -> dict[str, str]:
        # SGLang's get_local_ip_auto reads SGLANG_HOST_IP first: Mooncake's session id, the KV
        # manager's ZMQ bind and the bootstrap address then all use the namespace's address.
        return {} if self.link is None else {"SGLANG_HOST_IP": getattr(self.link, f"{side}_ip")}

    def direct_generate(self, payload: dict, decode_index: int = 0,
                        timeout: float = 300.0, room: int | None = None) -> tuple[int, dict | str]:
        """What the router does for one request, aimed at a chosen decode server: POST the
        payload plus ``bootstrap_host/port/room`` to prefill and decode at once and return the
        decode's answer (for tests that must pick the decode server; ``room``: default random)."""
        return direct_pd_generate(self.prefill_url, self.bootstrap_port, self.decode_urls[decode_index], payload,
                                  timeout, room)


def direct_pd_generate(prefill_url: str, bootstrap_port: int, decode_url: str, payload: dict,
                       timeout: float = 300.0, room: int | None = None) -> tuple[int, dict | str]:
    """What the router does for one request: POST ``payload`` plus ``bootstrap_host/port/room``
    (``room``: default random) to the prefill and the decode at once; the decode's answer."""
    body = {**payload, "bootstrap_host": _host_port(prefill_url)[0], "bootstrap_port": bootstrap_port,
            "bootstrap_room": random.getrandbits(63) if room is None else room}
    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        pf = ex.submit(http_json, f"{prefill_url}/generate", body, timeout)
        df = ex.submit(http_json, f"{decode_url}/generate", body, timeout)
        pf.result()
        return df.result()


def main(argv: list[str] | None = None) -> None:
    """``memha-cluster MODEL``: start a PD cluster, print its URLs, serve until Ctrl-C."""
    ap = argparse.ArgumentParser(description="Start prefill + decode + router on loopback (CPU).")
    ap.add_argument("model_path")
    ap.add_argument("--prefill-arg", action="append", default=[], help="extra prefill flag (repeat)")
    ap.add_argument("--decode-arg", action="append", default=[], help="extra decode flag (repeat)")
    ap.add_argument("--router-port", type=int, default=8000)
    ap.add_argument("--max-total-tokens", type=int, default=4096)
    args = ap.parse_args(argv)
    with PDCluster(args.model_path, args.prefill_arg, args.decode_arg, args.max_total_tokens,
                   router_port=args.router_port) as c:
        print(f"router {c.url}  prefill {c.prefill_url} (bootstrap {c.bootstrap_port})  "
              f"decode {c.decode_url}  logs {c.log_dir}", flush=True)
        try:
            while all(p.alive() for p in c.procs):
                time.sleep(1)
            for p in c.procs:
                p.check_alive()
        except KeyboardInterrupt:
            pass
