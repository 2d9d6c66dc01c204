"""The demo's broker: Mosquitto from the shipped config, the embedded one, or a given one.

Mosquitto (when installed) runs the repository's `mosquitto.conf` adapted to
the demo directory: a free loopback port, the users `bridge` and `actor` with
generated passwords, the shipped ACL, and the WebSockets listener of the field
view on a second free port (its `http_dir` is the page shipped in
`bridge.web`). The embedded pure-Python broker (amqtt) has no WebSockets
listener: the demo then has no web page.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from actor_sdk.mqtt import parse_broker_url
from bridge.embedded_broker import EmbeddedBrokerError, embedded_broker
from bridge.web import SITE

__all__ = [
    "DemoBroker",
    "DemoError",
    "adapt_mosquitto_config",
    "find_mosquitto",
    "free_port",
    "start_broker",
    "stop_process",
    "tail",
]

_logger = logging.getLogger("bridge.demo")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED_CONFIG = REPO_ROOT / "mosquitto.conf"
SHIPPED_ACL = REPO_ROOT / "deploy" / "mosquitto" / "acl"

_STOP_TIMEOUT = 15.0

# Settings of the shipped mosquitto.conf that the demo replaces (uncommented lines).
_REPLACED = re.compile(
    r"^\s*(listener|port|bind_address|persistence_location|persistence_file|password_file"
    r"|acl_file|log_dest|pid_file|user|certfile|keyfile|cafile|capath|tls_version"
    r"|require_certificate|protocol|http_dir)\b"
)


class DemoError(Exception):
    """A part of the demo could not start; the message says which and why."""


@dataclass(frozen=True)
class DemoBroker:
    """Where the demo's broker is, and who may use it."""

    kind: str
    host: str
    port: int
    writer: tuple[str | None, str | None]
    reader: tuple[str | None, str | None]
    pid: int | None = None
    web_port: int | None = None
    """The WebSockets listener serving the field view (Mosquitto only)."""

    def page_url(self, microgrid_id: int) -> str | None:
        """The field view's URL, with the reader's throw-away credentials in its fragment.

        The fragment never reaches the broker's HTTP server; the page reads it
        and keeps it in memory.

        Args:
            microgrid_id: The microgrid the page shows.

        Returns:
            The URL, or None when the broker has no WebSockets listener.
        """
        if self.web_port is None:
            return None
        name, password = self.reader
        fragment = urlencode(
            {
                "broker": f"ws://{self.host}:{self.web_port}/",
                "microgrid": microgrid_id,
                "username": name or "",
                "password": password or "",
            }
        )
        return f"http://{self.host}:{self.web_port}/#{fragment}"

    def url(self, user: tuple[str | None, str | None], *, with_password: bool = True) -> str:
        """Return `mqtt://user:password@host:port` for a user.

        Args:
            user: Its name and password (None: anonymous, or no password).
            with_password: Whether the password goes into the URL.

        Returns:
            The URL.
        """
        name, password = user
        if name is None:
            return f"mqtt://{self.host}:{self.port}"
        auth = name if password is None or not with_password else f"{name}:{password}"
        return f"mqtt://{auth}@{self.host}:{self.port}"


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free now (the OS picks it).

    Args:
        host: The address to bind.

    Returns:
        The port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def find_mosquitto() -> str | None:
    """Return the `mosquitto` binary: on PATH, or where Debian puts it.

    Returns:
        Its path, or None when it is not installed.
    """
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


