"""`dispatch-bridge api`: run the local Dispatch API server until SIGTERM or SIGINT.

Settings (flag / environment / key in the `[api]` table of `--config`):

| setting | flag | environment | TOML |
|---|---|---|---|
| listen address | `--listen HOST:PORT` | `DISPATCH_API_LISTEN` | `listen` |
| database file | `--db PATH` | `DISPATCH_API_DB` | `db` |
| API key | — | `DISPATCH_API_AUTH_KEY` (or `_FILE`) | `auth_key` |
| signing secret | — | `DISPATCH_API_SIGN_SECRET` (or `_FILE`) | `sign_secret` |
| past start times | `--allow-past-start` | `DISPATCH_API_ALLOW_PAST_START` | `allow_past_start` |
| served microgrids | `--microgrid-id N` | `DISPATCH_API_MICROGRID_IDS` | `microgrid_ids` |
| no authentication | `--insecure-no-auth` | — | `insecure_no_auth` |

Secrets have no flags: a command line is visible to every user of the host.
Without an API key the server refuses to start, unless `--insecure-no-auth`
says that this is really meant.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bridge.api.auth import DEFAULT_WINDOW_S, AuthConfig
from bridge.api.server import ServerStartError, parse_listen, serve
from bridge.config import ConfigError, SettingsSource

__all__ = ["ApiSettings", "add_arguments", "load_settings", "run"]

_logger = logging.getLogger("bridge.api")

DEFAULT_LISTEN = "127.0.0.1:50051"


@dataclass(frozen=True)
class ApiSettings:
    """Everything `dispatch-bridge api` needs, resolved from all sources."""

    listen: str
    db: Path
    auth: AuthConfig
    allow_past_start: bool
    microgrids: tuple[int, ...] | None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `dispatch-bridge api`.

    Args:
        parser: The subcommand's parser.
    """
    parser.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help=f"address to listen on, port 0 picks one (env DISPATCH_API_LISTEN; "
        f"default {DEFAULT_LISTEN})",
    )
    parser.add_argument(
        "--db",
        metavar="PATH",
        help="SQLite database file, created if missing (env DISPATCH_API_DB)",
    )
    parser.add_argument(
        "--allow-past-start",
        action="store_true",
        default=None,
        help="accept start times in the past (demos, tests, back-fills)",
    )
    parser.add_argument(
        "--microgrid-id",
        dest="microgrid_ids",
        metavar="N",
        action="append",
        help="serve only these microgrids (repeatable or comma list); default: any",
    )
    parser.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=None,
        help="run without any authentication (only on a trusted loopback)",
    )
    parser.add_argument("--config", metavar="FILE", help="TOML file; settings in its [api] table")
    parser.epilog = (
        "The API key and signing secret come from DISPATCH_API_AUTH_KEY and "
        "DISPATCH_API_SIGN_SECRET (or their _FILE variants), or auth_key / sign_secret "
        "in the config file; never from the command line."
    )


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _parse_ids(value: Any) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    ids: list[int] = []
    for item in items:
        for part in str(item).split(","):
            if part.strip():
                number = int(part)
                if number <= 0:
                    raise ValueError(f"microgrid id {number} must be positive")
                ids.append(number)
    if not ids:
        raise ValueError("no microgrid id given")
    return tuple(ids)


def _parse_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value.strip()


def _parse_listen(value: Any) -> str:
    text = _parse_text(value)
    parse_listen(text)
    return text


def _parse_window(value: Any) -> float:
    window = float(value)
    if not window > 0:
        raise ValueError("must be positive")
    return window


def load_settings(args: argparse.Namespace) -> ApiSettings:
    """Resolve the settings from flags, environment and config file.

    Args:
        args: The parsed flags.

    Returns:
        The settings.

    Raises:
        ConfigError: A setting is missing or invalid.
    """
    source = SettingsSource.load(vars(args), getattr(args, "config", None), table="api")
    listen = source.get("listen", env="DISPATCH_API_LISTEN", parse=_parse_listen, default=None)
    db = source.get("db", env="DISPATCH_API_DB", parse=_parse_text, default=None)
    if db is None:
        raise ConfigError("no database file: give --db PATH (or DISPATCH_API_DB, or db in [api])")
    key = source.get(
        "auth_key", env="DISPATCH_API_AUTH_KEY", parse=_parse_text, default=None, secret=True
    )
    secret = source.get(
        "sign_secret",
        env="DISPATCH_API_SIGN_SECRET",
        parse=_parse_text,
        default=None,
        secret=True,
    )
    window = source.get("auth_window", parse=_parse_window, default=DEFAULT_WINDOW_S)
    insecure = source.get("insecure_no_auth", parse=_parse_bool, default=False)
    if key is None and not insecure:
        raise ConfigError(
            "no API key: set DISPATCH_API_AUTH_KEY (or DISPATCH_API_AUTH_KEY_FILE, or auth_key "
            "in [api]); to run without authentication, pass --insecure-no-auth"
        )
    if key is None and secret is not None:
        raise ConfigError("a signing secret is set but no API key: set DISPATCH_API_AUTH_KEY too")
    allow_past = source.get(
        "allow_past_start", env="DISPATCH_API_ALLOW_PAST_START", parse=_parse_bool, default=False
    )
    microgrids = source.get(
        "microgrid_ids", env="DISPATCH_API_MICROGRID_IDS", parse=_parse_ids, default=None
    )
    return ApiSettings(
        listen=listen or DEFAULT_LISTEN,
        db=Path(db),
        auth=AuthConfig(key=key, sign_secret=secret, window_s=window),
        allow_past_start=allow_past,
        microgrids=microgrids,
    )


async def _serve_until_signal(settings: ApiSettings) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        async with serve(
            settings.listen,
            settings.db,
            settings.auth,
            allow_past_start=settings.allow_past_start,
            microgrids=settings.microgrids,
        ):
            await stop.wait()
            _logger.info("Dispatch API server stopping (signal received)")
    except ServerStartError as error:
        _logger.error("%s", error)
        return 1
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run `dispatch-bridge api`.

    Args:
        args: The parsed flags.

    Returns:
        0 after a clean stop, 1 if the server could not start.
    """
    settings = load_settings(args)
    if settings.auth.key is None:
        _logger.warning(
            "running WITHOUT authentication (--insecure-no-auth): anyone can change dispatches"
        )
    return asyncio.run(_serve_until_signal(settings))
