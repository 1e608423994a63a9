"""What names a fault's cause: the texts a scenario expects, looked up in its own share of the
servers' logs and in the victim's answer.

A cluster's log files hold every scenario it ran (``PDCluster`` truncates them once, at start),
so ``LogWindow`` records each file's size before the fault and reads only what came after.
An ``Expect`` says, for one scenario, which texts the victim's client may get (any one of them;
none where the client can only see a closed connection or left on purpose) and which line a
named server's log must gain: a line that holds one of ``line`` and the victim's own id (its
bootstrap room, or the ``rid`` its client sent), so another request's failure cannot stand in.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from sglang_memha.testing.cluster import LogWindow as DeploymentLogWindow

_STAMP = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] ")


@dataclass(frozen=True)
class Expect:
    """client: texts of which the victim's error must hold one (``()``: the client cannot get
    one); logs: the server logs to read, by process name (``prefill``, ``decode``, ``decode1``,
    ``router``); line: texts of which one line there must hold one, next to the victim's id."""
    client: tuple[str, ...]
    logs: tuple[str, ...]
    line: tuple[str, ...]

    def describe(self, key: str) -> str:
        client = " or ".join(repr(t) for t in self.client) or "none (no text can reach it)"
        return (f"client: {client}; {' or '.join(self.logs)} log: a line with "
                f"{' or '.join(repr(t) for t in self.line)} and {key}")

    def client_cause(self, status: int, reason: str) -> str:
        """The expected text the victim's error holds, "" when none (or it answered 200)."""
        if status == 200:
            return ""
        return next((t for t in self.client if t in reason), "")


class LogWindow(DeploymentLogWindow):
    """The lines each server of ``cluster`` logged since this object was made, and the cause in them."""

    def find(self, expect: Expect, key: str) -> tuple[str, str, str]:
        """(server, line, note): the first log of ``expect.logs`` with a line holding one of
        ``expect.line`` (tried in order) and ``key``; ("", "", note) when none, the note naming
        up to two lines that hold the text but not ``key`` (another request's, or an id the
        router rewrote)."""
        logs = {name: self.lines(name) for name in expect.logs if name in self._paths}
        others: list[str] = []
        for text in expect.line:
            for name, lines in logs.items():
                for line in lines:
                    if text in line:
                        if key in line:
                            return name, _STAMP.sub("", line.strip())[:400], ""
                        others.append(f"{name}: {_STAMP.sub('', line.strip())[:200]}")
        note = f"no line names {key}" + (f"; with the text but not the id: {' | '.join(others[:2])}"
                                         if others else "")
        return "", "", note