def _hash_password(password: str) -> str:
    """Hash the way `mosquitto_passwd` 2.0 does: `$7$`, PBKDF2-SHA512, 101 rounds."""
    salt = secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return f"$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def adapt_mosquitto_config(
    text: str, *, port: int, directory: Path, run_as_root: bool, web_port: int | None = None
) -> str:
    """Rewrite the shipped mosquitto.conf for the demo's directory and port.

    Everything that makes the shipped config what it is (persistence, autosave,
    `set_tcp_nodelay`, no queue limit, no anonymous clients) stays; the
    listener, files and log destination move to the demo.

    Args:
        text: The shipped config.
        port: The port to listen on, on loopback only.
        directory: Where the password file, ACL, persistence and log go.
        run_as_root: Add `user root`: Mosquitto started as root otherwise
            switches to the `mosquitto` user, which cannot write the directory.
        web_port: The port of the shipped WebSockets listener, on loopback,
            serving the page of `bridge.web`; None: no such listener.

    Returns:
        The config text.
    """
    kept = [line for line in text.splitlines() if not _REPLACED.match(line)]
    kept += [
        "",
        "# ---- dispatch-bridge demo ----",
        f"persistence_location {directory}/",
        f"password_file {directory / 'passwd'}",
        f"acl_file {directory / 'acl'}",
        f"log_dest file {directory / 'mosquitto.log'}",
        f"listener {port} 127.0.0.1",
    ]
    if web_port is not None:
        kept += [f"listener {web_port} 127.0.0.1", "protocol websockets", f"http_dir {SITE}"]
    if run_as_root:
        kept.append("user root")
    return "\n".join(kept) + "\n"


def _write_password_file(path: Path, users: dict[str, str]) -> None:
    tool = shutil.which("mosquitto_passwd") or (
        "/usr/bin/mosquitto_passwd" if os.access("/usr/bin/mosquitto_passwd", os.X_OK) else None
    )
    path.write_text("")
    path.chmod(0o600)
    if tool is None:
        path.write_text("".join(f"{u}:{_hash_password(p)}\n" for u, p in users.items()))
        return
    for user, password in users.items():
        subprocess.run(
            [tool, "-b", str(path), user, password], check=True, capture_output=True, timeout=30
        )


def tail(path: Path, chars: int = 3000) -> str:
    """Return the end of a log file ("" when it cannot be read).

    Args:
        path: The file.
        chars: How many characters at most.

    Returns:
        Its last characters.
    """
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


async def _wait_for_port(
    host: str, port: int, within: float, alive: Callable[[], bool] | None = None
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if alive is not None and not alive():
                raise DemoError(f"the process meant to listen on {host}:{port} exited") from None
            if loop.time() > deadline:
                raise DemoError(f"nothing listens on {host}:{port} after {within:.0f} s") from None
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return


async def stop_process(process: asyncio.subprocess.Process, name: str) -> None:
    """SIGTERM a child, and SIGKILL it if it has not exited within 15 s.

    Args:
        process: The child.
        name: What it is, for the log.
    """
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), _STOP_TIMEOUT)
        except TimeoutError:
            _logger.warning("%s did not stop within %.0f s: killing it", name, _STOP_TIMEOUT)
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()


def _prepare_mosquitto(directory: Path, port: int, web_port: int) -> tuple[dict[str, str], Path]:
    """Write the password file, ACL and config of the demo's Mosquitto."""
    directory.mkdir(parents=True, exist_ok=True)
    passwords = {"bridge": secrets.token_hex(8), "actor": secrets.token_hex(8)}
    _write_password_file(directory / "passwd", passwords)
    shutil.copyfile(SHIPPED_ACL, directory / "acl")
    config = directory / "mosquitto.conf"
    config.write_text(
        adapt_mosquitto_config(
            SHIPPED_CONFIG.read_text(),
            port=port,
            directory=directory,
            run_as_root=os.geteuid() == 0,
            web_port=web_port,
        )
    )
    return passwords, config


def _alive(process: asyncio.subprocess.Process) -> Callable[[], bool]:
    return lambda: process.returncode is None


