"""Make docs/img/field-view.png: `dispatch-bridge demo`, its printed page URL, headless Chromium.

Run from the repository root: `.venv/bin/python docs/img/screenshot.py`
(needs Mosquitto, Debian's chromium and chromium-driver, and the test extra).
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selenium.webdriver.common.by import By

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from tests.fixtures.browser import start_chromium  # noqa: E402

OUT = REPO / "docs" / "img" / "field-view.png"


def main() -> None:
    """Start the demo, open its page in headless Chromium, save the screenshot."""
    demo = subprocess.Popen(
        [sys.executable, "-m", "bridge.cli", "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert demo.stdout is not None
    output = ""
    try:
        for line in demo.stdout:
            output += line
            if line.startswith("An actor managed"):
                break
        url = re.search(r"^  (http://127\.0\.0\.1:\S+)$", output, re.MULTILINE)
        assert url, output
        with tempfile.TemporaryDirectory() as profile:
            driver = start_chromium(Path(profile), width=1400, height=1150)
            try:
                driver.get(url[1])
                deadline = time.time() + 30
                while time.time() < deadline:
                    running = driver.find_elements(By.CSS_SELECTOR, "#running [data-running-id]")
                    if len(running) >= 2:
                        break
                    time.sleep(0.2)
                time.sleep(1.5)  # one more redraw with every upcoming topic in
                driver.save_screenshot(str(OUT))
            finally:
                driver.quit()
    finally:
        demo.send_signal(signal.SIGINT)
        demo.wait(60)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
