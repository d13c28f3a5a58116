"""A report page in headless Chromium (Debian's `chromium`): its screenshot and console, and which of
its plots drew their data.

report_html gives every artist that draws data an SVG id starting with `data-<plot>-`; the probe
asks the browser for each such element's laid-out box, so a plot holding only axes, a legend and
a "no ... recorded" note counts as empty. Screenshots are kept under ARTIFACTS (CI lists it).
.ci/run sets SPOTRAIN_REQUIRE_CHROMIUM=1: there a missing browser fails these tests, not skips them."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ARTIFACTS = Path(os.environ.get("SPOTRAIN_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parents[1] / "build" / "test-artifacts")

PROBE = """<script>document.body.dataset.plots = JSON.stringify([...document.querySelectorAll("figure.plot")]
  .map(figure => { const svg = figure.querySelector("svg"), box = svg.getBoundingClientRect();
    return {plot: figure.dataset.plot, width: box.width, height: box.height,
            data: [...svg.querySelectorAll('[id^="data-"]')].map(element => {
              const drawn = element.getBoundingClientRect(); return [element.id, drawn.width, drawn.height]; })}; }));
</script>"""


def require_chromium() -> None:
    if shutil.which("chromium") is not None:
        return
    if os.environ.get("SPOTRAIN_REQUIRE_CHROMIUM") == "1":
        pytest.fail("chromium is not installed, and SPOTRAIN_REQUIRE_CHROMIUM=1 says this run must open the page")
    pytest.skip("needs Debian's chromium (.ci/run installs it)")


def chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                           "--enable-logging=stderr", "--v=0", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def screenshot(page: Path, name: str, workdir: Path) -> tuple[Path, list[str]]:
    """The page's screenshot, kept as ARTIFACTS/name, and the console lines Chromium logged opening it."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    picture = ARTIFACTS / name
    picture.unlink(missing_ok=True)  # a stale picture from an earlier run proves nothing
    shown = chromium("--window-size=1100,2800", f"--screenshot={picture}", page.as_uri(), profile=workdir / "profile")
    assert shown.returncode == 0, shown.stderr
    return picture, [line for line in shown.stderr.splitlines() if ":CONSOLE" in line]


def plot_boxes(page: Path, workdir: Path) -> list[dict]:
    """Per plot, as Chromium lays the page out: its name, its SVG's size and each data element's box."""
    probe = workdir / f"probe-{page.stem}.html"
    probe.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = chromium("--dump-dom", probe.as_uri(), profile=workdir / "profile").stdout
    found = re.search(r'data-plots="([^"]*)"', dom)
    assert found, f"the probe did not run in {probe}"
    return json.loads(html.unescape(found.group(1)))


def undrawn(plots: list[dict]) -> list[str]:
    """The plots that show no data: a small SVG, no data element, or a data element whose box has no
    extent at all (a line through one point). A box's height may be 0: Chromium leaves the stroke
    out, so a level line (a local run's steady samples/s) is only wide."""
    return [plot["plot"] for plot in plots
            if plot["width"] <= 300 or plot["height"] <= 150 or not plot["data"]
            or any(width <= 0 and height <= 0 for _, width, height in plot["data"])]
