"""The HTML report in headless Chromium: no console errors, every figure drawn, a screenshot.

Needs the `chromium` binary (Debian: `apt-get install -y chromium`); skipped without it.
Runs fully offline: the report inlines plotly.js and Chromium's network features are off.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from test_report import XSS, make_study
from tuner import report

pytestmark = pytest.mark.browser

FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
    "--virtual-time-budget=15000",
]
# Runs first in <head>: records uncaught errors, rejections, console.error and any alert()
# (which would mean study text got executed), clicks "Copy as markdown" (headless Chromium
# never answers the clipboard, so the page falls back to selecting the markdown), then writes
# the errors and what the click left selected into the DOM for --dump-dom.
RECORDER = """<script>
window.__errors = [];
window.addEventListener('error', function (e) { __errors.push('error: ' + e.message); });
window.addEventListener('unhandledrejection', function (e) { __errors.push('rejection: ' + e.reason); });
(function () {
  var ce = console.error;
  console.error = function () { __errors.push('console.error: ' + Array.prototype.join.call(arguments, ' ')); ce.apply(console, arguments); };
})();
window.alert = function (m) { __errors.push('alert: ' + m); };
window.addEventListener('load', function () {
  var button = document.querySelector('button[data-copy="top-markdown"]');
  if (button) { button.click(); }
  setTimeout(function () {
    var copied = document.createElement('pre');
    copied.id = '__copied';
    copied.textContent = JSON.stringify([button ? button.textContent : null, String(window.getSelection())]);
    document.body.appendChild(copied);
    var pre = document.createElement('pre');
    pre.id = '__errors';
    pre.textContent = JSON.stringify(__errors);
    document.body.appendChild(pre);
  }, 2500);
});
</script>"""


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    assert exe is not None
    return exe


# HTML void elements have no end tag; Chromium serialises SVG elements with one.
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _Dom(HTMLParser):
    """Collects the figure divs and counts plotly's drawn elements under each."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: dict[str, dict[str, Any]] = {}
        self.stack: list[str | None] = []
        self.errors_text = ""
        self._in_errors = False
        self.copied_text = ""
        self._in_copied = False
        #: The page's text as a reader sees it (scripts and styles left out), and per id.
        self.text: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = (a.get("class") or "").split()
        fid = a.get("id") or ""
        current = next((f for f in reversed(self.stack) if f), None)
        if fid.startswith("fig-"):
            self.figures[fid] = {"plotted": "js-plotly-plot" in classes, "main_svg": 0, "traces": 0}
            current = fid
        if current is not None:
            if tag == "svg" and "main-svg" in classes:
                self.figures[current]["main_svg"] += 1
            if tag == "g" and "trace" in classes:
                self.figures[current]["traces"] += 1
        self._in_errors = fid == "__errors"
        self._in_copied = fid == "__copied"
        if tag in ("script", "style"):
            self._skip += 1
        if tag not in VOID:
            self.stack.append(fid if fid.startswith("fig-") else None)

    def handle_endtag(self, tag: str) -> None:
        if tag not in VOID and self.stack:
            self.stack.pop()
        if tag in ("script", "style"):
            self._skip -= 1
        self._in_errors = self._in_copied = False

    def handle_data(self, data: str) -> None:
        if self._in_errors:
            self.errors_text += data
        elif self._in_copied:
            self.copied_text += data
        elif not self._skip:
            self.text.append(data)


