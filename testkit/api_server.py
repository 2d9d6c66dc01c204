"""A real local Dispatch API server (`dispatch-bridge api` as a subprocess) and ways to call it.

`ApiServerHandle` starts it with `--listen 127.0.0.1:0`, reads the port it picked from its
startup line and reuses it on every restart; `client()` gives a `DispatchApiClient` bound
to its key and secret. `run_dispatch_cli` runs the real `dispatch-cli` against it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import re
import secrets
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
from frequenz.api.dispatch.v1 import dispatch_pb2_grpc
from frequenz.client.dispatch import DispatchApiClient

from testkit.processes import ManagedProcess, wait_for_port, wait_until

TEST_KEY = "test-api-key-8f2d"

TEST_SECRET = "test-sign-secret-41c7"

_LISTENING = re.compile(r"Dispatch API server listening on 127\.0\.0\.1:(\d+)")


def dispatch_bridge_command() -> list[str]:
    """The command that runs `dispatch-bridge` from this virtual environment."""
    script = Path(sys.executable).parent / "dispatch-bridge"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "bridge.cli"]


class ApiServerHandle:
    """One `dispatch-bridge api` subprocess and what a test needs to talk to it."""

    def __init__(
        self,
        directory: Path,
        *,
        name: str = "api",
        key: str | None = TEST_KEY,
        secret: str | None = TEST_SECRET,
        allow_past_start: bool = True,
        extra_args: Sequence[str] = (),
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.directory = directory
        self.key = key
        self.secret = secret
        self.db_path = directory / f"{name}.sqlite3"
        self.port = 0
        self._name = name
        self._allow_past_start = allow_past_start
        self._extra_args = list(extra_args)
        env = {"DISPATCH_API_AUTH_KEY": "", "DISPATCH_API_SIGN_SECRET": ""}
        if key is not None:
            env["DISPATCH_API_AUTH_KEY"] = key
        if secret is not None:
            env["DISPATCH_API_SIGN_SECRET"] = secret
        env.update(extra_env or {})
        self._env = env
        self.process: ManagedProcess | None = None

    @property
    def url(self) -> str:
        """The URL for `DispatchApiClient` and `dispatch-cli`."""
        return f"grpc://127.0.0.1:{self.port}?ssl=false"

    @property
    def target(self) -> str:
        """`127.0.0.1:PORT`, for a raw gRPC channel."""
        return f"127.0.0.1:{self.port}"

    def args(self) -> list[str]:
        """The command line of the server (port 0 until the first start)."""
        args = [
            *dispatch_bridge_command(),
            "--log-level",
            "DEBUG",
            "api",
            "--listen",
            f"127.0.0.1:{self.port}",
            "--db",
            str(self.db_path),
            *self._extra_args,
        ]
        if self._allow_past_start:
            args.append("--allow-past-start")
        if self.key is None:
            args.append("--insecure-no-auth")
        return args

    def start(self, timeout: float = 20.0) -> None:
        """Start the server and wait until it accepts connections."""
        if self.process is not None and self.process.running:
            raise RuntimeError("the API server is already running")
        first = self.process is None
        process = ManagedProcess(
            self.args(),
            name=self._name,
            log_path=self.directory / f"{self._name}.log",
            extra_env=self._env,
        )
        self.process = process
        log_size = len(process.output())
        process.start()
        if first:
            match = process.wait_for_output(_LISTENING.pattern, timeout)
            self.port = int(match.group(1))
        else:

            def listening_again() -> bool:
                process.check_alive()
                return _LISTENING.search(process.output()[log_size:]) is not None

            wait_until(listening_again, timeout, "the API server to listen again")
        wait_for_port("127.0.0.1", self.port, timeout, process)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the server with SIGTERM (SIGKILL after `timeout`); return its exit code."""
        return None if self.process is None else self.process.stop(timeout)

    def kill9(self) -> None:
        """Kill the server with SIGKILL, as a crash would."""
        if self.process is not None:
            self.process.kill9()

    def restart(self, timeout: float = 20.0) -> None:
        """Stop the server cleanly and start it again on the same port and database."""
        self.stop()
        self.start(timeout)

    def log(self) -> str:
        """Everything the server printed so far."""
        return "" if self.process is None else self.process.output()

    def client(self, **kwargs: object) -> DispatchApiClient:
        """A `DispatchApiClient` with this server's URL, key and secret.

        Args:
            **kwargs: Passed on to `DispatchApiClient` (override key, secret...).
        """
        options: dict[str, object] = {
            "server_url": self.url,
            "auth_key": self.key or "no-key",
            "sign_secret": self.secret,
        }
        options.update(kwargs)
        return DispatchApiClient(**options)  # type: ignore[arg-type]

    def cli_env(self) -> dict[str, str]:
        """Environment for `dispatch-cli` against this server."""
        env = {"DISPATCH_API_URL": self.url, "DISPATCH_API_AUTH_KEY": self.key or "no-key"}
        if self.secret is not None:
            env["DISPATCH_API_SIGN_SECRET"] = self.secret
        return env


