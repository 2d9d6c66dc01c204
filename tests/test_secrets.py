"""Secret hygiene: no secret in any output, error message, `--help` or command line.

The bridge, the local API server and an actor-SDK host run with known secrets (API
key, signing secret, MQTT passwords), given through the environment and through
`_FILE` variants, all at DEBUG log level, and go through the paths that produce the
most text: sync, publish, broker kill -9 and reconnect, API server kill -9 and
re-sync, wrong credentials, broken configuration. Then every byte they printed,
every `--help` text and `/proc/<pid>/cmdline` of each process is searched for the
secrets (as given, and percent-encoded as a URL would carry them).
"""

from __future__ import annotations

import secrets
import subprocess
import sys
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from frequenz.client.dispatch.types import TargetIds

from testkit.api_server import ApiServerFactory, dispatch_bridge_command
from testkit.bridge import BridgeFactory, BridgeHandle
from testkit.broker import Broker
from testkit.processes import ManagedProcess, ProcessFactory, wait_until

REPO = Path(__file__).resolve().parents[1]
SDK_HOST = REPO / "bench" / "_chaos_sdk.py"
TYPE = "SECRET_TEST"


def known(name: str) -> str:
    """A secret no log line could contain by chance; `/` and `+` test URL quoting."""
    return f"{name}-{secrets.token_hex(8)}/+x"


def leaks(text: str, secret_values: Iterable[str]) -> list[str]:
    """The secrets (or their URL-quoted forms) that appear in `text`."""
    found = []
    for value in secret_values:
        forms = {value, quote(value, safe=""), quote(value)}
        if any(form in text for form in forms):
            found.append(value)
    return found


def cmdline(process: ManagedProcess) -> str:
    """The process's command line as the kernel shows it to every user (`ps`)."""
    raw = Path(f"/proc/{process.pid}/cmdline").read_bytes()
    comm = Path(f"/proc/{process.pid}/comm").read_text()
    return raw.replace(b"\0", b" ").decode() + " " + comm


