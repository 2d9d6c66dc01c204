"""The field view's vendored files are the ones package-lock.json pins, and rebuild from npm."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from bridge.web import SITE

WEB = SITE.parent
VENDOR = SITE / "vendor"


def locked(package: str) -> dict[str, str]:
    lock = json.loads((WEB / "package-lock.json").read_text())
    entry: dict[str, str] = lock["packages"][f"node_modules/{package}"]
    return entry


def test_the_vendored_library_is_the_locked_release_byte_for_byte() -> None:
    manifest = json.loads((VENDOR / "MANIFEST.json").read_text())
    entry = manifest["mqtt.min.js"]
    lock = locked("mqtt")
    pinned = json.loads((WEB / "package.json").read_text())["dependencies"]["mqtt"]
    # An exact pin, the lock's version and tarball hash, and this very file's hash.
    assert pinned == lock["version"] == entry["version"]
    assert entry["integrity"] == lock["integrity"]
    assert entry["integrity"].startswith("sha512-")
    digest = hashlib.sha256((VENDOR / "mqtt.min.js").read_bytes()).hexdigest()
    assert digest == entry["sha256"]
    assert entry["license"] == "MIT"
    assert (VENDOR / "mqtt.LICENSE.md").read_text().startswith("The MIT License")


def test_the_page_loads_nothing_from_elsewhere() -> None:
    for name in ("index.html", "app.js", "style.css"):
        text = (SITE / name).read_text()
        assert "http://" not in text and "https://" not in text, name
    assert '<script src="vendor/mqtt.min.js"></script>' in (SITE / "index.html").read_text()


@pytest.mark.slow
def test_build_sh_rebuilds_the_same_file_from_npm(tmp_path: Path) -> None:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed: the rebuild from npm cannot be checked here")
    result = subprocess.run(
        ["bash", str(WEB / "build.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("mqtt.min.js", "mqtt.LICENSE.md", "MANIFEST.json"):
        assert (tmp_path / name).read_bytes() == (VENDOR / name).read_bytes(), name
