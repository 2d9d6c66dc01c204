"""Silence one known, harmless warning that a dependency logs when it is imported.

frequenz-client-common defines two id types with the prefix "CID", and
frequenz-core logs "Prefix 'CID' is already registered" at import: on every start of
every actor host and every `dispatch-bridge` command, with nothing anyone can act on.
Imported first by the package, before anything imports frequenz-client-common, so
only this one message of that one logger is dropped.
"""

from __future__ import annotations

import logging


def _not_the_known_cid_warning(record: logging.LogRecord) -> bool:
    return "'CID' is already registered" not in record.getMessage()


logging.getLogger("frequenz.core.id").addFilter(_not_the_known_cid_warning)
