"""Access control and TLS of the shipped broker config, proven with real clients.

* An `actor` user cannot forge the schedule: a fake `running` snapshot it publishes is
  dropped by the broker, and neither a live subscriber nor an SDK-managed actor sees it.
* Per-microgrid users (the block the shipped ACL carries as a comment, uncommented
  here): `bridge-mg1` cannot write microgrid 2's tree, `actor-mg1` cannot read it.
* Anonymous clients are refused on the plain and on the TLS listener.
* TLS: the tests make a throwaway CA and server certificate with the `openssl` CLI,
  start Mosquitto with the shipped config's TLS block uncommented (paths rewritten to
  the temp dir), and connect with aiomqtt, `mosquitto_sub` and the bridge itself: with
  the CA it works, without it (or with another CA) the handshake fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest

from actor_sdk import Dispatcher, wire
from testkit.api_server import ApiServerHandle
from testkit.bridge import BridgeFactory
from testkit.broker import SHIPPED_ACL, SHIPPED_CONFIG, Broker, find_mosquitto, write_password_file
from testkit.processes import ManagedProcess, free_port, wait_until
from tests.fixtures.sdk import ActorLog, ScriptedBridge, wire_dispatch

MOSQUITTO_SUB = shutil.which("mosquitto_sub")
OPENSSL = shutil.which("openssl")

pytestmark = pytest.mark.skipif(
    find_mosquitto() is None or MOSQUITTO_SUB is None,
    reason="needs the mosquitto broker and mosquitto_sub (apt-get install mosquitto "
    "mosquitto-clients): these tests start brokers with their own users, ACL and TLS",
)

TYPE = "ACL_TEST"


# --- a broker with custom users, ACL and (optionally) the TLS listener ------------------


@dataclass
class Certs:
    """A throwaway CA and a server certificate for 127.0.0.1 / localhost."""

    ca: Path
    server_cert: Path
    server_key: Path
    other_ca: Path
    """A second CA that did not sign the server certificate."""


def _openssl(*args: str, cwd: Path) -> None:
    assert OPENSSL is not None
    subprocess.run([OPENSSL, *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _make_ca(directory: Path, name: str) -> tuple[Path, Path]:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    return directory / f"{name}.crt", directory / f"{name}.key"


def make_certs(directory: Path) -> Certs:
    """Create a CA, a server key and certificate signed by it, and an unrelated CA."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, _ = _make_ca(directory, "test-ca")
    other_ca, _ = _make_ca(directory, "other-ca")
    _openssl(
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
        cwd=directory,
    )
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "extendedKeyUsage=serverAuth\n"
        "basicConstraints=CA:FALSE\n"
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "test-ca.crt",
        "-CAkey",
        "test-ca.key",
        "-CAcreateserial",
        "-out",
        "server.crt",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        cwd=directory,
    )
    return Certs(ca, directory / "server.crt", directory / "server.key", other_ca)


_TLS_LINE = re.compile(r"^#(listener 8883|certfile |keyfile |cafile |tls_version )")
_PATH_SETTINGS = re.compile(
    r"^\s*(persistence_location|password_file|acl_file|log_dest|pid_file|user"
    # The WebSockets listener of the field view is not under test here.
    r"|listener\s+9001|protocol|http_dir)\b"
)


