"""Load a report page in headless Chromium: console errors, missing images, a screenshot.

Chromium speaks the DevTools protocol over two pipes (`--remote-debugging-pipe`: it reads
commands on fd 3 and writes replies on fd 4, each a JSON message ended by a NUL byte), so no
websocket client and no browser download is needed, only Debian's `chromium` package. A page
passes when it loads with no console error, no uncaught exception, no failed load and no request
off the page, and every `<img>` has decoded; `overflow` names the sections cut off sideways.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmdistill.errors import UserError

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-pipe",
)
IMAGES = "JSON.stringify([...document.images].map(i => [i.alt, i.complete && i.naturalWidth > 0]))"
# Content cut off sideways: the page wider than the window, or a scrolling wrapper (`.wide`)
# narrower than what it holds (a headless screenshot shows no scroll bar, so it just looks cut).
OVERFLOW = (
    "JSON.stringify([...(document.documentElement.scrollWidth > innerWidth ? ['page'] : []),"
    " ...[...document.querySelectorAll('.wide')].filter(e => e.scrollWidth > e.clientWidth + 1)"
    ".map(e => (e.closest('section') || {}).id || 'wide')])"
)


def find_browser() -> str | None:
    """The Chromium executable on PATH, if any."""
    return next((p for name in BROWSERS if (p := shutil.which(name))), None)


@dataclass
class PageCheck:
    """What loading the page showed."""

    errors: list[str] = field(default_factory=list)  # console errors, exceptions, failed loads
    images: int = 0  # <img> elements on the page
    broken: list[str] = field(default_factory=list)  # alt text of images that did not decode
    requests: list[str] = field(default_factory=list)  # URLs fetched besides the page itself
    overflow: list[str] = field(default_factory=list)  # sections whose content is cut sideways


class _DevTools:
    """A minimal DevTools client over Chromium's pipes: commands and the events between."""

    def __init__(self, browser: str, profile: str, timeout: float) -> None:
        self.deadline = time.monotonic() + timeout
        to_child, self._write = os.pipe()
        self._read, from_child = os.pipe()

        def fds() -> None:
            """In the child: the pipe ends onto fds 3 and 4 (via copies above 10, so
            neither move overwrites the other), open across exec."""
            a = fcntl.fcntl(to_child, fcntl.F_DUPFD_CLOEXEC, 10)
            b = fcntl.fcntl(from_child, fcntl.F_DUPFD_CLOEXEC, 10)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [browser, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=fds,
            close_fds=False,  # fds 3 and 4 must survive; Python's own fds close on exec
        )
        os.close(to_child)
        os.close(from_child)
        self._buffer = b""
        self._next = 0
        self.events: list[dict[str, Any]] = []

    def _message(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = self.deadline - time.monotonic()
            if left <= 0 or not select.select([self._read], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._read, 1 << 20)
            if not chunk:
                raise RuntimeError("Chromium closed its DevTools pipe")
            self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._next += 1
        message: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._message()
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str) -> None:
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._message())

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._read)
        os.close(self._write)


def _errors(events: list[dict[str, Any]], page: str) -> tuple[list[str], list[str]]:
    """Console errors, exceptions and failed loads; and every URL requested besides `page`."""
    errors, requests = [], []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            args = " ".join(
                str(a.get("value", a.get("description", ""))) for a in p.get("args", [])
            )
            errors.append(f"console.{p['type']}: {args}")
        elif method == "Runtime.exceptionThrown":
            details = p.get("exceptionDetails", {})
            errors.append(f"exception: {details.get('exception', {}).get('description', details)}")
        elif method == "Log.entryAdded" and p.get("entry", {}).get("level") == "error":
            errors.append(f"log: {p['entry'].get('text')}")
        elif method == "Network.loadingFailed":
            errors.append(f"failed load: {p.get('errorText')}")
        elif method == "Network.requestWillBeSent":
            url = p.get("request", {}).get("url", "")
            if url != page and not url.startswith("data:"):
                requests.append(url)
    return errors, requests


def load_page(
    page: Path, screenshot: Path | None = None, width: int = 1280, timeout: float = 60.0
) -> PageCheck:
    """Open `page` in headless Chromium and check it; `screenshot` saves the full page as PNG."""
    browser = find_browser()
    if browser is None:
        raise UserError("no Chromium found; install it (Debian: apt-get install chromium)")
    url = Path(page).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="mmdistill-chromium-") as profile:
        tools = _DevTools(browser, profile, timeout)
        try:
            target = tools.call("Target.createTarget", url="about:blank")["targetId"]
            session = tools.call("Target.attachToTarget", targetId=target, flatten=True)[
                "sessionId"
            ]
            for domain in ("Page", "Runtime", "Log", "Network"):
                tools.call(f"{domain}.enable", session)
            tools.call(
                "Emulation.setDeviceMetricsOverride",
                session,
                width=width,
                height=900,
                deviceScaleFactor=1,
                mobile=False,
            )
            tools.events.clear()
            tools.call("Page.navigate", session, url=url)
            tools.wait_for("Page.loadEventFired")
            images = tools.call("Runtime.evaluate", session, expression=IMAGES, returnByValue=True)
            states = json.loads(images["result"]["value"])
            wide = tools.call("Runtime.evaluate", session, expression=OVERFLOW, returnByValue=True)
            if screenshot is not None:
                size = tools.call("Page.getLayoutMetrics", session)["cssContentSize"]
                shot = tools.call(
                    "Page.captureScreenshot",
                    session,
                    format="png",
                    captureBeyondViewport=True,
                    clip={"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1},
                )
                Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
            errors, requests = _errors(tools.events, url)
        finally:
            tools.close()
    return PageCheck(
        errors=errors,
        images=len(states),
        broken=[alt for alt, ok in states if not ok],
        requests=requests,
        overflow=json.loads(wide["result"]["value"]),
    )
