"""The HTML report as a user sees it: opened in headless Chromium (make report-check).

Needs chromium and chromedriver (apt: chromium chromium-driver) and selenium (the `browser`
extra). Renders the report of REPORT_RUN (a run or experiment directory, default runs/demo,
which `make demo` writes), checks that no script failed, that the heat map, the curves and
the rollout filter work, and writes two screenshots to REPORT_SHOTS (default: the report's folder).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,1000"]


def _browser(profile: str):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[browser]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("headless Chromium and chromedriver are not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


def test_report_in_chromium(repo_root: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from rlhfkit.config import build_config
    from rlhfkit.stages.report import ReportConfig, run_report

    run = Path(os.environ.get("REPORT_RUN", repo_root / "runs/demo"))
    if not run.is_dir():
        pytest.skip(f"{run}: no run to report on (make demo writes runs/demo, or set REPORT_RUN)")
    html = tmp_path / "report.html"
    run_report(build_config(ReportConfig, runs=[str(run)], out=str(html)))
    shots = Path(os.environ.get("REPORT_SHOTS", run))
    with tempfile.TemporaryDirectory(prefix="rlhfkit-chromium-") as profile:
        browser = _browser(profile)
        try:
            browser.get(html.as_uri())
            errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
            assert errors == [], errors

            # A PPO run's own curves (rewards per source, KL, length, entropy, losses), else any.
            curves = browser.find_elements(By.CSS_SELECTOR, '.run[data-stage="ppo"] .curves svg') or browser.find_elements(By.CSS_SELECTOR, ".curves svg")
            assert curves and curves[0].size["height"] > 100, "no curves drawn"
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", curves[0])
            curves[0].screenshot(str(shots / "report-curves.png"))

            # The PPO run with the most reward sources (a heat-map row each), else any run's rollouts.
            boxes = browser.find_elements(By.CSS_SELECTOR, '.run[data-stage="ppo"] .rollouts') or browser.find_elements(By.CSS_SELECTOR, ".rollouts")
            assert boxes, "no rollout heat maps"
            box = max(boxes, key=lambda b: len(b.find_element(By.CSS_SELECTOR, ".rollout").find_elements(By.CSS_SELECTOR, ".heat")))
            run_number = box.get_attribute("data-run")
            items = box.find_elements(By.CSS_SELECTOR, ".rollout")
            steps = sorted({int(e.get_attribute("data-step")) for e in items})
            tokens = items[0].find_elements(By.CSS_SELECTOR, ".heat .t")
            assert tokens and "rgba(" in tokens[0].value_of_css_property("background-color")

            # Filter: one step's rollouts stay visible, the others are hidden.
            Select(browser.find_element(By.CSS_SELECTOR, f'.step-filter[data-run="{run_number}"]')).select_by_value(str(steps[-1]))
            visible = [e for e in items if e.is_displayed()]
            assert visible and all(int(e.get_attribute("data-step")) == steps[-1] for e in visible)
            assert len(visible) == sum(int(e.get_attribute("data-step")) == steps[-1] for e in items)
            # Sort: rewards descend in the page's order.
            Select(browser.find_element(By.CSS_SELECTOR, f'.sort[data-run="{run_number}"]')).select_by_value("desc")
            rewards = [float(e.get_attribute("data-reward")) for e in box.find_elements(By.CSS_SELECTOR, ".rollout") if e.is_displayed()]
            assert rewards == sorted(rewards, reverse=True)

            first = next(e for e in box.find_elements(By.CSS_SELECTOR, ".rollout") if e.is_displayed())
            browser.execute_script("arguments[0].scrollIntoView({block: 'center'})", first)
            first.screenshot(str(shots / "report-heatmap.png"))
            assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []
        finally:
            browser.quit()
    assert (shots / "report-heatmap.png").stat().st_size > 1000
    assert (shots / "report-curves.png").stat().st_size > 1000