def broker_config(
    *,
    workdir: Path,
    plain_port: int,
    tls_port: int | None = None,
    certs: Certs | None = None,
) -> str:
    """The shipped mosquitto.conf for a temp dir, with its TLS block enabled if asked.

    The TLS lines are the shipped (commented) ones, uncommented, with their
    `/etc/mosquitto/certs/...` paths pointed at the test's files: what the tests prove
    is what docs/security.md tells an operator to uncomment.
    """
    replacements = {}
    if certs is not None:
        replacements = {
            "/etc/mosquitto/certs/server.crt": str(certs.server_cert),
            "/etc/mosquitto/certs/server.key": str(certs.server_key),
            "/etc/mosquitto/certs/ca.crt": str(certs.ca),
        }
    lines: list[str] = []
    seen_tls = set()
    for shipped_line in SHIPPED_CONFIG.read_text().splitlines():
        line = shipped_line
        if tls_port is not None and _TLS_LINE.match(line):
            line = line[1:]
            seen_tls.add(line.split()[0])
            for shipped, ours in replacements.items():
                line = line.replace(shipped, ours)
            if line.startswith("listener 8883"):
                line = f"listener {tls_port} 127.0.0.1"
        elif re.match(r"^\s*listener\s+1883\b", line):
            line = f"listener {plain_port} 127.0.0.1"
        elif _PATH_SETTINGS.match(line):
            continue
        lines.append(line)
    if tls_port is not None:
        # The shipped file must still carry the whole TLS block the docs describe.
        assert seen_tls == {"listener", "certfile", "keyfile", "cafile", "tls_version"}, seen_tls
        assert not any("/etc/mosquitto/certs" in line for line in lines if line[:1] != "#")
    lines += [
        "",
        "# ---- test overrides (tests/test_acl_tls.py) ----",
        f"persistence_location {workdir / 'data'}/",
        f"password_file {workdir / 'passwd'}",
        f"acl_file {workdir / 'acl'}",
        f"log_dest file {workdir / 'mosquitto.log'}",
    ]
    if os.geteuid() == 0:
        lines.append("user root")
    return "\n".join(lines) + "\n"


def per_microgrid_acl() -> str:
    """The shipped ACL with its commented per-microgrid users enabled, plus `admin`."""
    text = SHIPPED_ACL.read_text()
    enabled = re.sub(r"(?m)^#((?:user|topic) )", r"\1", text)
    assert "user bridge-mg1\ntopic readwrite microgrid/1/dispatch/#" in enabled
    assert "user actor-mg1\ntopic read microgrid/1/dispatch/#" in enabled
    # The catch-all pattern must stay off: it would let actor-mg1 read every microgrid.
    assert re.search(r"(?m)^pattern .*dispatch", enabled) is None
    return enabled + "\n# ---- test only ----\nuser admin\ntopic readwrite #\n"


ROLES = ("bridge", "actor", "admin", "bridge-mg1", "actor-mg1")


@dataclass
class CustomBroker:
    """A broker started from the shipped config with the users of `ROLES`."""

    broker: Broker
    tls_port: int | None
    certs: Certs | None

    def tls_kwargs(self, user: str | None, ca: Path | None) -> dict[str, object]:
        """aiomqtt.Client kwargs for the TLS listener, verifying with `ca` (None: system)."""
        assert self.tls_port is not None
        context = ssl.create_default_context(cafile=str(ca) if ca else None)
        kwargs: dict[str, object] = {
            "hostname": "127.0.0.1",
            "port": self.tls_port,
            "tls_context": context,
            "timeout": 5,
        }
        if user is not None:
            kwargs |= {"username": user, "password": self.broker.passwords[user]}
        return kwargs


def start_custom_broker(workdir: Path, *, tls: bool) -> CustomBroker:
    """Start Mosquitto with `per_microgrid_acl()` and, if asked, the TLS listener."""
    binary = find_mosquitto()
    assert binary is not None
    (workdir / "data").mkdir(parents=True, exist_ok=True)
    passwords: dict[str, str | None] = {role: f"{role}-pw-{os.urandom(4).hex()}" for role in ROLES}
    write_password_file(workdir / "passwd", {u: p for u, p in passwords.items() if p})
    (workdir / "acl").write_text(per_microgrid_acl())
    certs = make_certs(workdir / "certs") if tls else None
    last_error: Exception | None = None
    for _ in range(3):  # a free port can be taken between free_port() and the bind
        plain_port = free_port()
        tls_port = free_port() if tls else None
        (workdir / "mosquitto.conf").write_text(
            broker_config(workdir=workdir, plain_port=plain_port, tls_port=tls_port, certs=certs)
        )
        broker = Broker(
            kind="mosquitto",
            host="127.0.0.1",
            port=plain_port,
            passwords=passwords,
            workdir=workdir,
        )
        broker._process = ManagedProcess(
            [binary, "-c", str(workdir / "mosquitto.conf")],
            name="mosquitto",
            log_path=workdir / "mosquitto.log",
        )
        try:
            broker.start()
            if tls_port is not None:
                wait_until(lambda port=tls_port: _accepts(port), 10, f"TLS listener on {tls_port}")
        except Exception as error:
            broker.close()
            last_error = error
            if "Address already in use" in broker.log():
                continue
            raise
        return CustomBroker(broker, tls_port, certs)
    raise AssertionError(f"could not start the broker: {last_error}")


