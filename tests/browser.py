"""A real headless Chromium for the report tests, driven over the DevTools protocol on a pipe (no extra package).

``chromium --remote-debugging-pipe`` reads protocol commands from its fd 3 and writes replies and events to its
fd 4, each a JSON object terminated by a NUL byte. :func:`load_page` opens one file, waits for its load event and
returns what the page logged (console messages, uncaught exceptions, browser log entries: CSP violations, failed
loads) together with facts read from the rendered DOM.

:func:`find_chromium` looks for the browser (``BNFOLD_CHROMIUM``, then ``chromium``, ``chromium-browser``,
``google-chrome`` on PATH). Outside CI a missing browser skips the test; with ``CI`` set it fails (CI installs it:
``make browser``).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = ["PageLoad", "chromium_flags", "find_chromium", "load_page", "require_chromium"]

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
    env = os.environ.get("BNFOLD_CHROMIUM")
    if env:
        return env if Path(env).exists() else None
    return next((p for p in map(shutil.which, NAMES) if p), None)


def require_chromium() -> str:
    """The browser, or a skip (outside CI) / a failure (CI set: the suite must not pass without it)."""
    path = find_chromium()
    if path is not None:
        return path
    msg = "no Chromium found (BNFOLD_CHROMIUM, chromium, chromium-browser, google-chrome); `make browser` installs it"
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(msg + " — CI is set, so the browser test may not skip")
    pytest.skip(msg)


def chromium_flags(profile: str) -> list[str]:
    """Headless, no sandbox (containers), nothing that talks to the network on its own."""
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            "--disable-dev-shm-usage", "--no-default-browser-check", f"--user-data-dir={profile}"]


@dataclass
class PageLoad:
    """What one page load produced: ``problems`` (console errors/warnings, exceptions, browser log errors and
    warnings, each as text) and ``facts`` (the DOM query's result)."""

    problems: list[str] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)


class _Pipe:
    def __init__(self, proc: subprocess.Popen[bytes], write_fd: int, read_fd: int) -> None:
        self.proc, self.w, self.r = proc, write_fd, read_fd
        self.buf = b""
        self.next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout: float = 60.0) -> dict[str, Any]:
        self.next_id += 1
        msg: dict[str, Any] = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self.read(timeout)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def read(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while b"\0" not in self.buf:
            if time.monotonic() > deadline:
                raise TimeoutError("no reply from Chromium")
            chunk = os.read(self.r, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe (exit {self.proc.poll()})")
            self.buf += chunk
        msg, _, self.buf = self.buf.partition(b"\0")
        return json.loads(msg)

    def wait_event(self, method: str, timeout: float = 60.0) -> dict[str, Any]:
        for e in self.events:
            if e.get("method") == method:
                return e
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            e = self.read(deadline - time.monotonic())
            self.events.append(e)
            if e.get("method") == method:
                return e
        raise TimeoutError(f"no {method} from Chromium")


_FACTS = """(() => {
  const charts = [...document.querySelectorAll('svg.chart')];
  return {
    title: document.title,
    charts: charts.map(s => ({id: s.id, bars: s.querySelectorAll('rect.bar').length,
                              width: s.getBoundingClientRect().width, height: s.getBoundingClientRect().height})),
    sections: [...document.querySelectorAll('section')].map(s => s.id),
    scripts: document.querySelectorAll('script').length,
    resources: performance.getEntriesByType('resource').map(r => r.name),
    text: document.body.innerText.length,
  };
})()"""


def load_page(chromium: str, page: Path, *, settle_s: float = 0.5, timeout: float = 90.0) -> PageLoad:
    """Open ``page`` (a local file) in headless Chromium and report what it logged and what it rendered."""
    cmd_r, cmd_w = os.pipe()
    res_r, res_w = os.pipe()
    with tempfile.TemporaryDirectory(prefix="bnfold-chromium-") as profile:
        def child_fds() -> None:  # the protocol's fixed descriptors: 3 = commands in, 4 = replies out
            high_r, high_w = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 10), fcntl.fcntl(res_w, fcntl.F_DUPFD, 10)
            os.dup2(high_r, 3)
            os.dup2(high_w, 4)

        proc = subprocess.Popen([chromium, *chromium_flags(profile), "--remote-debugging-pipe", "about:blank"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                preexec_fn=child_fds, close_fds=True, pass_fds=(3, 4))
        os.close(cmd_r)
        os.close(res_w)
        pipe = _Pipe(proc, cmd_w, res_r)
        out = PageLoad()
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Page"):
                pipe.send(f"{domain}.enable", session=session)
            pipe.send("Page.navigate", {"url": page.resolve().as_uri()}, session=session)
            pipe.wait_event("Page.loadEventFired", timeout)
            time.sleep(settle_s)
            facts = pipe.send("Runtime.evaluate", {"expression": _FACTS, "returnByValue": True}, session=session)
            out.facts = facts.get("result", {}).get("value", {})
            pipe.send("Target.closeTarget", {"targetId": target})
            for e in pipe.events:
                params = e.get("params", {})
                if e.get("method") == "Runtime.consoleAPICalled":
                    text = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
                    out.console.append(f"{params.get('type')}: {text}")
                    if params.get("type") in ("error", "warning", "assert"):
                        out.problems.append(f"console {params.get('type')}: {text}")
                elif e.get("method") == "Runtime.exceptionThrown":
                    out.problems.append(f"exception: {params.get('exceptionDetails', {}).get('text')}")
                elif e.get("method") == "Log.entryAdded":
                    entry = params.get("entry", {})
                    out.console.append(f"log {entry.get('level')}: {entry.get('text')}")
                    if entry.get("level") in ("error", "warning"):
                        out.problems.append(f"log {entry.get('level')} ({entry.get('source')}): {entry.get('text')}")
        finally:
            with contextlib.suppress(RuntimeError, TimeoutError, OSError):
                pipe.send("Browser.close", timeout=10)
            os.close(cmd_w)
            os.close(res_r)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return out
