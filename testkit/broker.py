"""A real MQTT broker for tests and benchmarks: Mosquitto (binary or container) or an external one.

`start_broker(workdir)` picks, first match wins: `MQTT_TEST_BROKER` (an external broker's
URL), the `mosquitto` binary started with the shipped config adapted to `workdir` (free
loopback port, persistence, password file and ACL there), a Mosquitto container through
testcontainers, else `BrokerUnavailable` saying how to get one. Users: `bridge`, `actor`,
`operator` and `admin`, passwords in `broker.passwords`, URLs from `broker.url(user)`.
The pytest fixtures over it are in tests/fixtures/broker.py.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import re
import secrets
import shutil
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, NoReturn
from urllib.parse import quote, unquote, urlsplit

from testkit.processes import (
    ManagedProcess,
    ProcessExitedError,
    free_port,
    port_accepts,
    wait_for_port,
    wait_until,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

SHIPPED_CONFIG = REPO_ROOT / "mosquitto.conf"

WEB_SITE = REPO_ROOT / "bridge" / "web" / "site"

SHIPPED_ACL = REPO_ROOT / "deploy" / "mosquitto" / "acl"

DEFAULT_IMAGE = "eclipse-mosquitto:2.0.11"

ROLES = ("bridge", "actor", "operator", "admin")

_RUNNING_LINE = " running\n"
"""Mosquitto logs `mosquitto version X running` once it listens."""

HOW_TO_GET_A_BROKER = (
    "no MQTT broker for the tests: install Mosquitto "
    "(`sudo apt-get install mosquitto mosquitto-clients`), or start a Docker engine "
    "(the tests then run eclipse-mosquitto in a container), or point "
    "MQTT_TEST_BROKER at one (`MQTT_TEST_BROKER=mqtt://user:pass@host:1883`)"
)

# Settings the fixture replaces (uncommented lines only); everything else in the
# shipped config (persistence, autosave, nodelay, queue limits, anonymous off) stays.
_REPLACED = re.compile(
    r"^\s*(listener|port|bind_address|persistence_location|persistence_file|password_file"
    r"|acl_file|log_dest|pid_file|user|certfile|keyfile|cafile|capath|tls_version"
    r"|require_certificate|protocol|http_dir)\b"
)


def find_mosquitto() -> str | None:
    """Return the path of the `mosquitto` binary, also where it is off PATH."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def adapt_config(
    text: str,
    *,
    listener: str,
    persistence_dir: str,
    password_file: str,
    acl_file: str,
    run_as_root: bool,
    log_file: str | None = None,
    websockets_port: int | None = None,
) -> str:
    """Rewrite the shipped mosquitto.conf for a test broker.

    Args:
        text: the shipped config.
        listener: the value of the `listener` line (`PORT ADDRESS` or `PORT`).
        persistence_dir: the persistence directory.
        password_file: the password file path.
        acl_file: the ACL file path.
        run_as_root: add `user root`, so Mosquitto keeps the rights to the temp dir.
        log_file: log to this file (Mosquitto flushes it per line); None: stdout
            (block-buffered when not a terminal, lost on kill -9).
        websockets_port: the port of the shipped WebSockets listener (on 127.0.0.1,
            serving the field view's page from the source tree); None: no such listener.

    Returns:
        The adapted config text.
    """
    kept = [line for line in text.splitlines() if not _REPLACED.match(line)]
    if not any(re.match(r"^\s*persistence\s+true", line) for line in kept):
        raise ValueError("the shipped mosquitto.conf must enable persistence")
    kept += [
        "",
        "# ---- test overrides (tests/fixtures/broker.py) ----",
        f"persistence_location {persistence_dir.rstrip('/')}/",
        f"password_file {password_file}",
        f"acl_file {acl_file}",
        f"log_dest file {log_file}" if log_file else "log_dest stdout",
        f"listener {listener}",
    ]
    if websockets_port is not None:
        kept += [
            f"listener {websockets_port} 127.0.0.1",
            "protocol websockets",
            f"http_dir {WEB_SITE}",
        ]
    if run_as_root:
        kept.append("user root")
    return "\n".join(kept) + "\n"