def _accepts(port: int) -> bool:
    import socket  # noqa: PLC0415

    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


@pytest.fixture
def acl_broker(tmp_path: Path) -> Iterator[CustomBroker]:
    """A broker with per-microgrid users, plain listener only."""
    custom = start_custom_broker(tmp_path / "acl-broker", tls=False)
    try:
        yield custom
    finally:
        custom.broker.close()


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[CustomBroker]:
    """A broker with the shipped TLS listener enabled, certificates from a test CA."""
    if OPENSSL is None:
        pytest.skip("needs the openssl command to make a throwaway CA")
    custom = start_custom_broker(tmp_path / "tls-broker", tls=True)
    try:
        yield custom
    finally:
        custom.broker.close()


# --- helpers ------------------------------------------------------------------------------


async def publish(kwargs: dict[str, object], topic: str, payload: bytes) -> None:
    """Connect, publish one retained QoS 1 message, wait for the PUBACK, disconnect."""
    async with aiomqtt.Client(**kwargs) as client:  # type: ignore[arg-type]
        await client.publish(topic, payload, qos=1, retain=True)


async def retained(broker: Broker, topic_filter: str, user: str = "admin") -> dict[str, bytes]:
    """Every retained message under a filter, as a fresh `user` subscriber sees it.

    The broker sends retained messages right after the SUBACK; a marker published
    by this client afterwards arrives behind them, so no waiting on a timer.
    """
    marker = f"acl-test/marker/{os.urandom(4).hex()}"
    found: dict[str, bytes] = {}
    async with (
        aiomqtt.Client(**broker.client_kwargs("admin")) as writer,
        aiomqtt.Client(**broker.client_kwargs(user)) as reader,
    ):
        await reader.subscribe(topic_filter, qos=1)
        if user != "admin":
            # A reader that may not read the marker topic: a barrier inside the tree.
            return await _retained_via_barrier(broker, reader)
        await reader.subscribe(marker, qos=1)
        await writer.publish(marker, b"x", qos=1)
        async with asyncio.timeout(10):
            async for message in reader.messages:
                if str(message.topic) == marker:
                    break
                if message.retain:
                    found[str(message.topic)] = bytes(message.payload)  # type: ignore[arg-type]
    return found


async def _retained_via_barrier(broker: Broker, reader: aiomqtt.Client) -> dict[str, bytes]:
    # The reader may only read the dispatch tree: the barrier is a non-retained
    # message on a topic under the filter that the reader may read (microgrid 1).
    barrier = f"microgrid/1/dispatch/BARRIER_{os.urandom(4).hex()}/events"
    async with aiomqtt.Client(**broker.client_kwargs("admin")) as writer:
        await writer.publish(barrier, b"barrier", qos=1, retain=False)
    found: dict[str, bytes] = {}
    async with asyncio.timeout(10):
        async for message in reader.messages:
            if str(message.topic) == barrier:
                break
            if message.retain:
                found[str(message.topic)] = bytes(message.payload)  # type: ignore[arg-type]
    return found


def snapshot(microgrid_id: int, dispatches: list[wire.Dispatch], seq: int, session: int) -> bytes:
    """A running snapshot payload of `TYPE`."""
    return wire.encode(
        wire.RunningSnapshot(
            microgrid_id=microgrid_id,
            type=TYPE,
            running=tuple(dispatches),
            next_change=None,
            as_of=datetime.now(UTC),
            session=session,
            seq=seq,
        )
    )


async def messages_of(client: aiomqtt.Client) -> AsyncIterator[aiomqtt.Message]:
    """A client's messages as an async generator usable with `anext`."""
    async for message in client.messages:
        yield message


# --- actor users cannot forge the schedule ------------------------------------------------


