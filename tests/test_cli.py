"""The `dispatch-bridge` entry point: subcommands, exit codes, a quiet start."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bridge.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_help_lists_every_subcommand_and_prints_no_import_noise() -> None:
    result = run_cli("--help")

    assert result.returncode == 0
    for command in ("run", "api", "demo", "watch"):
        assert command in result.stdout
    assert result.stderr == ""


def test_an_actor_host_importing_the_sdk_prints_no_import_noise() -> None:
    result = subprocess.run(
        [sys.executable, "-c", "import actor_sdk"], capture_output=True, text=True, check=False
    )

    assert (result.returncode, result.stderr) == (0, "")


def test_unknown_subcommand_is_a_usage_error_with_exit_code_2() -> None:
    result = run_cli("fly")

    assert result.returncode == 2
    assert "invalid choice: 'fly'" in result.stderr
