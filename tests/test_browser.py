"""The sanitize report opened in headless Chromium: verdict, counts and the trigger cluster are on the page.

Drives Debian's ``chromium`` through its own command line (``--dump-dom`` for the page as the
browser built it, ``--screenshot`` for a picture), so no Python browser driver is needed. CI
installs Chromium in ``.ci/run``; without it the test is skipped with the reason.
The screenshot goes to the test's tmp dir and, when ``POISONGUARD_SCREENSHOT_DIR`` is set, there too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.browser

TRIGGER = "special delivery"
#: flags for a root, offline, display-less machine (no sandbox, no background connections)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio"]


def _chromium() -> str | None:
    env = os.environ.get("POISONGUARD_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if path := shutil.which(name):
            return path
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    path = _chromium()
    if path is None:
        pytest.skip("Chromium not found (apt-get install chromium; .ci/run installs it when it can)")
    return path


def _browser(chromium: str, *args: str) -> subprocess.CompletedProcess[str]:
    with tempfile.TemporaryDirectory(prefix="pg-chromium-") as profile:
        return subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                              capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    """A real sanitize run on a small poisoned demo delivery (the CLI, as a user runs it)."""
    d = tmp_path_factory.mktemp("browser")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    run = [sys.executable, "-m", "poisonguard"]
    subprocess.run([*run, "demo-data", "--out", "raw", "--inhouse-rows", "1500", "--vendor-rows", "500",
                    "--poison-count", "8"], cwd=d, env=env, check=True, capture_output=True)
    res = subprocess.run([*run, "sanitize", "--input", "raw/inhouse.jsonl", "raw/vendor-acme.jsonl", "--out", "out"],
                         cwd=d, env=env, capture_output=True, text=True)
    assert res.returncode == 3, res.stderr[-2000:]           # 3 = poison found
    return d / "out" / "report.html"


class _Page(HTMLParser):
    """Text by element id / data-count, and the finding clusters, from the DOM Chromium built."""

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[tuple[str, str | None]] = []      # (tag, key) for open elements
        self.text: dict[str, str] = {}
        self.findings: list[dict[str, object]] = []
        self.marks: list[str] = []
        self._mark: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        key = None
        if a.get("id"):
            key = f"#{a['id']}"
        if a.get("data-count"):
            key = f"count:{a['data-count']}"
        if tag == "details" and "finding" in (a.get("class") or ""):
            self.findings.append({"open": "open" in a, "text": ""})
        if tag == "mark":
            self._mark = []
        if tag not in ("br", "img", "meta", "input", "hr"):
            self.stack.append((tag, key))

    def handle_endtag(self, tag: str) -> None:
        if tag == "mark" and self._mark is not None:
            self.marks.append("".join(self._mark))
            self._mark = None
        while self.stack:
            t, _ = self.stack.pop()
            if t == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, key in self.stack:
            if key:
                self.text[key] = self.text.get(key, "") + data
        if any(t == "details" for t, _ in self.stack) and self.findings:
            self.findings[-1]["text"] = str(self.findings[-1]["text"]) + data
        if self._mark is not None:
            self._mark.append(data)


def test_report_in_headless_chromium(chromium, report, tmp_path):
    rep = json.loads(report.with_name("report.json").read_text(encoding="utf-8"))
    url = report.resolve().as_uri()

    dom = _browser(chromium, "--dump-dom", url)
    assert dom.returncode == 0 and "</html>" in dom.stdout, dom.stderr[-2000:]
    page = _Page()
    page.feed(dom.stdout)

    # the verdict comes first, and it is the run's verdict
    assert " ".join(page.text["#verdict"].split()) == f"Verdict: {rep['verdict']}" == "Verdict: poison found"
    assert dom.stdout.index('id="verdict"') < dom.stdout.index('id="counts"') < dom.stdout.index('id="findings"')
    # every count, as the report computed it
    c = rep["counts"]
    assert c["rows_in"] == 2000 == c["clean"] + c["quarantined"] + c["rejected"]
    for key in ("rows_in", "clean", "review", "quarantined", "rejected"):
        assert page.text[f"count:{key}"].strip() == f"{c[key]:,}", key
    # the trigger cluster: open, trigger highlighted, its quarantined rows counted
    cluster = next(f for f in page.findings if TRIGGER in str(f["text"]).lower())
    assert cluster["open"]
    assert TRIGGER in [m.lower() for m in page.marks]
    assert f"{c['quarantined']} quarantined" in str(cluster["text"])
    assert "vendor-acme" in page.text["#sources"] and "suspicious" in page.text["#sources"]

    shot = tmp_path / "report.png"
    res = _browser(chromium, "--window-size=1200,2400", f"--screenshot={shot}", url)
    assert res.returncode == 0 and shot.is_file(), res.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as im:
        assert im.size == (1200, 2400)
        pixels = im.convert("RGB").getdata()
        # the red "poison found" banner was painted (its background colour, #fdecec, from the stylesheet)
        assert sum(1 for p in pixels if p == (0xFD, 0xEC, 0xEC)) > 20_000
    if out := os.environ.get("POISONGUARD_SCREENSHOT_DIR"):
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(out) / "report.png")
