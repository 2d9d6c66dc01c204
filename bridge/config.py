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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from actor_sdk.mqtt import read_secret_file

_T = TypeVar("_T")


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
