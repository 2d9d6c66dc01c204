"""`dispatch-bridge run`: the bridge, from the Dispatch API to retained MQTT topics.

Settings (flag / environment / key in the `[bridge]` table of `--config`;
flags win over the environment, which wins over the file):

| setting | flag | environment | TOML |
|---|---|---|---|
| microgrids | `--microgrid-id N` (repeatable, or `1,2`) | `MICROGRID_ID` | `microgrid_id` |
| Dispatch API URL | `--dispatch-url URL` | `DISPATCH_API_URL` | `dispatch_url` |
| API key | — | `DISPATCH_API_AUTH_KEY` (or `_FILE`) | `auth_key` |
| signing secret | — | `DISPATCH_API_SIGN_SECRET` (or `_FILE`) | `sign_secret` |
| broker | `--broker URL` | `MQTT_URL` | `broker` |
| broker user | — | `MQTT_USERNAME` (or `_FILE`) | `mqtt_username` |
| broker password | — | `MQTT_PASSWORD` (or `_FILE`) | `mqtt_password` |
| broker CA file | `--broker-ca-file PATH` | `MQTT_CA_FILE` | `broker_ca_file` |
| client certificate (mTLS) | `--broker-cert-file PATH` | `MQTT_CERT_FILE` | `broker_cert_file` |
| its key | `--broker-key-file PATH` | `MQTT_KEY_FILE` | `broker_key_file` |
| state directory | `--state-dir PATH` | `DISPATCH_BRIDGE_STATE_DIR` | `state_dir` |
| topic root | `--topic-root TEMPLATE` | `DISPATCH_BRIDGE_TOPIC_ROOT` | `topic_root` |
| bridge name | `--name NAME` | `DISPATCH_BRIDGE_NAME` | `name` |
| longest retry wait | `--retry-max SECONDS` | `DISPATCH_BRIDGE_RETRY_MAX` | `retry_max` |
| status interval | `--status-interval S` | `DISPATCH_BRIDGE_STATUS_INTERVAL` | `status_interval` |
| max age | `--max-knowledge-age S` | `DISPATCH_BRIDGE_MAX_KNOWLEDGE_AGE` | `max_knowledge_age` |
| upcoming window | `--upcoming-hours H` | `DISPATCH_BRIDGE_UPCOMING_HOURS` | `upcoming_hours` |

Secrets have no flags (a command line is visible to every user of the host),
and never appear in logs or error messages.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from actor_sdk import wire
from actor_sdk.mqtt import Backoff, BrokerSettings
from bridge import __version__, journal, metrics
from bridge.cache_writer import CacheWriter
from bridge.config import DEFAULT_STATE_DIR, ConfigError, SettingsSource, load_broker, parse_text
from bridge.heap import HeapTrim
from bridge.notify import SystemdNotifier, Watchdog
from bridge.publisher import Publisher
from bridge.request_handler import RequestHandler
from bridge.service import MicrogridService, ScheduleCore
from bridge.status import ProblemKey, StatusBoard
from bridge.store import DispatchCache, SessionCounter
from bridge.upcoming import UpcomingTopics
from bridge.upstream import Upstream, UpstreamSettings

__all__ = ["BridgeSettings", "add_arguments", "load_settings", "run"]

_logger = logging.getLogger("bridge")


DEFAULT_STATUS_INTERVAL = 5
"""Seconds between status republishes; at most the MQTT keepalive."""

DEFAULT_MAX_KNOWLEDGE_AGE = 86400.0
"""Seconds after the last confirmation by the API before the bridge stops vouching (24 h):
dispatches are planned day-ahead; a bridge that has not heard from the API for a day cannot
vouch that today's plan still holds, while a shorter default would stop new runs on every
short cloud outage."""


@dataclass(frozen=True)
class BridgeSettings:
    """Everything `dispatch-bridge run` needs, resolved from all sources."""

    microgrid_ids: tuple[int, ...]
    upstream: UpstreamSettings
    broker: BrokerSettings
    state_dir: Path
    topic_root: str
    name: str
    retry_max: float = 30.0
    upcoming_hours: float = 24.0
    status_interval: int = DEFAULT_STATUS_INTERVAL
    max_knowledge_age: float = DEFAULT_MAX_KNOWLEDGE_AGE
    metrics: metrics.MetricsSettings | None = None
    journal: journal.JournalSettings | None = None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `dispatch-bridge run`.

    Args:
        parser: The subcommand's parser.
    """
    parser.add_argument(
        "--microgrid-id",
        dest="microgrid_id",
        metavar="N",
        action="append",
        help="microgrid to serve; repeat the flag or give a comma list to serve several, "
        "each with its own pipeline and broker connection (env MICROGRID_ID)",
    )
    parser.add_argument(
        "--dispatch-url",
        metavar="URL",
        help="Dispatch API, e.g. grpc://dispatch.example.com:443 or "
        "grpc://127.0.0.1:50051?ssl=false (env DISPATCH_API_URL)",
    )
    parser.add_argument(
        "--broker",
        metavar="URL",
        help="MQTT broker, mqtt://host:port or mqtts://host:port (TLS); user and password may "
        "be given as MQTT_USERNAME / MQTT_PASSWORD instead of in the URL (env MQTT_URL)",
    )
    parser.add_argument(
        "--broker-ca-file",
        metavar="PATH",
        help="CA certificates to verify an mqtts:// broker with; default: the system's "
        "(env MQTT_CA_FILE)",
    )
    parser.add_argument(
        "--broker-cert-file",
        metavar="PATH",
        help="client certificate (PEM) for an mqtts:// broker that requires one "
        "(env MQTT_CERT_FILE)",
    )
    parser.add_argument(
        "--broker-key-file",
        metavar="PATH",
        help="the key of --broker-cert-file, if not in that file (env MQTT_KEY_FILE)",
    )
    parser.add_argument(
        "--state-dir",
        metavar="PATH",
        help="directory for the offline cache of dispatches and the session counter "
        f"(env DISPATCH_BRIDGE_STATE_DIR; default {DEFAULT_STATE_DIR})",
    )
    parser.add_argument(
        "--topic-root",
        metavar="TEMPLATE",
        help="topic root, {microgrid_id} is replaced (env DISPATCH_BRIDGE_TOPIC_ROOT; "
        f"default {wire.DEFAULT_TOPIC_ROOT})",
    )
    parser.add_argument(
        "--name",
        metavar="NAME",
        help="this bridge's name in the status topic and its MQTT client id "
        "(env DISPATCH_BRIDGE_NAME; default: the host name)",
    )
    parser.add_argument(
        "--retry-max",
        metavar="SECONDS",
        help="longest wait between reconnect attempts to the Dispatch API and the broker; "
        "waits start at 0.5 s and double, with jitter (env DISPATCH_BRIDGE_RETRY_MAX; "
        "default 30)",
    )
    parser.add_argument(
        "--upcoming-hours",
        metavar="H",
        help="how far ahead each type's upcoming topic lists runs, 0 to publish none "
        "(env DISPATCH_BRIDGE_UPCOMING_HOURS; default 24)",
    )
    parser.add_argument(
        "--status-interval",
        metavar="SECONDS",
        help="republish the status every SECONDS, 1 to the MQTT keepalive (15); readers count "
        "the bridge online only while live statuses keep coming "
        f"(env DISPATCH_BRIDGE_STATUS_INTERVAL; default {DEFAULT_STATUS_INTERVAL})",
    )
    parser.add_argument(
        "--max-knowledge-age",
        metavar="SECONDS",
        help="stop vouching for the retained topics (state syncing) when the dispatches were "
        "last confirmed by the Dispatch API longer ago than this, from the cache or while "
        "disconnected (env DISPATCH_BRIDGE_MAX_KNOWLEDGE_AGE; default 86400 = 24 h)",
    )
    metrics.add_arguments(parser)
    journal.add_arguments(parser)
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file; settings in its [bridge] table"
    )
    parser.epilog = (
        "Secrets come from the environment, files or the config file, never from flags: "
        "DISPATCH_API_AUTH_KEY and DISPATCH_API_SIGN_SECRET for the Dispatch API, "
        "MQTT_USERNAME and MQTT_PASSWORD for the broker; each also as <NAME>_FILE (a file "
        "holding the value), or as auth_key, sign_secret, mqtt_username, mqtt_password in "
        "[bridge]. SIGTERM or SIGINT publishes the offline status and exits 0; a "
        "configuration mistake exits 2."
    )


