"""`dispatch-bridge run` settings: flags over environment over TOML, one message per mistake."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from actor_sdk.mqtt import parse_broker_url
from bridge.cli import build_parser
from bridge.config import ConfigError, SettingsSource
from bridge.run_command import BridgeSettings, load_settings
from testkit.api_server import dispatch_bridge_command

SECRET = "s3cr3t-Pa55"
BASE_ENV = {
    "MICROGRID_ID": "7",
    "DISPATCH_API_URL": "grpc://127.0.0.1:50051?ssl=false",
    "DISPATCH_API_AUTH_KEY": "key-" + SECRET,
    "MQTT_URL": "mqtt://127.0.0.1:1883",
}


def settings(
    argv: list[str], env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> BridgeSettings:
    for name in [*list(BASE_ENV), "MQTT_USERNAME", "MQTT_PASSWORD", "DISPATCH_API_SIGN_SECRET"]:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    args = build_parser().parse_args(["run", *argv])
    return load_settings(args)


def test_environment_gives_every_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    env = dict(
        BASE_ENV,
        MICROGRID_ID="1, 2",
        DISPATCH_API_SIGN_SECRET=SECRET,
        MQTT_URL="mqtts://broker.example:8884",
        MQTT_USERNAME="bridge",
        MQTT_PASSWORD=SECRET,
        DISPATCH_BRIDGE_STATE_DIR="/tmp/state",
        DISPATCH_BRIDGE_NAME="edge-1",
    )
    result = settings([], env, monkeypatch)
    assert result.microgrid_ids == (1, 2)
    assert result.upstream.sign_secret == SECRET
    assert result.broker.tls and result.broker.port == 8884
    assert (result.broker.username, result.broker.password) == ("bridge", SECRET)
    assert result.state_dir == Path("/tmp/state") and result.name == "edge-1"
    assert SECRET not in repr(result)


def test_flags_win_over_environment_over_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "bridge.toml"
    config.write_text(
        '[bridge]\nmicrogrid_id = [3, 4]\nname = "from-file"\nstate_dir = "/file"\n'
        'topic_root = "site/{microgrid_id}/d"\n'
    )
    env = dict(BASE_ENV, DISPATCH_BRIDGE_STATE_DIR="/env")
    del env["MICROGRID_ID"]
    result = settings(
        ["--config", str(config), "--microgrid-id", "9", "--microgrid-id", "10"], env, monkeypatch
    )
    assert result.microgrid_ids == (9, 10)
    assert result.name == "from-file"
    assert result.state_dir == Path("/env")
    assert result.topic_root == "site/{microgrid_id}/d"


def test_credentials_from_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "pw").write_text(SECRET + "\n")
    env = dict(BASE_ENV, MQTT_USERNAME="bridge", MQTT_PASSWORD_FILE=str(tmp_path / "pw"))
    monkeypatch.delenv("MQTT_PASSWORD_FILE", raising=False)
    assert settings([], env, monkeypatch).broker.password == SECRET


def test_user_and_password_in_the_url() -> None:
    broker = parse_broker_url(f"mqtt://bri%40dge:{SECRET}@host")
    assert (broker.username, broker.password, broker.port) == ("bri@dge", SECRET, 1883)
    assert SECRET not in repr(broker) and SECRET not in broker.describe()


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"MICROGRID_ID": ""}, "no microgrid"),
        (["--microgrid-id", "x"], {}, "'x' is not a whole number"),
        (["--microgrid-id", "0"], {}, "must be positive"),
        ([], {"DISPATCH_API_URL": ""}, "no Dispatch API"),
        (["--dispatch-url", "http://x"], {}, "expected grpc://"),
        ([], {"DISPATCH_API_URL": "grpc://127.0.0.1:x?ssl=false"}, "port must be a number"),
        (["--dispatch-url", f"grpc://k:{SECRET}@api:50051"], {}, "do not belong in the URL"),
        ([], {"DISPATCH_API_AUTH_KEY": ""}, "no Dispatch API key"),
        ([], {"MQTT_URL": ""}, "no MQTT broker"),
        (["--broker", "http://host"], {}, "unknown scheme"),
        (["--broker", f"mqtt://u:{SECRET}@host:99999"], {}, "invalid broker"),
        ([], {"MQTT_PASSWORD": SECRET}, "no user name"),
        (["--broker-ca-file", "/nonexistent"], {}, "not mqtts"),
        (["--microgrid-id", "1,2", "--topic-root", "fixed/root"], {}, "would collide"),
        (["--topic-root", "a/+/b"], {}, "wildcard"),
        (["--retry-max", "0"], {}, "between 0.1 and 3600"),
    ],
)
def test_each_mistake_has_one_clear_message_without_secrets(
    argv: list[str], env: dict[str, str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings(argv, dict(BASE_ENV, **env), monkeypatch)
    text = str(caught.value)
    assert message in text
    assert SECRET not in text
    assert "\n" not in text


def test_settings_source_reads_the_bridge_table(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('name = "top"\n[bridge]\nstate_dir = "/x"\n[api]\nstate_dir = "/y"\n')
    source = SettingsSource.load({}, str(config), table="bridge")
    assert source.get("state_dir", parse=str, default="") == "/x"


def test_cli_exits_2_with_one_line_and_help_explains_each_setting() -> None:
    env = {"PATH": "/usr/bin:/bin", "MQTT_PASSWORD": SECRET}
    result = subprocess.run(
        [*dispatch_bridge_command(), "run"], env=env, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.decode().splitlines() if "dispatch-bridge run" in line]
    assert errors == [
        "dispatch-bridge run: no microgrid: give --microgrid-id N (or MICROGRID_ID, "
        "or microgrid_id in [bridge])"
    ]
    assert SECRET not in result.stderr.decode()
    help_text = subprocess.run(
        [*dispatch_bridge_command(), "run", "--help"], capture_output=True, timeout=60, check=True
    ).stdout.decode()
    for name in (
        "--microgrid-id",
        "MICROGRID_ID",
        "--dispatch-url",
        "DISPATCH_API_URL",
        "DISPATCH_API_AUTH_KEY",
        "DISPATCH_API_SIGN_SECRET",
        "--broker",
        "MQTT_URL",
        "MQTT_USERNAME",
        "MQTT_PASSWORD",
        "--state-dir",
        "DISPATCH_BRIDGE_STATE_DIR",
        "--topic-root",
        "--name",
        "--config",
        "_FILE",
    ):
        assert name in " ".join(help_text.split()), name


def test_a_state_dir_that_cannot_be_written_exits_2(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    env = {
        "PATH": "/usr/bin:/bin",
        **BASE_ENV,
        "DISPATCH_BRIDGE_STATE_DIR": str(blocker / "state"),
    }
    result = subprocess.run(
        [*dispatch_bridge_command(), "run"], env=env, capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert f"state dir {blocker / 'state'} is not writable" in result.stderr.decode()