class ApiServerFactory:
    """Starts API servers for one test or module; stops all of them at teardown."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.servers: list[ApiServerHandle] = []

    def __call__(self, **options: object) -> ApiServerHandle:
        """Start a server; options as for `ApiServerHandle` (key, secret, ...)."""
        name = f"api-{len(self.servers) + 1}"
        handle = ApiServerHandle(self.directory, name=name, **options)  # type: ignore[arg-type]
        self.servers.append(handle)
        handle.start()
        return handle

    def stop_all(self) -> None:
        """Stop every server; never raises."""
        for handle in reversed(self.servers):
            try:
                handle.stop()
            except Exception as error:
                print(f"stopping {handle.db_path.name} failed: {error}")

    def report(self) -> str:
        """The tail of each server's log, for a failing test."""
        return "\n".join(
            f"----- API server log {h.directory}\n{h.process.tail() if h.process else ''}"
            for h in self.servers
        )


def signed_metadata(
    method: str,
    *,
    key: str | None = TEST_KEY,
    secret: str | None = TEST_SECRET,
    ts: int | None = None,
    nonce: str | None = None,
) -> list[tuple[str, str]]:
    """Metadata as `frequenz-client-base` sends it, for raw gRPC calls.

    Args:
        method: The last segment of the gRPC path, e.g. `GetMicrogridDispatch`.
        key: The `key` value; None sends no key.
        secret: The signing secret; None sends no signature.
        ts: The `ts` value (default: now).
        nonce: The `nonce` value (default: fresh random, url-safe base64).
    """
    metadata: list[tuple[str, str]] = []
    if key is None:
        return metadata
    metadata.append(("key", key))
    if secret is None:
        return metadata
    ts_text = str(int(time.time()) if ts is None else ts)
    nonce_text = nonce or base64.urlsafe_b64encode(secrets.token_bytes(16)).decode()
    mac = hmac.new(secret.encode(), digestmod=hashlib.sha256)
    for part in (key, ts_text, nonce_text, method):
        mac.update(part.encode())
    sig = base64.urlsafe_b64encode(mac.digest()).decode().rstrip("=")
    metadata += [("ts", ts_text), ("nonce", nonce_text), ("sig", sig)]
    return metadata


@contextlib.asynccontextmanager
async def raw_stub(
    handle: ApiServerHandle,
) -> AsyncIterator[dispatch_pb2_grpc.MicrogridDispatchServiceStub]:
    """A bare gRPC stub (no interceptors) on a channel to the server."""
    async with grpc.aio.insecure_channel(handle.target) as channel:
        yield dispatch_pb2_grpc.MicrogridDispatchServiceStub(channel)


DISPATCH_CLI = Path(sys.executable).parent / "dispatch-cli"


async def run_dispatch_cli(
    server: ApiServerHandle, *args: str, secret: str | None = None
) -> tuple[int, str]:
    """Run the real `dispatch-cli ARGS` with the server's URL and credentials.

    Credentials come from the environment, as a user keeps them off the command
    line; `secret` replaces the signing secret. Returns the exit code and output.
    """
    env = dict(os.environ)
    env.update(server.cli_env())
    if secret is not None:
        env["DISPATCH_API_SIGN_SECRET"] = secret
    process = await asyncio.create_subprocess_exec(
        str(DISPATCH_CLI),
        *args,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), 60)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, output.decode()