async def test_actor_forging_a_running_snapshot_changes_nothing_for_subscribers_or_actors(
    mqtt_broker: Broker,
) -> None:
    mqtt_broker.require_acl()
    microgrid_id = 41
    layout = wire.TopicLayout.for_microgrid(microgrid_id)
    log = ActorLog()
    real = wire_dispatch(1, TYPE, duration=600, payload={"power_w": 1})
    async with ScriptedBridge(mqtt_broker, microgrid_id) as bridge:
        await bridge.status("online")
        await bridge.running(TYPE, [real])
        dispatcher = Dispatcher(microgrid_id=microgrid_id, broker=mqtt_broker.url("actor"))
        async with dispatcher, aiomqtt.Client(**mqtt_broker.client_kwargs("admin")) as watcher:
            await dispatcher.start_managing(TYPE, actor_factory=log.factory)
            await log.wait_count("start", 1)
            await watcher.subscribe(layout.everything, qos=1)
            watched = messages_of(watcher)
            # The retained state arrives first; this marker behind it.
            marker = layout.events("MARKER")
            await watcher.publish(marker, b"marker", qos=1)
            async with asyncio.timeout(10):
                while (await anext(watched)).topic.value != marker:
                    pass

            # The forgeries: a newer session running another dispatch, a clearing of
            # the running topic, an offline status, and a deletion of the dispatch.
            forged = wire_dispatch(666, TYPE, duration=600, payload={"power_w": 10**6})
            actor = mqtt_broker.client_kwargs("actor")
            await publish(actor, layout.running(TYPE), snapshot(microgrid_id, [forged], 1, 99))
            await publish(actor, layout.running(TYPE), b"")
            await publish(actor, layout.status, b'{"state":"offline"}')
            await publish(actor, layout.dispatch(TYPE, 1), b"")

            # The real bridge's next snapshot: if any forgery had got through, the
            # watcher would see it first, and the SDK would have rejected this one
            # (older session than 99) or stopped the actor.
            updated = wire_dispatch(1, TYPE, duration=600, payload={"power_w": 2})
            await bridge.running(TYPE, [updated])
            async with asyncio.timeout(10):
                arrived = await anext(watched)
            assert (arrived.topic.value, arrived.retain) == (layout.running(TYPE), False)
            assert wire.decode_running(arrived.payload).running == (updated,)  # type: ignore[arg-type]
            await log.wait_count("update", 1)

            assert [r.dispatch_id for r in log.of("start")] == [1]
            assert log.of("stop") == []
            assert log.running_dispatch_ids() == [1]
            assert log.records[-1].info is not None
            assert log.records[-1].info.options == {"power_w": 2}

    state = await retained(mqtt_broker, layout.everything)
    assert wire.decode_running(state[layout.running(TYPE)]).running == (updated,)
    assert wire.decode_status(state[layout.status]).state == "online"


# --- per-microgrid users ------------------------------------------------------------------


async def test_per_microgrid_bridge_user_cannot_write_another_microgrids_tree(
    acl_broker: CustomBroker,
) -> None:
    broker = acl_broker.broker
    mg1 = wire.TopicLayout.for_microgrid(1)
    mg2 = wire.TopicLayout.for_microgrid(2)
    admin = broker.client_kwargs("admin")
    for layout in (mg1, mg2):
        await publish(admin, layout.running(TYPE), snapshot(1, [], 1, 1))
        await publish(admin, layout.status, b"original")

    mg1_bridge = {**admin, "username": "bridge-mg1", "password": broker.passwords["bridge-mg1"]}
    async with aiomqtt.Client(**admin) as watcher:  # type: ignore[arg-type]
        await watcher.subscribe("microgrid/+/dispatch/+/running", qos=1)
        await watcher.subscribe("acl-test/marker", qos=1)
        watched = messages_of(watcher)
        for _ in range(2):  # the two retained snapshots
            async with asyncio.timeout(5):
                assert (await anext(watched)).retain

        # Its own tree: stored and delivered.
        await publish(mg1_bridge, mg1.running(TYPE), snapshot(1, [], 2, 1))
        async with asyncio.timeout(5):
            own = await anext(watched)
        assert own.topic.value == mg1.running(TYPE)
        # Another microgrid's tree: acknowledged by the broker (MQTT 3.1.1), then dropped.
        await publish(mg1_bridge, mg2.running(TYPE), snapshot(2, [], 666, 666))
        await publish(mg1_bridge, mg2.status, b"forged")
        await publish(mg1_bridge, "microgrid/2/dispatch/NEW%20TYPE/running", b"forged")
        await publish(admin, "acl-test/marker", b"marker")
        async with asyncio.timeout(5):
            after = await anext(watched)
        assert after.topic.value == "acl-test/marker", f"forged message delivered: {after.topic}"

    state = await retained(broker, "microgrid/#")
    assert wire.decode_running(state[mg1.running(TYPE)]).seq == 2
    assert wire.decode_running(state[mg2.running(TYPE)]).seq == 1
    assert state[mg2.status] == b"original"
    assert "microgrid/2/dispatch/NEW%20TYPE/running" not in state


