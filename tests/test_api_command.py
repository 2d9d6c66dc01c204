"""`dispatch-bridge api` as a command: settings from flags, environment and TOML; exit codes."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from frequenz.client.common.microgrid import MicrogridId
from frequenz.client.dispatch import DispatchApiClient
from frequenz.client.dispatch.types import TargetIds

from testkit.api_server import dispatch_bridge_command
from testkit.processes import ProcessFactory, wait_for_port

_LISTENING = r"listening on 127\.0\.0\.1:(\d+)"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISPATCH_API_")}
    env.update(extra)
    return env


def run_api(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*dispatch_bridge_command(), "api", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_refuses_to_start_without_a_key(tmp_path: Path) -> None:
    result = run_api("--listen", "127.0.0.1:0", "--db", str(tmp_path / "db"), env=clean_env())
    assert result.returncode == 2
    assert "no API key" in result.stderr and "--insecure-no-auth" in result.stderr
    assert "Traceback" not in result.stderr


def test_usage_errors_exit_2_with_one_clear_message(tmp_path: Path) -> None:
    env = clean_env(DISPATCH_API_AUTH_KEY="k")
    no_db = run_api("--listen", "127.0.0.1:0", env=env)
    assert no_db.returncode == 2 and "no database file" in no_db.stderr
    bad_listen = run_api("--listen", "localhost", "--db", str(tmp_path / "db"), env=env)
    assert bad_listen.returncode == 2 and "HOST:PORT" in bad_listen.stderr
    bad_bool = run_api(
        "--db", str(tmp_path / "db"), env={**env, "DISPATCH_API_ALLOW_PAST_START": "maybe"}
    )
    assert bad_bool.returncode == 2 and "allow-past-start" in bad_bool.stderr


async def test_settings_from_toml_and_secret_file_then_sigint_exits_0(
    tmp_path: Path, process_factory: ProcessFactory
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text("file-secret\n")
    config = tmp_path / "api.toml"
    config.write_text(
        f'[api]\nlisten = "127.0.0.1:0"\ndb = "{tmp_path / "toml.db"}"\nauth_key = "toml-key"\n'
    )
    process = process_factory(
        [*dispatch_bridge_command(), "api", "--config", str(config)],
        name="api",
        env=clean_env(DISPATCH_API_SIGN_SECRET_FILE=str(secret_file)),
    )
    port = int(process.wait_for_output(_LISTENING, 20).group(1))
    wait_for_port("127.0.0.1", port, 10, process)
    url = f"grpc://127.0.0.1:{port}?ssl=false"
    async with DispatchApiClient(
        server_url=url, auth_key="toml-key", sign_secret="file-secret"
    ) as client:
        created = await client.create(MicrogridId(1), "TOML", "NOW", None, TargetIds(1))
        assert int(created.id) == 1
    assert (tmp_path / "toml.db").exists()
    process.signal(signal.SIGINT)
    assert process.wait(15) == 0
    log = process.output()
    assert "stopped" in log
    assert "toml-key" not in log and "file-secret" not in log


async def test_flags_override_environment(tmp_path: Path, process_factory: ProcessFactory) -> None:
    process = process_factory(
        [
            *dispatch_bridge_command(),
            "api",
            "--listen",
            "127.0.0.1:0",
            "--db",
            str(tmp_path / "flag.db"),
        ],
        name="api",
        env=clean_env(
            DISPATCH_API_AUTH_KEY="k",
            DISPATCH_API_DB=str(tmp_path / "env.db"),
            DISPATCH_API_LISTEN="127.0.0.1:1",
        ),
    )
    process.wait_for_output(_LISTENING, 20)
    assert (tmp_path / "flag.db").exists() and not (tmp_path / "env.db").exists()
    process.signal(signal.SIGTERM)
    assert process.wait(15) == 0


async def test_insecure_no_auth_accepts_anyone_and_says_so(
    tmp_path: Path, process_factory: ProcessFactory
) -> None:
    process = process_factory(
        [
            *dispatch_bridge_command(),
            "api",
            "--listen",
            "127.0.0.1:0",
            "--db",
            str(tmp_path / "open.db"),
            "--insecure-no-auth",
        ],
        name="api",
        env=clean_env(),
    )
    port = int(process.wait_for_output(_LISTENING, 20).group(1))
    assert re.search("WITHOUT authentication", process.output())
    async with DispatchApiClient(
        server_url=f"grpc://127.0.0.1:{port}?ssl=false", auth_key="anything"
    ) as client:
        await client.create(MicrogridId(1), "OPEN", "NOW", None, TargetIds(1))


def test_port_in_use_exits_1(tmp_path: Path, process_factory: ProcessFactory) -> None:
    first = process_factory(
        [
            *dispatch_bridge_command(),
            "api",
            "--listen",
            "127.0.0.1:0",
            "--db",
            str(tmp_path / "a.db"),
        ],
        name="api",
        env=clean_env(DISPATCH_API_AUTH_KEY="k"),
    )
    port = int(first.wait_for_output(_LISTENING, 20).group(1))
    second = run_api(
        "--listen",
        f"127.0.0.1:{port}",
        "--db",
        str(tmp_path / "b.db"),
        env=clean_env(DISPATCH_API_AUTH_KEY="k"),
    )
    assert second.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
