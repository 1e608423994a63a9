"""A bandwidth-shaped prefill <-> decode link on one machine, for tests and benchmarks.

``ShapedLink`` drives ``scripts/shaped_link.sh``: two network namespaces (prefill, decode) joined
by a veth pair shaped with ``tc tbf`` at ``rate`` in each direction, each also reachable from the
root namespace (tests, router, client) over an unshaped veth. Default addresses (subnet
``10.200.0``): prefill ``.1``, decode ``.2``, root ``.254``; the script's header has the picture
and the tbf parameters. Needs root; ``netns_available()`` says whether this process may create
namespaces, and why not.

Running a server inside a namespace: prefix its argv with ``ns_cmd(ns, argv)`` and pass that to
``ManagedProcess``. ``ip netns exec`` execs the command, so the PID and process group are the
server's own and ``ManagedProcess.stop()`` works unchanged. Make SGLang bind and advertise the
namespace's IP, so that Mooncake's session id, the KV manager's ZMQ address and the bootstrap URL
are all reachable from the peer: ``--host <ip>`` and ``SGLANG_HOST_IP=<ip>`` in the environment
(``server_env``). The namespace's default route makes SGLang's auto-detection find the same IP,
but the explicit variable does not depend on that.
"""
from __future__ import annotations

import atexit
import os
import re
import shutil
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "shaped_link.sh"

_UNITS = {"kbit": 10**3, "mbit": 10**6, "gbit": 10**9}


class NetnsError(RuntimeError):
    """The shaped link could not be set up, changed or torn down; the message has the script's output."""


def parse_rate(rate: str) -> int:
    """``"500mbit"`` -> 500_000_000 bits/s. Units kbit, mbit, gbit, case-insensitive (tc prints "500Mbit")."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(kbit|mbit|gbit)", rate.strip().lower())
    if not m:
        raise ValueError(f"rate={rate!r}: expected a number with kbit, mbit or gbit, e.g. '1gbit'")
    return round(float(m.group(1)) * _UNITS[m.group(2)])


def ns_cmd(ns: str, argv: list[str]) -> list[str]:
    """``argv`` run inside network namespace ``ns`` (``ip netns exec`` execs it: same PID)."""
    return ["ip", "netns", "exec", ns, *argv]


def netns_available() -> tuple[bool, str]:
    """(True, "") when this process can create network namespaces and shape with tc, else (False, why)."""
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"'{tool}' not found (install iproute2)"
    name = f"memha-probe-{os.getpid()}"
    try:
        r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"'ip netns add' failed to run: {e}"
    if r.returncode != 0:
        return False, (f"'ip netns add' refused ({r.stderr.strip() or 'exit ' + str(r.returncode)}); "
                       f"the shaped link needs root")
    subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    return True, ""


def _run_script(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    if not SCRIPT.is_file():
        raise NetnsError(f"{SCRIPT} not found: ShapedLink needs a source checkout of sglang-memha")
    r = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60)
    if check and r.returncode != 0:
        raise NetnsError(f"shaped_link.sh {' '.join(args)} exited {r.returncode}:\n{r.stderr}{r.stdout}")
    return r


def _keys(stdout: str) -> dict[str, str]:
    return dict(m.groups() for m in re.finditer(r"^([a-z_]+)=(\S+)$", stdout, re.M))


class ShapedLink:
    """Context manager: the link is up inside ``with``, torn down on exit (and ``atexit``).

    Attributes once up: ``prefill_ns``, ``decode_ns`` (namespace names), ``prefill_ip``,
    ``decode_ip`` (each namespace's only non-loopback address), ``host_ip`` (the root namespace's
    end). ``rate`` is the shaped rate in each direction, in tc units.
    """

    def __init__(self, rate: str = "1gbit", prefix: str = "memha", subnet: str = "10.200.0",
                 mtu: int = 1500, burst_bytes: int | None = None):
        parse_rate(rate)  # validate early, with the argument's name
        self.rate, self.prefix, self.subnet, self.mtu = rate, prefix, subnet, mtu
        self.burst_bytes = burst_bytes  # None: the script's default, 1 ms at rate (>= 32 KiB)
        self._keys: dict[str, str] = {}

    def _common(self) -> list[str]:
        return ["--prefix", self.prefix]

    def up(self) -> "ShapedLink":
        """Tear down any link with this prefix, then create it; the keys come from the script's output."""
        args = ["up", "--rate", self.rate, "--subnet", self.subnet, "--mtu", str(self.mtu), *self._common()]
        if self.burst_bytes is not None:
            args += ["--burst", str(self.burst_bytes)]
        atexit.register(self.down)  # before the script runs: a half-made link is also removed
        self._keys = _keys(_run_script(*args).stdout)
        return self

    def down(self) -> None:
        atexit.unregister(self.down)
        self._keys = {}
        _run_script("down", *self._common())

    def set_rate(self, rate: str) -> None:
        """Re-shape both directions; processes in the namespaces keep running."""
        parse_rate(rate)
        _run_script("rate", "--rate", rate, *self._common())
        self.rate = rate

    def cut(self) -> None:
        """Take the prefill <-> decode veth down at both ends (a pulled cable: in-flight TCP
        stalls, new connections fail); the namespaces and their servers keep running."""
        self._set_pd0("down")

    def restore(self) -> None:
        """Undo ``cut``: the veth up at both ends (the point-to-point routes come back with it)."""
        self._set_pd0("up")

    def _set_pd0(self, state: str) -> None:
        for ns in (self.prefill_ns, self.decode_ns):
            r = subprocess.run(["ip", "-n", ns, "link", "set", "pd0", state], capture_output=True,
                               text=True, timeout=10)
            if r.returncode != 0:
                raise NetnsError(f"ip -n {ns} link set pd0 {state}: {r.stderr.strip()}")

    def status(self) -> str:
        """The script's status text; raises NetnsError when the link is not up."""
        return _run_script("status", *self._common()).stdout

    def sent_bytes(self) -> tuple[int, int]:
        """Bytes that left through the shaped link so far: (prefill -> decode, decode -> prefill),
        from tbf's counters (wire bytes incl. headers). Proof that traffic took the shaped path."""
        out = []
        for ns in (self.prefill_ns, self.decode_ns):
            r = subprocess.run(["tc", "-s", "-n", ns, "qdisc", "show", "dev", "pd0"],
                               capture_output=True, text=True, timeout=10, check=True)
            m = re.search(r"Sent (\d+) bytes", r.stdout)
            if not m:
                raise NetnsError(f"no tbf counters on pd0 in {ns}:\n{r.stdout}")
            out.append(int(m.group(1)))
        return out[0], out[1]

    def server_env(self, ip: str, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for an SGLang server in a namespace: SGLang's ``get_local_ip_auto`` reads
        ``SGLANG_HOST_IP`` first; Mooncake's session id and the KV manager's ZMQ bind use it."""
        return {**(os.environ if base is None else base), "SGLANG_HOST_IP": ip}

    def _key(self, name: str) -> str:
        if not self._keys:
            raise NetnsError(f"ShapedLink(prefix={self.prefix!r}) is not up: call up() or use it in 'with'")
        return self._keys[name]

    prefill_ns = property(lambda self: self._key("prefill_ns"))
    decode_ns = property(lambda self: self._key("decode_ns"))
    prefill_ip = property(lambda self: self._key("prefill_ip"))
    decode_ip = property(lambda self: self._key("decode_ip"))
    host_ip = property(lambda self: self._key("host_ip"))

    def __enter__(self) -> "ShapedLink":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()