async def test_per_microgrid_actor_user_reads_only_its_microgrid(
    acl_broker: CustomBroker,
) -> None:
    broker = acl_broker.broker
    admin = broker.client_kwargs("admin")
    for microgrid_id in (1, 2):
        layout = wire.TopicLayout.for_microgrid(microgrid_id)
        await publish(admin, layout.status, f"status of {microgrid_id}".encode())

    seen = await retained(broker, "microgrid/+/dispatch/#", user="actor-mg1")
    assert seen == {"microgrid/1/dispatch/status": b"status of 1"}
    # The shared `actor` user reads every microgrid.
    seen_all = await retained(broker, "microgrid/+/dispatch/#", user="actor")
    assert set(seen_all) >= {"microgrid/1/dispatch/status", "microgrid/2/dispatch/status"}


async def test_bridge_with_a_per_microgrid_user_publishes_its_microgrid_only(
    acl_broker: CustomBroker, api_server: ApiServerHandle, bridge_factory: BridgeFactory
) -> None:
    broker = acl_broker.broker
    bridge = bridge_factory(
        api_server,
        broker,
        (1, 2),
        extra_env={
            "MQTT_USERNAME": "bridge-mg1",
            "MQTT_PASSWORD": broker.passwords["bridge-mg1"] or "",
        },
    )
    bridge.wait_synced(2)

    def statuses() -> dict[str, bytes] | None:
        # The first status of a connection says `syncing`; `online` follows the sync.
        found = asyncio.run(retained(broker, "microgrid/+/dispatch/status"))
        mg1 = found.get("microgrid/1/dispatch/status")
        return found if mg1 and wire.decode_status(mg1).state == "online" else None

    found = await asyncio.to_thread(wait_until, statuses, 15, "mg 1's status online")
    assert "microgrid/2/dispatch/status" not in found


# --- anonymous clients --------------------------------------------------------------------


async def test_anonymous_client_is_refused_on_the_plain_listener(
    acl_broker: CustomBroker,
) -> None:
    with pytest.raises(aiomqtt.MqttCodeError, match=r"[Nn]ot authori[sz]ed"):
        async with aiomqtt.Client("127.0.0.1", acl_broker.broker.port, timeout=5):
            pass


async def test_anonymous_client_is_refused_on_the_tls_listener(tls_broker: CustomBroker) -> None:
    assert tls_broker.certs is not None
    with pytest.raises(aiomqtt.MqttCodeError, match=r"[Nn]ot authori[sz]ed"):
        async with aiomqtt.Client(**tls_broker.tls_kwargs(None, tls_broker.certs.ca)):  # type: ignore[arg-type]
            pass


# --- TLS --------------------------------------------------------------------------------


async def test_tls_connect_with_the_test_ca_reads_and_writes(tls_broker: CustomBroker) -> None:
    assert tls_broker.certs is not None
    ca = tls_broker.certs.ca
    topic = wire.TopicLayout.for_microgrid(1).status
    await publish(tls_broker.tls_kwargs("bridge", ca), topic, b"over tls")
    async with aiomqtt.Client(**tls_broker.tls_kwargs("actor", ca)) as client:  # type: ignore[arg-type]
        await client.subscribe(topic, qos=1)
        async with asyncio.timeout(5):
            message = await anext(messages_of(client))
    assert (message.payload, message.retain) == (b"over tls", True)