def hash_password(password: str) -> str:
    """Hash like `mosquitto_passwd` 2.0 does ($7$: PBKDF2-SHA512, 101 rounds)."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return f"$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def write_password_file(path: Path, users: dict[str, str]) -> None:
    """Create the password file with `mosquitto_passwd -b` (or the same hash in Python)."""
    tool = shutil.which("mosquitto_passwd") or (
        "/usr/bin/mosquitto_passwd" if os.access("/usr/bin/mosquitto_passwd", os.X_OK) else None
    )
    path.write_text("")
    if tool is None:
        path.write_text("".join(f"{u}:{hash_password(p)}\n" for u, p in users.items()))
        return
    for user, password in users.items():
        subprocess.run(
            [tool, "-b", str(path), user, password],
            check=True,
            capture_output=True,
            timeout=10,
        )


def write_acl(path: Path) -> None:
    """The shipped ACL, plus an `admin` user that may read and write everything."""
    shipped = SHIPPED_ACL.read_text()
    path.write_text(f"{shipped}\n# ---- test only ----\nuser admin\ntopic readwrite #\n")


class BrokerUnavailable(RuntimeError):
    """No broker could be started or reached; the message says how to get one."""


class BrokerNotControlled(RuntimeError):
    """What was asked needs a broker these helpers control (users, ACL, restarts)."""


def _refuse(reason: str) -> NoReturn:
    raise BrokerNotControlled(reason)


class Broker:
    """A broker the tests can connect to, and (unless external) stop, kill and restart."""

    def __init__(
        self,
        *,
        kind: Literal["mosquitto", "container", "external", "nats"],
        host: str,
        port: int,
        passwords: dict[str, str | None],
        usernames: dict[str, str | None] | None = None,
        workdir: Path | None = None,
        acl_enforced: bool = True,
        ws_port: int | None = None,
    ) -> None:
        self.kind = kind
        self.host = host
        self.port = port
        self.passwords = passwords
        self.usernames: dict[str, str | None] = usernames or {r: r for r in passwords}
        self.workdir = workdir
        self.acl_enforced = acl_enforced
        self.ws_port = ws_port
        """The WebSockets listener's port (serves the field view), if there is one."""
        self._process: ManagedProcess | None = None
        self._container: Any = None
        self.skip: Callable[[str], NoReturn] = _refuse
        """What `require_acl`/`require_control` do when the broker is not ours: raise
        `BrokerNotControlled`; the pytest fixtures make it skip the test instead."""

    # ---- connecting -------------------------------------------------------------

    def username(self, user: str = "admin") -> str | None:
        """The username the role `user` connects with."""
        return self.usernames[user]

    def password(self, user: str = "admin") -> str | None:
        """The password of the role `user`."""
        return self.passwords[user]

    @property
    def bridge_password(self) -> str | None:
        """Password of `bridge` (readwrite microgrid/+/dispatch/#)."""
        return self.passwords["bridge"]

    @property
    def actor_password(self) -> str | None:
        """Password of `actor` (read-only microgrid/+/dispatch/#)."""
        return self.passwords["actor"]

    @property
    def admin_password(self) -> str | None:
        """Password of `admin` (readwrite #)."""
        return self.passwords["admin"]

    def url(self, user: str | None = "admin") -> str:
        """`mqtt://user:pass@host:port` for the role `user`; `user=None`: anonymous."""
        if user is None or self.usernames[user] is None:
            return f"mqtt://{self.host}:{self.port}"
        password = self.passwords[user]
        auth = quote(str(self.usernames[user]), safe="")
        if password is not None:
            auth += ":" + quote(password, safe="")
        return f"mqtt://{auth}@{self.host}:{self.port}"

    def client_kwargs(self, user: str | None = "admin") -> dict[str, Any]:
        """Keyword arguments for `aiomqtt.Client(**kwargs)` as the role `user`."""
        kwargs: dict[str, Any] = {"hostname": self.host, "port": self.port}
        if user is not None:
            kwargs["username"] = self.usernames[user]
            kwargs["password"] = self.passwords[user]
        return kwargs

    def cli_args(self, user: str | None = "admin") -> list[str]:
        """Connection arguments for `mosquitto_sub` / `mosquitto_pub` as the role `user`."""
        args = ["-h", self.host, "-p", str(self.port), "-V", "mqttv311"]
        if user is not None and self.usernames[user] is not None:
            args += ["-u", str(self.usernames[user])]
            if self.passwords[user] is not None:
                args += ["-P", str(self.passwords[user])]
        return args

    # ---- skipping ----------------------------------------------------------------

    def require_acl(self) -> None:
        """Skip the calling test when the broker's users and ACL are not ours."""
        if not self.acl_enforced:
            self.skip(
                "MQTT_TEST_BROKER is an external broker: the fixture cannot create the "
                "bridge/actor/admin users, so ACL assertions are not possible"
            )

    def require_control(self) -> None:
        """Skip the calling test when the fixture cannot stop and start the broker."""
        if self.kind == "external":
            self.skip("MQTT_TEST_BROKER is an external broker: it cannot be restarted")

    # ---- lifecycle ---------------------------------------------------------------

    @property
    def running(self) -> bool:
        """Whether the broker process (or container) is up."""
        if self.kind == "external":
            return True
        if self._process is not None:
            return self._process.running
        return self._container is not None and port_accepts(self.host, self.port)

    def log(self) -> str:
        """The broker's log so far (connections, denials, persistence), for debugging."""
        if self._process is not None:
            return self._process.output()
        if self._container is not None:
            with contextlib.suppress(Exception):
                raw: bytes = self._container.get_wrapped_container().logs()
                return raw.decode("utf-8", "replace")
        return ""

    def start(self, timeout: float = 15.0) -> None:
        """Start the broker (again) on the same port and persistence dir; wait for it."""
        self.require_control()
        if self._process is not None:
            process = self._process
            started_before = process.output().count(_RUNNING_LINE)
            process.start()
            wait_for_port(self.host, self.port, timeout, process=process)

            def this_start_is_running() -> bool:
                # The port may answer for someone else: wait for OUR broker's line.
                process.check_alive()
                return process.output().count(_RUNNING_LINE) > started_before

            wait_until(this_start_is_running, timeout, f"mosquitto on port {self.port} to run")
        elif self._container is not None:
            self._container.get_wrapped_container().start()
            wait_until(
                lambda: port_accepts(self.host, self.port),
                timeout,
                f"container broker on {self.host}:{self.port}",
            )
            _wait_for_mqtt(self.host, self.port, timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop cleanly with SIGTERM (Mosquitto saves its persistence file first)."""
        self.require_control()
        if self._process is not None:
            self._process.stop(timeout)
        elif self._container is not None:
            self._container.get_wrapped_container().stop(timeout=int(timeout))
        wait_until(
            lambda: not port_accepts(self.host, self.port, 0.2),
            timeout,
            f"{self.host}:{self.port} to close",
        )

    def restart(self, timeout: float = 15.0) -> None:
        """`stop()` then `start()`: retained messages survive."""
        self.stop()
        self.start(timeout)

    def kill9(self) -> None:
        """Kill the broker with SIGKILL: no save, state rolls back to the last autosave."""
        self.require_control()
        if self._process is not None:
            self._process.kill9()
        elif self._container is not None:
            self._container.get_wrapped_container().kill(signal="SIGKILL")
        wait_until(
            lambda: not port_accepts(self.host, self.port, 0.2),
            10,
            f"{self.host}:{self.port} to close",
        )

    def close(self) -> None:
        """Stop for good (fixture teardown); never raises."""
        if self._process is not None:
            with contextlib.suppress(Exception):
                self._process.stop(5)
        if self._container is not None:
            with contextlib.suppress(Exception):
                self._container.stop()

    def __repr__(self) -> str:
        return f"<Broker {self.kind} {self.host}:{self.port}>"


def _wait_for_mqtt(host: str, port: int, timeout: float) -> None:
    """Wait until the broker answers an MQTT CONNECT with a CONNACK (any return code)."""
    # CONNECT, MQTT 3.1.1, clean session, keepalive 10, client id "probe".
    packet = bytes([0x10, 17, 0, 4]) + b"MQTT" + bytes([4, 2, 0, 10, 0, 5]) + b"probe"

    def probe() -> bool:
        with socket.create_connection((host, port), timeout=1) as sock:
            sock.sendall(packet)
            return sock.recv(4)[:1] == b"\x20"

    wait_until(probe, timeout, f"an MQTT CONNACK from {host}:{port}")


def _external(url: str) -> Broker:
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "tcp", "") or not parts.hostname:
        raise BrokerUnavailable(f"MQTT_TEST_BROKER={url!r}: expected mqtt://user:pass@host:port")
    user = unquote(parts.username) if parts.username else None
    password = unquote(parts.password) if parts.password else None
    return Broker(
        kind="external",
        host=parts.hostname,
        port=parts.port or 1883,
        passwords=dict.fromkeys(ROLES, password),
        usernames=dict.fromkeys(ROLES, user),
        acl_enforced=False,
    )


def _new_passwords() -> dict[str, str | None]:
    return {role: f"{role}-{secrets.token_hex(6)}" for role in ROLES}


def _start_mosquitto(binary: str, workdir: Path) -> Broker:
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    passwords = _new_passwords()
    write_password_file(workdir / "passwd", {u: p for u, p in passwords.items() if p})
    write_acl(workdir / "acl")
    conf = workdir / "mosquitto.conf"
    # A free port can be taken by a concurrent test between free_port() and the bind.
    attempts = 3
    for attempt in range(1, attempts + 1):
        port = free_port()
        ws_port = free_port()
        conf.write_text(
            adapt_config(
                SHIPPED_CONFIG.read_text(),
                listener=f"{port} 127.0.0.1",
                websockets_port=ws_port,
                persistence_dir=str(data),
                password_file=str(workdir / "passwd"),
                acl_file=str(workdir / "acl"),
                run_as_root=os.geteuid() == 0,
                # The same file the process output goes to: both append.
                log_file=str(workdir / "mosquitto.log"),
            )
        )
        broker = Broker(
            kind="mosquitto",
            host="127.0.0.1",
            port=port,
            passwords=passwords,
            workdir=workdir,
            ws_port=ws_port,
        )
        broker._process = ManagedProcess(
            [binary, "-c", str(conf)], name="mosquitto", log_path=workdir / "mosquitto.log"
        )
        try:
            broker.start()
        except ProcessExitedError as error:
            broker.close()
            if "Address already in use" in str(error) and attempt < attempts:
                continue
            raise
        except Exception:
            broker.close()
            raise
        return broker
    raise AssertionError("unreachable")


def _docker_available() -> bool:
    try:
        # Imported late: only needed without a mosquitto binary, and slow to import.
        from testcontainers.core.docker_client import DockerClient  # noqa: PLC0415

        DockerClient().client.ping()
    except Exception:
        return False
    return True


def _start_container(workdir: Path) -> Broker:
    from testcontainers.core.container import DockerContainer  # noqa: PLC0415

    port = free_port()
    confdir = workdir / "config"
    confdir.mkdir(parents=True, exist_ok=True)
    passwords = _new_passwords()
    # Hash in Python: the container's user must be able to read the file, and the
    # host may have no mosquitto_passwd.
    (confdir / "passwd").write_text(
        "".join(f"{u}:{hash_password(p)}\n" for u, p in passwords.items() if p)
    )
    write_acl(confdir / "acl")
    (confdir / "mosquitto.conf").write_text(
        adapt_config(
            SHIPPED_CONFIG.read_text(),
            listener="1883",
            persistence_dir="/mosquitto/data",
            password_file="/mosquitto/config/passwd",
            acl_file="/mosquitto/config/acl",
            run_as_root=False,
        )
    )
    for path in confdir.iterdir():
        path.chmod(0o644)
    confdir.chmod(0o755)
    image = os.environ.get("MQTT_TEST_BROKER_IMAGE", DEFAULT_IMAGE)
    container = (
        DockerContainer(image)
        .with_bind_ports(1883, port)
        .with_volume_mapping(str(confdir), "/mosquitto/config", "ro")
        .with_command("mosquitto -c /mosquitto/config/mosquitto.conf")
    )
    broker = Broker(
        kind="container", host="127.0.0.1", port=port, passwords=passwords, workdir=workdir
    )
    broker._container = container
    try:
        container.start()
        _wait_for_mqtt("127.0.0.1", port, 60)
    except Exception:
        broker.close()
        raise
    return broker


def start_broker(workdir: Path) -> Broker:
    """Provide a broker by the selection order of this module's docstring."""
    url = os.environ.get("MQTT_TEST_BROKER")
    if url:
        broker = _external(url)
        if not port_accepts(broker.host, broker.port, 3):
            raise BrokerUnavailable(f"MQTT_TEST_BROKER={url!r} does not accept connections")
        return broker
    binary = find_mosquitto()
    if binary is not None:
        return _start_mosquitto(binary, workdir)
    if _docker_available():
        return _start_container(workdir)
    raise BrokerUnavailable(HOW_TO_GET_A_BROKER)


def teardown(broker: Broker, failed: bool) -> None:
    """Close the broker; print the tail of its log first when the test failed."""
    if failed and broker.kind != "external":
        print(f"----- {broker!r} log (tail):\n{broker.log()[-6000:]}")
    broker.close()