def _run(exe: str, args: list[str], profile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [exe, *FLAGS, f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", *args],
        capture_output=True, text=True, timeout=180, check=False,
    )


@pytest.mark.skipif(
    shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
    reason="chromium is not on PATH: install it (Debian: apt-get install -y chromium) to run the browser test",
)
def test_report_renders_in_chromium(tmp_path: Path) -> None:
    exe = _chromium()
    # With a re-validation, a roofline and a pruned trial, so every section and figure is drawn.
    _, study = make_study(None, validation=True, roofline=True, pruned=True)
    data = report.build_report(study)
    page = report.render_html(data)
    from plotly.offline import get_plotlyjs

    own = page.replace(get_plotlyjs(), "")
    assert len(own) < len(page) and not re.search(r"""<(script|link|img|iframe)[^>]+(src|href)=""", own), \
        "the report must inline plotly.js and load nothing else"
    html_path = tmp_path / "report.html"
    html_path.write_text(page.replace("<head>", "<head>" + RECORDER, 1), encoding="utf-8")
    url = html_path.as_uri()

    dom = _run(exe, ["--dump-dom", url], tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = _Dom()
    parsed.feed(dom.stdout)
    assert parsed.errors_text, "the error recorder did not run: the page did not finish loading"
    errors = json.loads(parsed.errors_text)
    assert errors == [], errors
    uncaught = [line for line in dom.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line]
    assert uncaught == [], uncaught

    # Every figure in ReportData became a drawn plotly plot with traces in it.
    assert len(parsed.figures) == len(data.figures) == 12
    assert any(fid.endswith("-timeline") for fid in parsed.figures)
    for fid, f in parsed.figures.items():
        assert f["plotted"] and f["main_svg"] >= 1 and f["traces"] >= 1, (fid, f)
    assert dom.stdout.count("js-plotly-plot") >= len(data.figures)
    assert XSS not in dom.stdout  # the escaped text stayed text

    # The first screen, the top table and its markdown, and an empty figure's reason are on the page.
    text = "".join(parsed.text)
    first, bench = data.first, data.bench
    assert first is not None and first.number is not None and bench is not None
    assert text.index(f"What to run: trial #{first.number}") < text.index("Best feasible configuration")
    # Why the speedup has no interval is among the first screen's warnings (else its own note).
    why = next((c.text[1:] for c in first.warnings if c.code == "no_interval"), first.speedup_note)
    for shown in (first.speedup_text, why, first.modelfile, first.export_command,
                  first.create_command, "Copy Modelfile", "what it costs", "VRAM MiB (NVML peak)", "p95 TTFT ms",
                  "Top 10 feasible configurations", bench.markdown, "Timeline of trials"):
        assert shown in text, shown
    for cell in bench.cells[0]:
        assert cell in text, cell
    reasons = {e.key: e.reason for e in data.empty}
    assert reasons["importances"].startswith("Fewer than 50 measured trials for importances") \
        and reasons["importances"] in text
    # "Copy as markdown" was clicked: it copied, or fell back to selecting the markdown (the
    # clipboard never answers in headless Chromium).
    assert ">Copy as markdown</button>" in page
    label, selected = json.loads(parsed.copied_text)
    assert label in ("Copied", "Selected: press Ctrl+C")
    assert label == "Copied" or selected.strip() == bench.markdown.strip()

    shot = tmp_path / "report.png"
    # The screenshot is of the page as users get it, without the recorder.
    (tmp_path / "plain.html").write_text(page, encoding="utf-8")
    res = _run(exe, [f"--screenshot={shot}", "--window-size=1400,4000", (tmp_path / "plain.html").as_uri()],
               tmp_path / "profile-shot")
    assert res.returncode == 0, res.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 50_000


@pytest.mark.skipif(
    shutil.which("chromium") is None and shutil.which("chromium-browser") is None,
    reason="chromium is not on PATH: install it (Debian: apt-get install -y chromium) to run the browser test",
)
def test_a_contended_studys_warnings_are_on_the_first_screen(tmp_path: Path) -> None:
    from test_caveats import _contended_study, _stored

    exe = _chromium()
    url = f"sqlite:///{tmp_path / 't.db'}"
    _contended_study(url)
    data = report.build_report(_stored(url), url)
    assert data.first is not None and [c.code for c in data.first.warnings][0] == "contended"
    page = tmp_path / "report.html"
    page.write_text(report.render_html(data), encoding="utf-8")
    dom = _run(exe, ["--dump-dom", page.as_uri()], tmp_path / "profile-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = _Dom()
    parsed.feed(dom.stdout)
    text = "".join(parsed.text)
    # Under the winner's name, before what it costs: in the first screen a 1400x900 window shows.
    contended = data.first.warnings[0].text
    assert text.index("What to run: trial #1") < text.index("Warnings") < text.index(contended[1:]) \
        < text.index("what it costs"), text[:2000]
    shot = tmp_path / "first.png"
    res = _run(exe, [f"--screenshot={shot}", "--window-size=1400,900", page.as_uri()], tmp_path / "profile-shot")
    assert res.returncode == 0 and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", res.stderr[-2000:]