def _parse_ids(value: Any) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    ids: list[int] = []
    for item in items:
        if isinstance(item, bool):
            raise ValueError("expected a microgrid id")
        for part in str(item).split(","):
            if not part.strip():
                continue
            try:
                number = int(part)
            except ValueError:
                raise ValueError(f"{part.strip()!r} is not a whole number") from None
            if number <= 0:
                raise ValueError(f"microgrid id {number} must be positive")
            if number not in ids:
                ids.append(number)
    if not ids:
        raise ValueError("no microgrid id given")
    return tuple(ids)


def _parse_dispatch_url(value: Any) -> str:
    text = parse_text(value)
    parts = urlsplit(text)
    if parts.scheme != "grpc" or not parts.hostname:
        raise ValueError("expected grpc://host[:port][?ssl=false]")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "credentials do not belong in the URL: use DISPATCH_API_AUTH_KEY "
            "and DISPATCH_API_SIGN_SECRET (or their _FILE variants)"
        )
    try:
        parts.port  # noqa: B018 - urlsplit checks the port only when asked for it
    except ValueError:
        raise ValueError("the port must be a number from 0 to 65535") from None
    return text


def _parse_root(value: Any) -> str:
    text = parse_text(value)
    try:
        wire.TopicLayout.for_microgrid(1, text)
    except (wire.WireError, KeyError, IndexError) as error:
        raise ValueError(str(error) or "invalid template") from None
    return text


