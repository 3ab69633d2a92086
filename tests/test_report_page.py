"""``report.html`` as a browser shows it: headless Chromium renders the page, its DOM holds
the per-site table and the learning curve, and a screenshot shows the plots drawn."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from server.run_report import write_report
from tests.report_results import SITES, run_results

CHROMIUM = shutil.which("chromium")
WIDTH, HEIGHT = 1280, 2400
PLOT_BLUE = np.array([31, 119, 180])
"""matplotlib's first colour (site-0's line): nothing but a drawn plot has it."""

pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (Debian: apt-get install chromium); it renders report.html",
)


def _chromium(page: Path, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--user-data-dir={profile}", *args, page.as_uri()],
        capture_output=True, text=True, timeout=180, check=True,
    )


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_report(run_results(), tmp_path_factory.mktemp("report")).html


def test_the_rendered_dom_holds_the_site_table_and_the_learning_curve(
        page: Path, tmp_path: Path) -> None:
    dom = _chromium(page, tmp_path / "profile", "--dump-dom").stdout
    table = re.search(r'<table id="test-performance">(.*?)</table>', dom, re.S)
    assert table is not None, "no per-site table in the rendered page"
    rows = re.findall(r"<tr>(.*?)</tr>", table.group(1), re.S)
    assert [re.search(r"<t[dh][^>]*>(.*?)</t[dh]>", r).group(1) for r in rows] == [
        "site", *SITES, "pooled test"]
    image = re.search(r'<img id="learning_curve"[^>]*src="data:image/png;base64,', dom)
    assert image is not None, "no embedded learning-curve image in the rendered page"


def test_a_screenshot_shows_the_plots(page: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    _chromium(page, tmp_path / "profile", f"--window-size={WIDTH},{HEIGHT}",
              f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (HEIGHT, WIDTH, 3)
    blue = np.abs(pixels - PLOT_BLUE).max(axis=2) <= 12
    assert blue.sum() > 200, f"no plot drawn in the screenshot {shot}"
