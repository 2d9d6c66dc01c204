"""Settings from flags, then the environment, then a TOML file, in that order.

Every subcommand resolves its settings through `SettingsSource`, so that the
precedence and the error messages are the same everywhere. A mistake raises
`ConfigError`, which the CLI turns into one clear line and exit code 2.
Secrets can also come from a file named by `<NAME>_FILE` (read by
`actor_sdk.mqtt.read_secret_file`: trailing line ends dropped, nothing else),
and are never echoed in an error message.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from actor_sdk.mqtt import BrokerSettings, parse_broker_url, read_secret_file

_T = TypeVar("_T")

DEFAULT_STATE_DIR = "/var/lib/dispatch-bridge"
"""Where the bridge keeps its cache, session counter, holds and journal unless told."""


def journal_path(state_dir: Path) -> Path:
    """The audit journal of a state directory (`bridge.journal` writes it).

    Args:
        state_dir: The bridge's state directory.

    Returns:
        `<state_dir>/journal/journal.jsonl`.
    """
    return state_dir / "journal" / "journal.jsonl"


class ConfigError(Exception):
    """A setting is missing or invalid; the message says which and why."""


@dataclass(frozen=True)
class SettingsSource:
    """Where settings come from: parsed flags, the environment, a TOML table."""

    flags: Mapping[str, Any]
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    file_table: Mapping[str, Any] = field(default_factory=dict)
    file_name: str = "the config file"

    @classmethod
    def load(
        cls, flags: Mapping[str, Any], config_path: str | None, table: str | None = None
    ) -> SettingsSource:
        """Build a source, reading the TOML file if one is given.

        Args:
            flags: The parsed command-line flags (None where not given).
            config_path: The TOML file, or None.
            table: The TOML table of this subcommand (e.g. "bridge"); keys
                outside any table are read as well.

        Returns:
            The source.

        Raises:
            ConfigError: The file cannot be read or is not valid TOML.
        """
        file_table: dict[str, Any] = {}
        name = "the config file"
        if config_path is not None:
            name = config_path
            try:
                document = tomllib.loads(Path(config_path).read_text(encoding="utf-8"))
            except OSError as error:
                raise ConfigError(
                    f"cannot read config file {config_path}: {error.strerror}"
                ) from None
            except tomllib.TOMLDecodeError as error:
                raise ConfigError(f"config file {config_path} is not valid TOML: {error}") from None
            file_table = {k: v for k, v in document.items() if not isinstance(v, dict)}
            if table is not None:
                section = document.get(table, {})
                if not isinstance(section, dict):
                    raise ConfigError(f"[{table}] in {config_path} must be a table") from None
                file_table.update(section)
        return cls(flags=flags, file_table=file_table, file_name=name)

    def get(
        self,
        key: str,
        *,
        env: str | None = None,
        parse: Callable[[Any], _T],
        default: _T,
        secret: bool = False,
    ) -> _T:
        """Resolve one setting.

        Args:
            key: The flag's destination name, also the key in the TOML file.
            env: The environment variable, if the setting has one; for a
                secret, `<env>_FILE` names a file holding the value.
            parse: Turns the raw value into the setting; raises ValueError
                with a message on invalid input.
            default: The value when no source sets it.
            secret: Keep the value out of error messages.

        Returns:
            The setting.

        Raises:
            ConfigError: The value is invalid, or its file cannot be read.
        """
        raw, origin = self._raw(key, env)
        if raw is None:
            return default
        try:
            return parse(raw)
        except (ValueError, TypeError) as error:
            # A URL's user:password part is a secret even in a setting that is not.
            shown = "" if secret else " " + re.sub(r"//[^/@\s]*@", "//***@", repr(raw))
            raise ConfigError(
                f"invalid {key.replace('_', '-')}{shown} from {origin}: {error}"
            ) from None

    def _raw(self, key: str, env: str | None) -> tuple[Any, str]:
        flag = self.flags.get(key)
        if flag is not None and flag != []:
            return flag, f"--{key.replace('_', '-')}"
        if env is not None:
            if env in self.environ and self.environ[env] != "":
                return self.environ[env], f"${env}"
            file_env = f"{env}_FILE"
            if self.environ.get(file_env):
                path = self.environ[file_env]
                try:
                    return read_secret_file(path), f"${file_env}"
                except OSError as error:
                    raise ConfigError(
                        f"cannot read ${file_env} file {path}: {error.strerror}"
                    ) from None
        if key in self.file_table:
            return self.file_table[key], f"{key} in {self.file_name}"
        return None, ""


def parse_text(value: Any) -> str:
    """Parse a non-empty string setting, without surrounding whitespace.

    Args:
        value: The raw value.

    Returns:
        The text.

    Raises:
        ValueError: Not a string, or blank.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value.strip()


def _parse_secret(value: Any) -> str:
    # Taken as given (`read_secret_file` already dropped a file's line end): spaces may
    # be part of a password.
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


def load_broker(source: SettingsSource) -> BrokerSettings:
    """Resolve the bridge's broker: URL, then user and password, then TLS files.

    `MQTT_USERNAME` / `MQTT_PASSWORD` (or their `_FILE`, or the TOML keys) win
    over the URL's credentials: they keep the password out of the URL.

    Args:
        source: The settings.

    Returns:
        The broker.

    Raises:
        ConfigError: The broker is missing, or a setting is invalid.
    """
    broker = source.get(
        "broker",
        env="MQTT_URL",
        parse=lambda value: parse_broker_url(parse_text(value)),
        default=None,
        secret=True,
    )
    if broker is None:
        raise ConfigError(
            "no MQTT broker: give --broker mqtt://host:port (or MQTT_URL, or broker in [bridge])"
        )
    username = source.get(
        "mqtt_username", env="MQTT_USERNAME", parse=_parse_secret, default=None, secret=True
    )
    password = source.get(
        "mqtt_password", env="MQTT_PASSWORD", parse=_parse_secret, default=None, secret=True
    )
    tls_files = [
        source.get(
            f"broker_{key}_file", env=f"MQTT_{key.upper()}_FILE", parse=parse_text, default=None
        )
        for key in ("ca", "cert", "key")
    ]
    try:
        broker = broker.with_tls_files(*tls_files)
    except ValueError as error:
        raise ConfigError(f"invalid broker TLS settings: {error}") from None
    broker = replace(
        broker,
        username=username if username is not None else broker.username,
        password=password if password is not None else broker.password,
    )
    if broker.password is not None and broker.username is None:
        raise ConfigError("an MQTT password is set but no user name: set MQTT_USERNAME too")
    return broker