def _parse_seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number of seconds")
    seconds = float(value)
    if not 0.1 <= seconds <= 3600:
        raise ValueError("must be between 0.1 and 3600 seconds")
    return seconds


def _parse_hours(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number of hours")
    hours = float(value)
    if not 0 <= hours <= 744:
        raise ValueError("must be between 0 and 744 hours (31 days)")
    return hours


def _parse_status_interval(value: Any) -> int:
    if isinstance(value, bool) or float(value) != int(float(value)):
        raise ValueError("expected a whole number of seconds")
    seconds = int(float(value))
    if not 1 <= seconds <= BrokerSettings.keepalive:
        raise ValueError(
            f"must be between 1 and {BrokerSettings.keepalive} seconds (the MQTT keepalive)"
        )
    return seconds


def _parse_max_age(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a number of seconds")
    seconds = float(value)
    if not 1 <= seconds <= 31 * 86400:
        raise ValueError("must be between 1 second and 31 days (2678400 seconds)")
    return seconds


def load_settings(args: argparse.Namespace) -> BridgeSettings:
    """Resolve the settings from flags, environment and config file.

    Args:
        args: The parsed flags.

    Returns:
        The settings.

    Raises:
        ConfigError: A setting is missing or invalid (one message per mistake).
    """
    source = SettingsSource.load(vars(args), getattr(args, "config", None), table="bridge")
    ids = source.get("microgrid_id", env="MICROGRID_ID", parse=_parse_ids, default=None)
    if ids is None:
        raise ConfigError(
            "no microgrid: give --microgrid-id N (or MICROGRID_ID, or microgrid_id in [bridge])"
        )
    url = source.get(
        "dispatch_url", env="DISPATCH_API_URL", parse=_parse_dispatch_url, default=None
    )
    if url is None:
        raise ConfigError(
            "no Dispatch API: give --dispatch-url URL (or DISPATCH_API_URL, or dispatch_url in "
            "[bridge])"
        )
    key = source.get(
        "auth_key", env="DISPATCH_API_AUTH_KEY", parse=parse_text, default=None, secret=True
    )
    if key is None:
        raise ConfigError(
            "no Dispatch API key: set DISPATCH_API_AUTH_KEY (or DISPATCH_API_AUTH_KEY_FILE, or "
            "auth_key in [bridge])"
        )
    secret = source.get(
        "sign_secret", env="DISPATCH_API_SIGN_SECRET", parse=parse_text, default=None, secret=True
    )
    broker = load_broker(source)
    state_dir = source.get(
        "state_dir", env="DISPATCH_BRIDGE_STATE_DIR", parse=parse_text, default=DEFAULT_STATE_DIR
    )
    root = source.get(
        "topic_root",
        env="DISPATCH_BRIDGE_TOPIC_ROOT",
        parse=_parse_root,
        default=wire.DEFAULT_TOPIC_ROOT,
    )
    if len(ids) > 1 and "{microgrid_id}" not in root:
        raise ConfigError(
            f"--topic-root {root!r} has no {{microgrid_id}} but {len(ids)} microgrids are served: "
            "their topics would collide"
        )
    name = source.get(
        "name", env="DISPATCH_BRIDGE_NAME", parse=parse_text, default=socket.gethostname()
    )
    retry_max = source.get(
        "retry_max", env="DISPATCH_BRIDGE_RETRY_MAX", parse=_parse_seconds, default=30.0
    )
    upcoming_hours = source.get(
        "upcoming_hours", env="DISPATCH_BRIDGE_UPCOMING_HOURS", parse=_parse_hours, default=24.0
    )
    status_interval = source.get(
        "status_interval",
        env="DISPATCH_BRIDGE_STATUS_INTERVAL",
        parse=_parse_status_interval,
        default=DEFAULT_STATUS_INTERVAL,
    )
    max_knowledge_age = source.get(
        "max_knowledge_age",
        env="DISPATCH_BRIDGE_MAX_KNOWLEDGE_AGE",
        parse=_parse_max_age,
        default=DEFAULT_MAX_KNOWLEDGE_AGE,
    )
    return BridgeSettings(
        metrics=metrics.load_settings(source),
        journal=journal.load_settings(source),
        status_interval=status_interval,
        max_knowledge_age=max_knowledge_age,
        upcoming_hours=upcoming_hours,
        retry_max=retry_max,
        microgrid_ids=ids,
        upstream=UpstreamSettings(url, key, secret),
        broker=broker,
        state_dir=Path(state_dir),
        topic_root=root,
        name=name,
    )


class _Pipeline:
    """Upstream, service, cache and publisher of one microgrid."""

    def __init__(self, settings: BridgeSettings, microgrid_id: int) -> None:
        self.microgrid_id = microgrid_id
        layout = wire.TopicLayout.for_microgrid(microgrid_id, settings.topic_root)
        directory = settings.state_dir / f"microgrid-{microgrid_id}"
        core = ScheduleCore(microgrid_id, layout)
        self.publisher = Publisher(
            settings.broker,
            microgrid_id=microgrid_id,
            layout=layout,
            sessions=SessionCounter(directory),
            bridge_name=settings.name,
            # Quick attempts for about 2 s: back within 0.2 s of a restarted broker.
            backoff=Backoff(cap=settings.retry_max, quick=12),
            board=StatusBoard(
                bridge=settings.name,
                status_interval=settings.status_interval,
                max_knowledge_age=timedelta(seconds=settings.max_knowledge_age),
            ),
        )
        self.publisher.queue.read_dispatches_from(core.table)
        cache = DispatchCache(directory, microgrid_id)
        loaded = cache.load()
        synced_at = None
        # The writer is told what each step changed (`service.on_change`), and commits
        # it before the publisher is handed any topic of that step.
        self.cache_writer = CacheWriter(
            cache,
            core.dispatches,
            lambda: self.service.synced_at,
            on_problem=partial(self._problem, "cache"),
        )
        # Only a cache that a whole listing confirmed is the whole truth: one of a first
        # listing cut short holds some pages and no sync time (its stale topics wait).
        vouched = loaded is not None and loaded[1] is not None
        self.service = MicrogridService(core, self.publisher, had_state=vouched)
        if loaded is not None:
            dispatches, synced_at = loaded
            self.service.synced_at = synced_at
            core.load(dispatches, self.service.now())
            _logger.info(
                "microgrid %d: loaded %d dispatches from the cache %s (last synced %s)",
                microgrid_id,
                len(core),
                cache.path,
                "never" if synced_at is None else synced_at.isoformat(),
            )
        self.service.on_change = self.cache_writer.mark
        self.upcoming: UpcomingTopics | None = None
        if settings.upcoming_hours > 0:
            self.upcoming = UpcomingTopics(
                core,
                self.publisher,
                window=timedelta(hours=settings.upcoming_hours),
                flushed=self.publisher.flushed,
            )
            self.service.on_types_changed = self.upcoming.mark
        self.upstream = Upstream(
            settings.upstream,
            microgrid_id,
            self.service.put,
            backoff=Backoff(cap=settings.retry_max),
            on_skipped=self._skipped,
            on_clock=partial(self._problem, "clock"),
        )
        self.requests = RequestHandler(
            layout, directory, self.service, self.publisher, self.upstream
        )
        self.heap = HeapTrim(self.publisher.flushed)
        self._answer_listing = self.service.on_listing  # the request handler's
        self.service.on_listing = self._listed
        self.tasks: list[asyncio.Task[None]] = []

    def _listed(self, error: str | None) -> None:
        if self._answer_listing is not None:
            self._answer_listing(error)
        self.heap.listed(error)

    def _skipped(self, count: int) -> None:
        self.publisher.update_status(lambda board: setattr(board, "skipped", count))

    def _problem(self, key: ProblemKey, text: str | None) -> None:
        if text is None:
            self.publisher.update_status(lambda board: board.resolve(key))
        else:
            self.publisher.update_status(lambda board: board.report(key, text))

    def start(self) -> None:
        self.service.start()
        self.tasks = [
            asyncio.create_task(self.publisher.run(), name=f"publisher-{self.microgrid_id}"),
            asyncio.create_task(self.service.run(), name=f"service-{self.microgrid_id}"),
            asyncio.create_task(self.upstream.run(), name=f"upstream-{self.microgrid_id}"),
            asyncio.create_task(self.cache_writer.run(), name=f"cache-{self.microgrid_id}"),
            asyncio.create_task(self.heap.run(), name=f"heap-{self.microgrid_id}"),
        ]
        if self.upcoming is not None:
            self.tasks.append(
                asyncio.create_task(self.upcoming.run(), name=f"upcoming-{self.microgrid_id}")
            )

    async def stop(self) -> None:
        publisher_task = self.tasks[0]
        for task in self.tasks[1:]:
            task.cancel()
        await asyncio.gather(*self.tasks[1:], return_exceptions=True)
        await self.cache_writer.flush()
        self.publisher.stop()
        try:
            await asyncio.wait_for(publisher_task, 10)
        except TimeoutError:
            _logger.warning(
                "microgrid %d: the broker connection did not close in time", self.microgrid_id
            )
        except Exception as error:
            _logger.warning(
                "microgrid %d: closing the broker connection: %s", self.microgrid_id, error
            )


async def _run(settings: BridgeSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    _logger.info(
        "dispatch-bridge %s %r starting: microgrids %s, Dispatch API %s, broker %s, state dir %s",
        __version__,
        settings.name,
        ", ".join(map(str, settings.microgrid_ids)),
        settings.upstream.url,
        settings.broker.describe(),
        settings.state_dir,
    )
    pipelines = [_Pipeline(settings, microgrid_id) for microgrid_id in settings.microgrid_ids]
    journal_writer = journal.start(settings.state_dir, settings.journal, pipelines)
    exporter = None
    if settings.metrics is not None:
        exporter = await metrics.start(
            settings.metrics,
            [
                metrics.MicrogridParts(
                    p.microgrid_id, p.service, p.publisher, p.upstream, p.cache_writer
                )
                for p in pipelines
            ],
            version=__version__,
            bridge=settings.name,
        )
    systemd = SystemdNotifier.from_environ()
    watchdog = Watchdog(systemd, len(pipelines))
    for index, pipeline in enumerate(pipelines):
        watchdog.watch(pipeline.service, index)
        pipeline.start()
    ready = asyncio.create_task(
        systemd.ready_when(
            [p.publisher.connected for p in pipelines],
            f"publishing microgrids {', '.join(map(str, settings.microgrid_ids))} "
            f"to {settings.broker.describe()}",
        )
    )
    waiter = asyncio.create_task(stop.wait())
    try:
        tasks = [task for p in pipelines for task in p.tasks]
        done, _ = await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
        code = 0
        if waiter not in done:
            for task in done:
                error = task.exception()
                _logger.error(
                    "%s ended unexpectedly (%r): stopping the bridge", task.get_name(), error
                )
            code = 1
        else:
            _logger.info("signal received: publishing offline status and stopping")
        systemd.stopping("publishing offline status and stopping")
        await asyncio.gather(*(p.stop() for p in pipelines), return_exceptions=True)
        _logger.info("dispatch-bridge stopped")
        return code
    finally:
        waiter.cancel()
        ready.cancel()
        if exporter is not None:
            exporter.close()
        if journal_writer is not None:
            journal_writer.close()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)


def run(args: argparse.Namespace) -> int:
    """Run `dispatch-bridge run` until SIGTERM or SIGINT.

    Args:
        args: The parsed flags.

    Returns:
        0 after a clean stop, 1 if a part of the bridge failed.
    """
    settings = load_settings(args)
    _check_state_dir(settings.state_dir)
    return asyncio.run(_run(settings))


def _check_state_dir(state_dir: Path) -> None:
    """Fail early, with exit 2, when the state directory cannot be written."""
    probe = state_dir / ".write-test"
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ConfigError(
            f"state dir {state_dir} is not writable ({error.strerror}): give --state-dir "
            "(or DISPATCH_BRIDGE_STATE_DIR) a directory this user may write"
        ) from None