async def _start_mosquitto(
    binary: str, directory: Path, port: int, within: float
) -> tuple[asyncio.subprocess.Process, int, int, dict[str, str]]:
    """Start Mosquitto; a port taken meanwhile (a free one chosen) means another try."""
    attempts = 3
    for attempt in range(1, attempts + 1):
        chosen = port or free_port()
        web_port = free_port()
        passwords, config = _prepare_mosquitto(directory, chosen, web_port)
        process = await _spawn_mosquitto(binary, directory, config)
        try:
            await _wait_for_port("127.0.0.1", chosen, within, _alive(process))
            await _wait_for_port("127.0.0.1", web_port, within, _alive(process))
        except DemoError:
            await stop_process(process, "mosquitto")
            if attempt < attempts:
                continue
            log = tail(directory / "mosquitto.log") or tail(directory / "mosquitto.out")
            raise DemoError(f"mosquitto did not start on port {chosen}:\n{log}") from None
        except asyncio.CancelledError:
            # Ctrl-C while it starts: nothing owns it yet, so stop it here (it was
            # left running, a test found).
            await stop_process(process, "mosquitto")
            raise
        return process, chosen, web_port, passwords
    raise AssertionError("unreachable")


async def _spawn_mosquitto(
    binary: str, directory: Path, config: Path
) -> asyncio.subprocess.Process:
    with (directory / "mosquitto.out").open("wb") as output:
        process = await asyncio.create_subprocess_exec(
            binary,
            "-c",
            str(config),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            # Its own process group: Ctrl-C reaches only the demo, which stops
            # the broker after the bridge has published its offline status.
            process_group=0,
        )
    return process


@asynccontextmanager
async def _mosquitto(
    binary: str, directory: Path, port: int, within: float
) -> AsyncIterator[DemoBroker]:
    process, chosen, web_port, passwords = await _start_mosquitto(binary, directory, port, within)
    try:
        yield DemoBroker(
            kind=f"mosquitto ({binary}, pid {process.pid})",
            host="127.0.0.1",
            port=chosen,
            writer=("bridge", passwords["bridge"]),
            reader=("actor", passwords["actor"]),
            pid=process.pid,
            web_port=web_port,
        )
    finally:
        await stop_process(process, "mosquitto")


@asynccontextmanager
async def _embedded(port: int) -> AsyncIterator[DemoBroker]:
    passwords = {"bridge": secrets.token_hex(8), "actor": secrets.token_hex(8)}
    try:
        async with embedded_broker("127.0.0.1", port, passwords, writers={"bridge"}) as bound:
            yield DemoBroker(
                kind="embedded (amqtt, in this process; MQTT 3.1.1, retained messages in memory)",
                host="127.0.0.1",
                port=bound,
                writer=("bridge", passwords["bridge"]),
                reader=("actor", passwords["actor"]),
            )
    except EmbeddedBrokerError as error:
        raise DemoError(str(error)) from None


@asynccontextmanager
async def start_broker(
    *, broker_url: str | None, embedded: bool, port: int, within: float, directory: Path
) -> AsyncIterator[DemoBroker]:
    """Start (or take) the demo's broker; stop it on exit.

    Args:
        broker_url: A broker to use instead of starting one (`--broker`).
        embedded: Start the embedded broker even when Mosquitto is installed.
        port: The MQTT port (0: a free one).
        within: How long it may take to start, in seconds.
        directory: The demo directory (Mosquitto's files go to its `mosquitto/`).

    Yields:
        Where the broker is and who may use it.

    Raises:
        DemoError: It did not start.
    """
    if broker_url is not None:
        settings = parse_broker_url(broker_url)
        user = (settings.username, settings.password)
        yield DemoBroker("given by --broker", settings.host, settings.port, user, user)
        return
    binary = None if embedded else find_mosquitto()
    if binary is not None and not (SHIPPED_CONFIG.exists() and SHIPPED_ACL.exists()):
        _logger.warning(
            "mosquitto is installed, but this installation has no mosquitto.conf and ACL of "
            "the source tree (%s): using the embedded broker",
            REPO_ROOT,
        )
        binary = None
    if binary is not None:
        async with _mosquitto(binary, directory / "mosquitto", port, within) as broker:
            yield broker
    else:
        async with _embedded(port) as broker:
            yield broker
