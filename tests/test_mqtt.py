"""`actor_sdk.mqtt` without a broker: URLs, secrets, TLS settings, backoff, protocol fallback.

Where the bridge's and the SDK's former parsers and secret readers disagreed,
a test names the behaviour that won.
"""

from __future__ import annotations

import random
import ssl
from pathlib import Path

import aiomqtt
import pytest

from actor_sdk import SdkError
from actor_sdk.mqtt import (
    Backoff,
    BrokerError,
    BrokerSettings,
    BrokerUrlError,
    ProtocolChoice,
    broker_errors,
    env_secret,
    parse_broker_url,
    read_secret_file,
    reconnect_delay,
)

SECRET = "p:ss/+w@rd"


@pytest.mark.parametrize(
    ("url", "port", "tls", "path"),
    [
        ("mqtt://edge", 1883, False, None),
        ("tcp://edge", 1883, False, None),
        ("mqtts://edge", 8883, True, None),
        ("ssl://edge", 8883, True, None),
        ("ws://edge", 80, False, "/"),
        ("wss://edge:9443/mqtt", 9443, True, "/mqtt"),
        ("mqtt://edge:1884/", 1884, False, None),
        ("mqtt://[::1]:1885", 1885, False, None),
    ],
)
def test_schemes_and_default_ports(url: str, port: int, tls: bool, path: str | None) -> None:
    settings = parse_broker_url(url)
    assert (settings.port, settings.tls, settings.websocket_path) == (port, tls, path)


def test_credentials_in_the_url_are_percent_decoded_and_never_shown() -> None:
    settings = parse_broker_url("mqtts://act%40or:p%3Ass%2F%2Bw%40rd@edge:8884")
    assert (settings.host, settings.port, settings.username, settings.password) == (
        "edge",
        8884,
        "act@or",
        SECRET,
    )
    assert settings.describe() == "mqtts://act@or@edge:8884"
    assert SECRET not in repr(settings) and "p%3Ass" not in repr(settings)


def test_scheme_is_case_insensitive() -> None:
    # Resolved: the SDK read the scheme case-insensitively, the bridge refused `MQTT://`.
    # RFC 3986 makes schemes case-insensitive: the SDK's behaviour won.
    assert parse_broker_url("MQTTS://edge").tls


def test_a_query_or_fragment_is_refused_not_ignored() -> None:
    # Resolved: the bridge ignored `?...` and `#...`, the SDK refused them. A silently
    # ignored `?tls=true` would connect in the clear: the SDK's behaviour won.
    for url in ("mqtt://edge?tls=true", "mqtt://edge#x", "mqtt://edge/path"):
        with pytest.raises(BrokerUrlError, match="query or fragment"):
            parse_broker_url(url)


def test_an_empty_password_in_the_url_is_an_empty_password() -> None:
    # Resolved: the SDK turned `user:@host` into no password (and then read MQTT_PASSWORD),
    # the bridge into an empty one. The URL says empty: the bridge's behaviour won.
    assert parse_broker_url("mqtt://user:@edge").password == ""
    settings = BrokerSettings.from_url("mqtt://user:@edge", environ={"MQTT_PASSWORD": "env"})
    assert settings.password == ""


@pytest.mark.parametrize(
    "url",
    [
        "http://edge",
        "mqtt://",
        "mqtt://edge:99999",
        "mqtt://edge:port",
        "edge:1883",
        f"mqtt://u:{SECRET}@[::1:1883",
    ],
)
def test_bad_urls_raise_one_error_type_without_the_password(url: str) -> None:
    with pytest.raises(BrokerUrlError) as caught:
        parse_broker_url(url)
    # Both callers' contracts: the SDK's root error and the bridge's ValueError.
    assert isinstance(caught.value, SdkError) and isinstance(caught.value, ValueError)
    assert SECRET not in str(caught.value)


# --- secrets -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "secret"),
    [
        ("pw", "pw"),
        ("pw\n", "pw"),
        ("pw\r\n", "pw"),
        ("pw\n\n", "pw"),
        (" pw \n", " pw "),
        ("p w\t", "p w\t"),
    ],
)
def test_a_secret_file_loses_its_line_ends_and_nothing_else(
    tmp_path: Path, content: str, secret: str
) -> None:
    # Resolved: the SDK dropped one "\n" (so "pw\r\n" gave "pw\r"), the bridge stripped all
    # whitespace (so a password ending in a space lost it). One rule: trailing line ends go.
    path = tmp_path / "secret"
    path.write_bytes(content.encode())
    assert read_secret_file(path) == secret