@pytest.mark.parametrize("ca", ["system", "other"], ids=["system-cas", "unrelated-ca"])
async def test_tls_connect_without_the_test_ca_fails(tls_broker: CustomBroker, ca: str) -> None:
    assert tls_broker.certs is not None
    trusted = None if ca == "system" else tls_broker.certs.other_ca
    with pytest.raises(aiomqtt.MqttError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify"):
        async with aiomqtt.Client(**tls_broker.tls_kwargs("actor", trusted)):  # type: ignore[arg-type]
            pass


def _mosquitto_sub(
    custom: CustomBroker, *tls_args: str, wait_s: int = 5
) -> subprocess.CompletedProcess[str]:
    assert MOSQUITTO_SUB is not None and custom.tls_port is not None
    return subprocess.run(
        [
            MOSQUITTO_SUB,
            "-h",
            "127.0.0.1",
            "-p",
            str(custom.tls_port),
            *tls_args,
            "-u",
            "actor",
            "-P",
            str(custom.broker.passwords["actor"]),
            "-t",
            "microgrid/1/dispatch/status",
            "-C",
            "1",
            "-W",
            str(wait_s),
        ],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


async def test_mosquitto_sub_over_tls_needs_the_ca_file(tls_broker: CustomBroker) -> None:
    assert tls_broker.certs is not None
    topic = wire.TopicLayout.for_microgrid(1).status
    await publish(tls_broker.broker.client_kwargs("bridge"), topic, b"retained")

    with_ca = await asyncio.to_thread(
        _mosquitto_sub, tls_broker, "--cafile", str(tls_broker.certs.ca)
    )
    assert (with_ca.returncode, with_ca.stdout) == (0, "retained\n"), with_ca.stderr

    system = await asyncio.to_thread(
        _mosquitto_sub, tls_broker, "--capath", "/etc/ssl/certs", wait_s=2
    )
    assert system.returncode != 0 and system.stdout == ""
    assert "TLS error" in system.stderr, system.stderr
    plain = await asyncio.to_thread(_mosquitto_sub, tls_broker, wait_s=2)  # no TLS at all
    assert plain.returncode != 0 and plain.stdout == ""


async def test_bridge_publishes_over_tls_with_its_ca_file(
    tls_broker: CustomBroker, api_server: ApiServerHandle, bridge_factory: BridgeFactory
) -> None:
    assert tls_broker.certs is not None and tls_broker.tls_port is not None
    bridge = bridge_factory(
        api_server,
        tls_broker.broker,
        (1,),
        extra_env={
            "MQTT_URL": f"mqtts://127.0.0.1:{tls_broker.tls_port}",
            "MQTT_CA_FILE": str(tls_broker.certs.ca),
        },
    )
    bridge.wait_synced(1)
    kwargs = tls_broker.tls_kwargs("actor", tls_broker.certs.ca)
    async with aiomqtt.Client(**kwargs) as client:  # type: ignore[arg-type]
        await client.subscribe("microgrid/1/dispatch/status", qos=1)
        async with asyncio.timeout(10):
            message = await anext(messages_of(client))
    assert wire.decode_status(message.payload).state == "online"  # type: ignore[arg-type]
    assert f":{tls_broker.tls_port}" in bridge.output()
    assert "mqtts://" in bridge.output()


async def test_sdk_follows_the_schedule_over_tls(tls_broker: CustomBroker) -> None:
    assert tls_broker.certs is not None and tls_broker.tls_port is not None
    broker = tls_broker.broker
    log = ActorLog()
    async with ScriptedBridge(broker, 5) as bridge:
        await bridge.status("online")
        await bridge.running(TYPE, [wire_dispatch(3, TYPE, duration=600)])
        dispatcher = Dispatcher(
            microgrid_id=5,
            broker=f"mqtts://127.0.0.1:{tls_broker.tls_port}",
            username="actor",
            password=broker.passwords["actor"],
            ca_file=str(tls_broker.certs.ca),
            sync_timeout=timedelta(seconds=5),
        )
        async with dispatcher:
            await dispatcher.start_managing(TYPE, actor_factory=log.factory)
            await log.wait_count("start", 1)
    assert log.running_dispatch_ids() == []  # stopped with the dispatcher
    assert [r.dispatch_id for r in log.of("start")] == [3]
