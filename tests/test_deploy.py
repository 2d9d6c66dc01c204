"""The files of deploy/: systemd units, example config, container image, compose file.

`systemd-analyze verify` checks that ExecStart's program exists and is
executable. The units name `/opt/dispatch-bridge/bin/dispatch-bridge`, where
the deploy instructions install it; that path does not exist on a test
machine, so the test verifies a temporary copy of each unit whose ExecStart
points at this virtual environment's own `dispatch-bridge` script instead.
Nothing else of the unit is changed.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from bridge.cli import build_parser
from bridge.config import SettingsSource
from testkit.processes import free_port

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
INSTALLED_PROGRAM = "/opt/dispatch-bridge/bin/dispatch-bridge"


def venv_program() -> Path:
    script = Path(sys.executable).parent / "dispatch-bridge"
    if not script.exists():
        pytest.skip(f"no dispatch-bridge script beside {sys.executable}: install the package")
    return script


def unit_settings(path: Path) -> dict[str, list[str]]:
    """The [Service] settings of a unit, every value of each key."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


# --- systemd ---------------------------------------------------------------------


def test_there_is_a_unit_for_run_and_for_api() -> None:
    commands = {unit.name: unit_settings(unit)["ExecStart"][0].split()[1] for unit in UNITS}

    assert commands == {"dispatch-bridge.service": "run", "dispatch-bridge-api.service": "api"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_passes_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    if not Path(analyze).exists():
        pytest.skip("systemd-analyze is not installed (Debian: apt-get install systemd)")
    text = unit.read_text()
    assert INSTALLED_PROGRAM in text
    copy = tmp_path / unit.name
    copy.write_text(text.replace(INSTALLED_PROGRAM, str(venv_program())))

    result = subprocess.run(
        [analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60, check=False
    )

    assert result.returncode == 0, result.stderr
    # Unknown or misspelt keys are only warnings: none are allowed.
    assert unit.name not in result.stderr, result.stderr
    assert "Unknown" not in result.stderr, result.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_is_hardened_and_restarts_on_failure(unit: Path) -> None:
    settings = unit_settings(unit)

    assert settings["DynamicUser"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"]
    assert settings["NoNewPrivileges"] == ["yes"]
    assert settings["PrivateTmp"] == ["yes"]
    assert settings["Restart"] == ["on-failure"]
    assert settings["RestartPreventExitStatus"] == ["2"]
    assert settings["StateDirectory"][0].startswith("dispatch-bridge")
    assert settings["EnvironmentFile"] == ["/etc/dispatch-bridge/dispatch-bridge.env"]
    # Secrets never on the command line.
    assert not re.search(r"(?i)(secret|password|key)", settings["ExecStart"][0])


def test_bridge_unit_waits_for_readiness_and_has_a_watchdog() -> None:
    """The bridge speaks sd_notify (bridge/notify.py); the API server does not."""
    bridge = unit_settings(DEPLOY / "systemd" / "dispatch-bridge.service")
    api = unit_settings(DEPLOY / "systemd" / "dispatch-bridge-api.service")

    assert bridge["Type"] == ["notify"]
    assert bridge["NotifyAccess"] == ["main"]
    watchdog = int(bridge["WatchdogSec"][0])
    # Pings come every WatchdogSec/2; the longest schedule step must fit well within.
    assert 30 <= watchdog <= 300
    assert api["Type"] == ["exec"]
    assert "WatchdogSec" not in api


def test_unit_state_directory_is_where_the_program_writes() -> None:
    bridge = unit_settings(DEPLOY / "systemd" / "dispatch-bridge.service")
    api = unit_settings(DEPLOY / "systemd" / "dispatch-bridge-api.service")

    assert "DISPATCH_BRIDGE_STATE_DIR=%S/dispatch-bridge" in bridge["Environment"]
    assert bridge["StateDirectory"] == ["dispatch-bridge"]
    assert "DISPATCH_API_DB=%S/dispatch-bridge-api/dispatch.sqlite3" in api["Environment"]
    assert api["StateDirectory"] == ["dispatch-bridge-api"]


# --- Example config and env file ---------------------------------------------------


def requested_keys(monkeypatch: pytest.MonkeyPatch) -> set[str]:
    """Record every key a subcommand asks SettingsSource for."""
    keys: set[str] = set()
    original = SettingsSource.get

    def recording(self: SettingsSource, key: str, **kwargs: Any) -> Any:
        keys.add(key)
        return original(self, key, **kwargs)

    monkeypatch.setattr(SettingsSource, "get", recording)
    return keys


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (DEPLOY / "dispatch-bridge.env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key] = value
    return pairs


def test_env_example_is_plain_key_value_lines_with_the_secrets() -> None:
    pairs = env_example()

    assert set(pairs) == {
        "DISPATCH_API_AUTH_KEY",
        "DISPATCH_API_SIGN_SECRET",
        "MQTT_USERNAME",
        "MQTT_PASSWORD",
    }
    # Read the same by systemd and compose: no quotes, no spaces.
    assert all(re.fullmatch(r"[A-Za-z0-9_.:/-]+", value) for value in pairs.values())


def test_example_toml_api_table_holds_only_settings_the_api_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bridge.api.command import load_settings  # noqa: PLC0415

    for key, value in env_example().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DISPATCH_API_DB", "/var/lib/dispatch-bridge-api/dispatch.sqlite3")
    keys = requested_keys(monkeypatch)
    config = DEPLOY / "dispatch-bridge.toml"
    args = build_parser().parse_args(["api", "--config", str(config)])

    settings = load_settings(args)

    assert settings.listen == "127.0.0.1:50051"
    assert settings.allow_past_start is False
    table = tomllib.loads(config.read_text())["api"]
    assert set(table) <= keys, f"keys nobody reads: {set(table) - keys}"


def test_example_toml_bridge_table_holds_only_settings_the_bridge_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bridge.run_command import load_settings  # noqa: PLC0415

    for key, value in env_example().items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DISPATCH_BRIDGE_STATE_DIR", "/var/lib/dispatch-bridge")
    keys = requested_keys(monkeypatch)
    config = DEPLOY / "dispatch-bridge.toml"
    args = build_parser().parse_args(["run", "--config", str(config)])

    settings = load_settings(args)

    assert settings.microgrid_ids == (1,)
    assert str(settings.state_dir) == "/var/lib/dispatch-bridge"

    table = tomllib.loads(config.read_text())["bridge"]
    assert set(table) <= keys, f"keys nobody reads: {set(table) - keys}"


# --- Dockerfile and the README's install ---------------------------------------------


def install_steps(text: str) -> list[tuple[str, ...]]:
    """The venv and pip commands of a shell text, normalised.

    `python3 -m venv DIR` becomes `("venv",)`; `.../pip install [options] SPEC`
    becomes `("pip", package, *sorted extras)`, and `pip install -r FILE`
    `("pip", "-r", FILE)`, with other options ignored (editable or not, quiet or
    not, hashes required or not: the same packages).
    """
    steps: list[tuple[str, ...]] = []
    joined = re.sub(r"\\\n", " ", text)
    for command in re.split(r"&&|\n|;", joined):
        words = shlex.split(command.strip().removeprefix("RUN "), comments=True)
        words = [w for w in words if w != "sudo"]
        if words[:3] in (["python3", "-m", "venv"], ["python", "-m", "venv"]):
            steps.append(("venv",))
        elif len(words) >= 2 and words[0].endswith("pip") and words[1] == "install":
            if "-r" in words:
                steps.append(("pip", "-r", words[words.index("-r") + 1]))
                continue
            specs = [w for w in words[2:] if not w.startswith("-")]
            for spec in specs:
                match = re.fullmatch(r"([^\[\]]+)(?:\[([^\]]*)\])?", spec)
                assert match, spec
                extras = sorted(e for e in (match[2] or "").split(",") if e)
                steps.append(("pip", match[1], *extras))
    return steps


def shell_blocks(markdown: str) -> str:
    return "\n".join(re.findall(r"```(?:sh|bash|console|shell)\n(.*?)```", markdown, re.S))


def dockerfile_runs() -> list[str]:
    """The RUN lines of the Dockerfile, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text()
    return [
        re.sub(r"\\\n\s*", "", run) for run in re.findall(r"^RUN (.*?)(?<!\\)$", text, re.M | re.S)
    ]


def dockerfile_steps() -> list[tuple[str, ...]]:
    return [step for run in dockerfile_runs() for step in install_steps(run)]


LOCKED_INSTALL = [("venv",), ("pip", "-r", "deploy/requirements.lock"), ("pip", ".")]


def test_dockerfile_is_small_and_not_root() -> None:
    text = (DEPLOY / "Dockerfile").read_text()

    assert re.search(r"^FROM python:3\.11-slim", text, re.M)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert dockerfile_steps() == LOCKED_INSTALL


def test_dockerfile_installs_only_from_the_lock_with_hashes() -> None:
    runs = " ".join(dockerfile_runs())

    assert re.search(r"pip install [^&]*--require-hashes -r deploy/requirements\.lock", runs)
    # The package alone: nothing resolved or fetched beside the lock.
    assert re.search(r"pip install [^&]*--no-deps --no-build-isolation \.(\s|$)", runs)


def test_image_and_compose_check_health_with_the_health_command() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    services = compose_file()["services"]

    assert re.search(r'^\s+CMD \["dispatch-bridge", "health"\]$', text, re.M)
    assert services["bridge"]["healthcheck"]["test"][:3] == ["CMD", "dispatch-bridge", "health"]
    config = services["bridge"]["command"][services["bridge"]["command"].index("--config") + 1]
    assert services["bridge"]["healthcheck"]["test"][3:] == ["--config", config]
    assert services["api"]["healthcheck"] == {"disable": True}


def test_dockerfile_installs_like_the_deploy_readme() -> None:
    readme = install_steps(shell_blocks((DEPLOY / "README.md").read_text()))

    assert readme[:3] == dockerfile_steps()


def test_dockerfile_installs_like_the_readme() -> None:
    readme = (REPO / "README.md").read_text()
    steps = [step for step in install_steps(shell_blocks(readme)) if step[0] == "pip"]
    assert steps, "README.md has no install line (python3 -m venv .venv && .venv/bin/pip install .)"
    image = [step for step in dockerfile_steps() if step[0] == "pip"]

    assert image[-1] in steps, f"image installs {image}, README {steps}"
    assert ("venv",) in install_steps(shell_blocks(readme))


def test_dockerignore_sends_only_what_the_image_copies() -> None:
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    copied = re.findall(r"^COPY (?!--from)(.*) \S+$", (DEPLOY / "Dockerfile").read_text(), re.M)
    sources = {src.rstrip("/") for line in copied for src in line.split()}

    assert ignore[0] == "*" or "*" in ignore
    assert {f"!{src}".rstrip("/") for src in sources} <= {i.rstrip("/") for i in ignore}
    assert all((REPO / src).exists() for src in sources)


# --- The lock file and the image's install, run outside a container ---------------------

PYPROJECT = REPO / "pyproject.toml"
LOCK = DEPLOY / "requirements.lock"
IMAGE_PREFIX = "/opt/dispatch-bridge"


def lock_tool() -> ModuleType:
    """deploy/lock.py, loaded by path (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("deploy_lock", DEPLOY / "lock.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def locked_pins() -> dict[str, tuple[str, int]]:
    """Each requirement of the lock: canonical name -> (pinned version, number of hashes)."""
    pins: dict[str, tuple[str, int]] = {}
    text = re.sub(r"\\\n\s*", " ", LOCK.read_text())
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.fullmatch(
            r"([A-Za-z0-9._-]+)==(\S+)((?:\s+--hash=sha256:[0-9a-f]{64})*)\s*", line
        )
        assert match, f"not a pinned, hashed requirement: {line!r}"
        pins[canonicalize_name(match[1])] = (match[2], match[3].count("--hash="))
    return pins


def test_the_lock_is_current_with_pyproject() -> None:
    """Offline: the hash of pyproject's dependency lists equals the one the lock records."""
    tool = lock_tool()

    assert tool.recorded_hash(LOCK) == tool.dependency_hash(PYPROJECT), (
        "pyproject.toml's dependencies changed since deploy/requirements.lock was generated; "
        "regenerate it: .venv/bin/python deploy/lock.py"
    )


def test_the_lock_hash_ignores_comments_and_order_but_not_a_dependency(tmp_path: Path) -> None:
    tool = lock_tool()
    original = PYPROJECT.read_text()
    reordered = tmp_path / "reordered.toml"
    reordered.write_text(
        original.replace("dependencies = [\n", "dependencies = [\n    # a comment\n", 1)
    )
    document = tomllib.loads(original)
    first = document["project"]["dependencies"][0]
    added = tmp_path / "added.toml"
    added.write_text(original.replace(f'"{first}",', f'"{first}",\n    "six>=1",', 1))

    assert tool.dependency_hash(reordered) == tool.dependency_hash(PYPROJECT)
    assert tool.dependency_hash(added) != tool.dependency_hash(PYPROJECT)


def test_the_lock_pins_every_dependency_and_the_build_backend_with_hashes() -> None:
    pins = locked_pins()
    document = tomllib.loads(PYPROJECT.read_text())
    wanted = [
        Requirement(spec)
        for spec in [*document["project"]["dependencies"], *document["build-system"]["requires"]]
    ]

    assert all(hashes >= 1 for _, hashes in pins.values()), pins
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not in the lock"
        assert requirement.specifier.contains(pins[name][0], prereleases=True), (
            f"the lock pins {name}=={pins[name][0]}, pyproject wants {requirement}"
        )


def build_stage(text: str) -> str:
    """The Dockerfile's first stage (where the venv is made), continuation lines joined."""
    stages = re.split(r"^FROM ", re.sub(r"\\\n\s*", "", text), flags=re.M)
    return stages[1]


def copy_like_docker(stage: str, context: Path) -> None:
    """Do the stage's COPY lines from the repository into `context` (its WORKDIR)."""
    for line in re.findall(r"^COPY (?!--)(.*)$", stage, re.M):
        *sources, target = line.split()
        for source in sources:
            origin = REPO / source
            destination = context / target
            if origin.is_dir():
                shutil.copytree(
                    origin, destination, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
                )
            elif target.endswith("/"):
                destination.mkdir(parents=True, exist_ok=True)
                shutil.copy(origin, destination / origin.name)
            else:
                destination.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(origin, destination)


@pytest.mark.slow
@pytest.mark.timeout(900)  # 16 s with pip's cache; 13 MB to download without it
def test_the_image_install_lines_work_outside_a_container(tmp_path: Path) -> None:
    """The build stage's COPY and RUN lines, verbatim but for two substitutions.

    The virtual environment goes to tmp_path instead of /opt, and `--no-cache-dir`
    is dropped (pip's cache only saves downloads on a second run; the hashes are
    checked either way). Needs the package index, as `docker build` does.
    """
    stage = build_stage((DEPLOY / "Dockerfile").read_text())
    context = tmp_path / "src"
    context.mkdir()
    copy_like_docker(stage, context)
    prefix = tmp_path / "opt" / "dispatch-bridge"
    python = Path(sys.base_prefix) / "bin" / "python3"
    runs = re.findall(r"^RUN (.*)$", stage, re.M)
    assert len(runs) == 2, runs

    for run in runs:
        command = run.replace(IMAGE_PREFIX, str(prefix)).replace(" --no-cache-dir", "")
        command = re.sub(r"^python3 ", f"{python} ", command)
        result = subprocess.run(
            ["sh", "-ec", command],
            cwd=context,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}{result.stderr[-3000:]}"

    check = subprocess.run(
        [prefix / "bin" / "pip", "check"], capture_output=True, text=True, timeout=120, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    installed = subprocess.run(
        [prefix / "bin" / "pip", "list", "--format=json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    versions: dict[str, str] = {
        canonicalize_name(each["name"]): each["version"] for each in json.loads(installed)
    }
    # Everything in the lock is what got installed, and nothing else but the package and pip.
    assert {name: version for name, (version, _) in locked_pins().items()} == {
        name: versions[name] for name in locked_pins()
    }
    assert set(versions) - set(locked_pins()) <= {"dispatch-bridge", "pip"}

    # The image's HEALTHCHECK command, with the image's environment and no broker
    # there: one line saying why, exit 1.
    health = re.search(r"^\s+CMD \[(.*)\]$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert health
    words = [word.strip().strip('"') for word in health[1].split(",")]
    environment = {
        "PATH": f"{prefix / 'bin'}:/usr/bin:/bin",
        "MQTT_URL": f"mqtt://127.0.0.1:{free_port()}",
        "MICROGRID_ID": "1",
        "DISPATCH_BRIDGE_STATE_DIR": str(tmp_path / "state"),
    }
    result = subprocess.run(
        words, env=environment, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("broker unreachable: "), result.stdout + result.stderr
    assert "Traceback" not in result.stderr


# --- compose ------------------------------------------------------------------------


def compose_file() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return loaded


def test_compose_runs_mosquitto_with_the_repo_config_bridge_and_optional_api() -> None:
    compose = compose_file()
    services = compose["services"]

    assert set(services) == {"mosquitto", "bridge", "api"}
    assert "../mosquitto.conf:/etc/mosquitto/mosquitto.conf:ro" in services["mosquitto"]["volumes"]
    assert "./mosquitto/acl:/etc/mosquitto/acl:ro" in services["mosquitto"]["volumes"]
    assert services["api"]["profiles"] == ["local-api"]
    assert "profiles" not in services["bridge"]
    assert services["bridge"]["command"][0] == "run"
    assert services["api"]["command"][0] == "api"
    for name in ("bridge", "api"):
        assert services[name]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    # Every host path it mounts exists, except the site's own password file.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith(".") and not source.endswith("/passwd"):
                assert (DEPLOY / source).exists(), source


def test_compose_mosquitto_rewrites_only_log_and_persistence_lines(tmp_path: Path) -> None:
    """The sed of the compose command, run on the shipped config: two lines change."""
    command = compose_file()["services"]["mosquitto"]["command"][2]
    sed = command.split(">")[0].replace("$$", "$").replace("/etc/mosquitto/mosquitto.conf", "")
    shipped = (REPO / "mosquitto.conf").read_text()

    result = subprocess.run(
        ["sh", "-c", sed], input=shipped, capture_output=True, text=True, timeout=30, check=True
    )

    changed = [
        (old, new)
        for old, new in zip(shipped.splitlines(), result.stdout.splitlines(), strict=True)
        if old != new
    ]
    assert [new for _, new in changed] == [
        "persistence_location /mosquitto/data/",
        "log_dest stdout",
    ]


def test_docker_compose_config_accepts_the_file(tmp_path: Path) -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on this machine: `docker compose config` cannot run")
    version = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=60, check=False
    )
    if version.returncode != 0:
        pytest.skip(
            "the docker client has no compose plugin (`docker compose version` failed: "
            f"{(version.stderr or version.stdout).strip()[:120]})"
        )
    # A copy, with the env file the instructions create from the example.
    site = tmp_path / "repo"
    shutil.copytree(DEPLOY, site / "deploy")
    shutil.copy(REPO / "mosquitto.conf", site / "mosquitto.conf")
    shutil.copy(
        site / "deploy" / "dispatch-bridge.env.example", site / "deploy" / "dispatch-bridge.env"
    )

    for profile in ([], ["--profile", "local-api"]):
        result = subprocess.run(
            [docker, "compose", *profile, "-f", "compose.yaml", "config", "--quiet"],
            cwd=site / "deploy",
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