def test_env_secret_prefers_the_variable_then_the_file(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("from-file\n")
    assert env_secret("PW", {"PW": "direct", "PW_FILE": str(path)}) == "direct"
    assert env_secret("PW", {"PW": "", "PW_FILE": str(path)}) == "from-file"
    assert env_secret("PW", {}) is None


def test_env_secret_names_an_unreadable_or_empty_file(tmp_path: Path) -> None:
    with pytest.raises(BrokerUrlError, match=r"PW_FILE=.*cannot be read"):
        env_secret("PW", {"PW_FILE": str(tmp_path / "missing")})
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(BrokerUrlError, match="is empty"):
        env_secret("PW", {"PW_FILE": str(tmp_path / "empty")})


def test_from_url_takes_arguments_then_the_url_then_the_environment(tmp_path: Path) -> None:
    path = tmp_path / "pw"
    path.write_text("from-file\n")
    env = {"MQTT_USERNAME": "actor", "MQTT_PASSWORD_FILE": str(path)}
    settings = BrokerSettings.from_url("mqtt://edge", environ=env)
    assert (settings.username, settings.password) == ("actor", "from-file")
    settings = BrokerSettings.from_url("mqtt://u:url@edge", environ=env)
    assert (settings.username, settings.password) == ("u", "url")
    settings = BrokerSettings.from_url("mqtt://u:url@edge", password="arg", environ=env)
    assert settings.password == "arg"
    with pytest.raises(BrokerUrlError, match="keepalive"):
        BrokerSettings.from_url("mqtt://edge", keepalive=0, environ={})


# --- TLS -----------------------------------------------------------------------------


def test_tls_uses_the_system_cas_by_default() -> None:
    settings = BrokerSettings.from_url("mqtts://edge", environ={})
    assert isinstance(settings.ssl_context(), ssl.SSLContext)
    assert parse_broker_url("mqtt://edge").ssl_context() is None


def test_tls_files_for_a_plain_url_are_refused(tmp_path: Path) -> None:
    # Resolved: the SDK switched TLS on for `mqtt://` with a CA file (on port 1883), the
    # bridge refused. A contradiction is a mistake to report: the bridge's behaviour won.
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    with pytest.raises(BrokerUrlError, match="not mqtts://"):
        BrokerSettings.from_url("mqtt://edge", ca_file=str(ca), environ={})


def test_tls_file_mistakes_are_named(tmp_path: Path) -> None:
    secure = parse_broker_url("mqtts://edge")
    with pytest.raises(BrokerUrlError, match=r"CA file .*missing: no such file"):
        secure.with_tls_files(str(tmp_path / "missing"))
    with pytest.raises(BrokerUrlError, match="key file is given without"):
        secure.with_tls_files(None, None, str(tmp_path / "key"))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(BrokerUrlError, match="TLS settings are not usable"):
        secure.with_tls_files(None, str(garbage))


def test_a_given_context_implies_tls() -> None:
    context = ssl.create_default_context()
    settings = BrokerSettings.from_url("mqtt://edge", tls_context=context, environ={})
    assert settings.tls and settings.ssl_context() is context


# --- reconnecting --------------------------------------------------------------------


def test_reconnect_delay_grows_is_capped_and_jittered() -> None:
    rng = random.Random(1)
    delays = [reconnect_delay(n, first=0.5, cap=8, rng=rng) for n in range(10)]
    assert 0.25 <= delays[0] <= 0.5
    assert all(4 <= d <= 8 for d in delays[5:])
    assert len(set(delays[5:])) == 5  # jittered, not lockstep


def test_backoff_counts_attempts_and_resets() -> None:
    backoff = Backoff(initial=1, cap=8)
    delays = [backoff.next() for _ in range(10)]
    assert 0.5 <= delays[0] <= 1
    assert all(4 <= d <= 8 for d in delays[4:])
    backoff.reset()
    assert backoff.next() <= 1


def test_a_backoff_with_quick_attempts_retries_within_a_fifth_of_a_second_first() -> None:
    backoff = Backoff(initial=1, cap=8, quick=3)
    delays = [backoff.next() for _ in range(8)]
    assert all(0.1 <= d <= 0.2 for d in delays[:3])
    assert 0.5 <= delays[3] <= 1 and all(2 <= d <= 8 for d in delays[5:])
    backoff.reset()
    assert backoff.next() <= 0.2


def test_a_refused_protocol_falls_back_to_3_1_1_once() -> None:
    with pytest.raises(BrokerError) as caught, broker_errors():
        raise aiomqtt.MqttCodeError(1, "unacceptable protocol version")
    assert caught.value.refused_protocol
    choice = ProtocolChoice()
    assert choice.name == "5"
    assert choice.fall_back(caught.value) and choice.name == "3.1.1"
    assert not choice.fall_back(caught.value)


def test_other_failures_do_not_change_the_protocol() -> None:
    with pytest.raises(BrokerError) as caught, broker_errors():
        raise aiomqtt.MqttCodeError(5, "not authorized")
    assert not caught.value.refused_protocol
    assert not ProtocolChoice().fall_back(caught.value)


def test_socket_reads_are_buffered_and_pending_counts_the_buffer() -> None:
    # paho reads a packet's header byte by byte; aiomqtt reads on while `pending`.
    import socket  # noqa: PLC0415

    from actor_sdk._mqtt_receive import BufferedReads  # noqa: PLC0415

    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        reads = BufferedReads(ours)
        theirs.sendall(b"\x30\x03abc\x30\x01d")
        assert reads.recv(1) == b"\x30"
        assert reads.pending() == 7  # the rest came in the same read
        assert (reads.recv(1), reads.recv(3), reads.recv(10)) == (b"\x03", b"abc", b"\x30\x01d")
        assert reads.pending() == 0
        with pytest.raises(BlockingIOError):
            reads.recv(1)
        assert reads.fileno() == ours.fileno()
        theirs.close()
        assert reads.recv(1) == b""