def run_cli(args: list[str], env: dict[str, str], timeout: float = 30) -> tuple[int, str]:
    """Run `dispatch-bridge ARGS` and return its exit code and all its output."""
    import os  # noqa: PLC0415

    result = subprocess.run(
        [*dispatch_bridge_command(), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return result.returncode, result.stdout + result.stderr


def start_sdk_host(
    factory: ProcessFactory,
    broker: Broker,
    tmp_path: Path,
    *,
    password_env: dict[str, str],
    name: str,
) -> ManagedProcess:
    """The actor host of the chaos run, at DEBUG, credentials from the environment."""
    return factory(
        [
            sys.executable,
            SDK_HOST,
            "--microgrid-id",
            "1",
            "--type",
            TYPE,
            "--record",
            tmp_path / f"{name}.jsonl",
            "--host",
            name,
            "--log-level",
            "DEBUG",
        ],
        name=name,
        extra_env={
            "MQTT_URL": f"mqtt://{broker.host}:{broker.port}",
            "MQTT_USERNAME": "actor",
            **password_env,
        },
    )


async def create_dispatch(api: object, start_in: float = 0.0) -> None:
    """Create one running dispatch of `TYPE` on microgrid 1 through the client."""
    async with api.client() as client:  # type: ignore[attr-defined]
        await client.create(
            microgrid_id=1,
            type=TYPE,
            start_time=datetime.now(UTC) + timedelta(seconds=start_in + 2),
            duration=timedelta(minutes=10),
            target=TargetIds(1),
            active=True,
            dry_run=False,
            payload={"note": "secret hygiene"},
        )


@pytest.mark.slow
async def test_no_secret_in_output_or_command_line_through_faults(
    api_server_factory: ApiServerFactory,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    process_factory: ProcessFactory,
    tmp_path: Path,
) -> None:
    mqtt_broker.require_acl()
    key, sign = known("api-key"), known("sign-secret")
    api = api_server_factory(key=key, secret=sign)
    bridge_pw, actor_pw = mqtt_broker.passwords["bridge"], mqtt_broker.passwords["actor"]
    assert bridge_pw and actor_pw
    all_secrets = [key, sign, bridge_pw, actor_pw]

    # Bridge 1: everything from the environment (the fixture's way).
    from_env = bridge_factory(api, mqtt_broker, (1,))
    # Bridge 2: everything from files, and the MQTT password inside the URL too.
    files = tmp_path / "secrets"
    files.mkdir()
    for name, value in (("key", key), ("sign", sign), ("mqtt", bridge_pw)):
        (files / name).write_text(value + "\n")
    from_files = bridge_factory(
        api,
        mqtt_broker,
        (1,),
        extra_env={
            "DISPATCH_API_AUTH_KEY": "",
            "DISPATCH_API_AUTH_KEY_FILE": str(files / "key"),
            "DISPATCH_API_SIGN_SECRET": "",
            "DISPATCH_API_SIGN_SECRET_FILE": str(files / "sign"),
            "MQTT_PASSWORD": "",
            "MQTT_PASSWORD_FILE": str(files / "mqtt"),
            "DISPATCH_BRIDGE_NAME": "files-bridge",
        },
    )
    sdk = start_sdk_host(
        process_factory,
        mqtt_broker,
        tmp_path,
        password_env={"MQTT_PASSWORD_FILE": str(files / "mqtt-actor")},
        name="sdk-files",
    )
    (files / "mqtt-actor").write_text(actor_pw)
    sdk_env = start_sdk_host(
        process_factory,
        mqtt_broker,
        tmp_path,
        password_env={"MQTT_PASSWORD": actor_pw},
        name="sdk-env",
    )
    for bridge in (from_env, from_files):
        bridge.wait_synced(1)
    await create_dispatch(api)
    for host in (sdk, sdk_env):
        host.wait_for_output(r"started the actor of type", 20)

    processes = [api.process, from_env.process, from_files.process, sdk, sdk_env]
    for process in processes:
        assert process is not None
        assert leaks(cmdline(process), all_secrets) == [], process.name

    # Faults: the broker dies and comes back; the API server dies and comes back.
    mqtt_broker.kill9()
    mqtt_broker.start()
    api.kill9()
    api.start()
    for bridge in (from_env, from_files):
        bridge.wait_synced(2, timeout=30)
    for host in (sdk, sdk_env):
        wait_until(
            lambda h=host: h.output().count("connected to the broker") >= 2,
            30,
            f"{host.name} to reconnect",
        )

    for process in processes:
        assert process is not None
        process.stop()
        output = process.output()
        assert "DEBUG" in output, f"{process.name} did not log at DEBUG"
        assert leaks(output, all_secrets) == [], f"{process.name} printed a secret"


def _bridge_with(
    bridge_factory: BridgeFactory, api: object, broker: Broker, env: dict[str, str]
) -> BridgeHandle:
    handle = bridge_factory(api, broker, (1,), extra_env=env, start=False)
    handle.start(wait_online=False)
    return handle


@pytest.mark.slow
async def test_no_secret_in_errors_of_wrong_credentials(
    api_server_factory: ApiServerFactory,
    mqtt_broker: Broker,
    bridge_factory: BridgeFactory,
    process_factory: ProcessFactory,
    tmp_path: Path,
) -> None:
    mqtt_broker.require_acl()
    key, sign = known("api-key"), known("sign-secret")
    api = api_server_factory(key=key, secret=sign)
    wrong_key, wrong_sign, wrong_pw = known("wrong-key"), known("wrong-sign"), known("wrong-pw")
    all_secrets = [key, sign, wrong_key, wrong_sign, wrong_pw]
    all_secrets += [p for p in mqtt_broker.passwords.values() if p]

    bad_mqtt = _bridge_with(bridge_factory, api, mqtt_broker, {"MQTT_PASSWORD": wrong_pw})
    bad_key = _bridge_with(
        bridge_factory,
        api,
        mqtt_broker,
        {"DISPATCH_API_AUTH_KEY": wrong_key, "DISPATCH_BRIDGE_NAME": "bad-key"},
    )
    bad_sign = _bridge_with(
        bridge_factory,
        api,
        mqtt_broker,
        {"DISPATCH_API_SIGN_SECRET": wrong_sign, "DISPATCH_BRIDGE_NAME": "bad-sign"},
    )
    bad_sdk = start_sdk_host(
        process_factory,
        mqtt_broker,
        tmp_path,
        password_env={"MQTT_PASSWORD": wrong_pw},
        name="sdk-wrong-password",
    )
    # Each says what went wrong (at least twice: it keeps retrying), none says the secret.
    bad_mqtt.process.wait_for_output(r"(?i)(not authori[sz]ed|refused|bad user name)", 20)
    for handle in (bad_key, bad_sign):
        handle.process.wait_for_output(r"UNAUTHENTICATED|PERMISSION_DENIED", 20)
    bad_sdk.wait_for_output(r"(?i)cannot connect to the broker", 20)
    for process in (bad_mqtt.process, bad_key.process, bad_sign.process, bad_sdk):
        assert leaks(cmdline(process), all_secrets) == [], process.name
        process.stop()
        assert leaks(process.output(), all_secrets) == [], f"{process.name} printed a secret"
    assert leaks(api.log(), all_secrets) == [], "the API server printed a secret"


def cli_in_process(
    args: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> tuple[int, str]:
    """Run `dispatch-bridge ARGS` in this process (fast); return its exit code and output.

    Only for arguments that end before anything starts (help, configuration errors).
    """
    from bridge.cli import main  # noqa: PLC0415

    with monkeypatch.context() as patch:
        for name, value in env.items():
            patch.setenv(name, value)
        capsys.readouterr()
        try:
            code = main(args)
        except SystemExit as stop:
            code = int(stop.code or 0)
        captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_no_secret_in_help_or_configuration_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    key, sign, password = known("api-key"), known("sign-secret"), known("mqtt-pw")
    all_secrets = [key, sign, password]
    env = {
        "DISPATCH_API_AUTH_KEY": key,
        "DISPATCH_API_SIGN_SECRET": sign,
        "MQTT_USERNAME": "bridge",
        "MQTT_PASSWORD": password,
        "MICROGRID_ID": "1",
        "DISPATCH_API_URL": "grpc://127.0.0.1:1?ssl=false",
        "MQTT_URL": "mqtt://127.0.0.1:1",
        "DISPATCH_BRIDGE_STATE_DIR": str(tmp_path / "state"),
    }
    for args in (["--help"], ["run", "--help"], ["api", "--help"], ["watch", "--help"]):
        code, output = cli_in_process(args, env, monkeypatch, capsys)
        assert code == 0, output
        assert "usage:" in output
        assert leaks(output, all_secrets) == [], args
    # And once as a real process, as an operator would run it.
    code, output = run_cli(["run", "--help"], env)
    assert code == 0 and "usage:" in output and leaks(output, all_secrets) == []

    toml = tmp_path / "bad.toml"
    toml.write_text(f'[bridge]\nauth_key = ["{key}"]\nmqtt_password = {{ x = "{password}" }}\n')
    broken_toml = tmp_path / "broken.toml"
    broken_toml.write_text(f'[bridge]\nauth_key = "{key}\nsign_secret = {sign}\n')
    key_file = tmp_path / "key-file"
    key_file.write_text(" \n")
    user_pw = f"bridge:{quote(password, safe='')}"
    cases: list[tuple[list[str], dict[str, str]]] = [
        (["run"], {"MQTT_URL": f"mqtt://{user_pw}@127.0.0.1:notaport"}),
        (["run"], {"MQTT_URL": f"ftp://{user_pw}@127.0.0.1:1883"}),
        (["run"], {"MQTT_URL": f"mqtt://{user_pw}@127.0.0.1:1883/path?x=1"}),
        (["run"], {"MQTT_URL": f"mqtt://{user_pw}@[::1:1883"}),
        (["run"], {"MQTT_URL": f"mqtt://{user_pw}@"}),
        (
            ["run"],
            {"MQTT_URL": f"mqtt://:{quote(password, safe='')}@127.0.0.1", "MQTT_USERNAME": ""},
        ),
        (["run"], {"DISPATCH_API_URL": f"http://{quote(key, safe='')}:{quote(sign, safe='')}@h"}),
        (["run"], {"DISPATCH_API_AUTH_KEY": " ", "DISPATCH_API_SIGN_SECRET": "\t"}),
        (["run"], {"DISPATCH_API_AUTH_KEY": "", "DISPATCH_API_AUTH_KEY_FILE": str(key_file)}),
        (["run"], {"MQTT_USERNAME": "", "MQTT_URL": "mqtt://127.0.0.1:1"}),
        (["run", "--config", str(toml)], {"DISPATCH_API_AUTH_KEY": "", "MQTT_PASSWORD": ""}),
        (["run", "--config", str(broken_toml)], {"DISPATCH_API_AUTH_KEY": ""}),
        (["run", "--broker-ca-file", "/nonexistent"], {"MQTT_URL": f"mqtts://{user_pw}@h:1"}),
        (["api", "--listen", "nonsense"], {}),
        (["api", "--listen", "127.0.0.1:1", "--config", str(broken_toml)], {}),
    ]
    for args, overrides in cases:
        code, output = cli_in_process(args, {**env, **overrides}, monkeypatch, capsys)
        assert code == 2, (args, overrides, output)
        assert output.strip(), "a configuration error says what is wrong"
        assert leaks(output, all_secrets) == [], (args, overrides, output)


def test_no_secret_in_sdk_errors_for_a_bad_broker_url() -> None:
    from actor_sdk import BrokerUrlError, Dispatcher  # noqa: PLC0415

    password = known("sdk-pw")
    for url in (
        f"mqtt://actor:{password}@127.0.0.1:notaport",
        f"ftp://actor:{password}@127.0.0.1",
        f"mqtt://actor:{password}@127.0.0.1/path",
        f"mqtt://actor:{password}@[::1",
        f"mqtt://actor:{password}@",
    ):
        with pytest.raises(BrokerUrlError) as caught:
            Dispatcher(microgrid_id=1, broker=url)
        assert leaks(str(caught.value), [password]) == [], str(caught.value)
        assert leaks(repr(caught.value), [password]) == []
