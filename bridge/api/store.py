"""The SQLite store of the local Dispatch API server.

One table, `dispatches`: one row per dispatch that exists. The `dispatch`
column holds the serialized protobuf `Dispatch` (metadata and data), exactly
what the API returns, so a page of a list is a concatenation of stored bytes.
The columns beside it are copies for filtering, sorting and paging in SQL:
`microgrid_id`, `type`, `is_active`, `is_dry_run`, `is_recurring`, `targets`
(the target as tokens: `,i7,i8,` for component ids, `,c2.0,c5.1,` for
category.type), and the times in microseconds since the epoch. `end_time` is
NULL when the dispatch has no end (no duration, or a recurrence without end).

Ids come from `INTEGER PRIMARY KEY AUTOINCREMENT`, so an id is never reused,
not even after the dispatch with the highest id was deleted. Every change is
one transaction; the database runs in WAL mode with `synchronous=NORMAL`,
which survives a killed process (not necessarily a power cut of the host).

The store validates nothing: the servicer does that before calling it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from frequenz.api.dispatch.v1 import dispatch_pb2 as pb
from google.protobuf.timestamp_pb2 import Timestamp

__all__ = ["DispatchStore", "PageKey", "SqlFilter", "TargetWanted", "to_micros"]

_SCHEMA_VERSION = 1

_SCHEMA = [
    """CREATE TABLE IF NOT EXISTS dispatches (
        id           INTEGER PRIMARY KEY AUTOINCREMENT,
        microgrid_id INTEGER NOT NULL,
        type         TEXT    NOT NULL,
        is_active    INTEGER NOT NULL,
        is_dry_run   INTEGER NOT NULL,
        is_recurring INTEGER NOT NULL,
        targets      TEXT    NOT NULL,
        start_time   INTEGER NOT NULL,
        end_time     INTEGER,
        create_time  INTEGER NOT NULL,
        update_time  INTEGER NOT NULL,
        dispatch     BLOB    NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS dispatches_by_create ON dispatches (microgrid_id, create_time, id)",
    "CREATE INDEX IF NOT EXISTS dispatches_by_start ON dispatches (microgrid_id, start_time, id)",
    "CREATE INDEX IF NOT EXISTS dispatches_by_update ON dispatches (microgrid_id, update_time, id)",
]

_SORT_COLUMNS: dict[int, str] = {
    pb.SORT_FIELD_UNSPECIFIED: "create_time",
    pb.SORT_FIELD_CREATE_TIME: "create_time",
    pb.SORT_FIELD_START_TIME: "start_time",
    pb.SORT_FIELD_LAST_UPDATE_TIME: "update_time",
}


def to_micros(moment: datetime) -> int:
    """Turn an aware datetime into microseconds since the epoch.

    Args:
        moment: The instant.

    Returns:
        Microseconds since 1970-01-01T00:00:00Z.
    """
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _timestamp(micros: int) -> Timestamp:
    stamp = Timestamp()
    stamp.FromMicroseconds(micros)
    return stamp


def _category_subtype(entry: pb.TargetComponents.CategoryAndType) -> int:
    return entry.battery or entry.inverter or entry.ev_charger


def target_tokens(target: pb.TargetComponents) -> str:
    """Encode a target for the `targets` column.

    Args:
        target: The target.

    Returns:
        `,i1,i2,` for component ids, `,c<category>.<type>,...` for categories
        (type 0: any type of that category); `,` for an empty target.
    """
    kind = target.WhichOneof("components")
    if kind == "component_ids":
        tokens = [f"i{i}" for i in target.component_ids.ids]
    elif kind == "component_categories":
        tokens = [f"c{c}.0" for c in target.component_categories.categories]
    elif kind == "component_categories_types":
        tokens = [
            f"c{c.category}.{_category_subtype(c)}"
            for c in target.component_categories_types.categories
        ]
    else:
        tokens = []
    return "," + "".join(f"{token}," for token in tokens)


@dataclass(frozen=True)
class TargetWanted:
    """One target of a list filter: component ids, or (category, type) pairs.

    A dispatch matches when it shares a component id, or targets a wanted
    category with the same type, or either side leaves the type open (0).
    """

    ids: tuple[int, ...] = ()
    categories: tuple[tuple[int, int], ...] = ()

    @classmethod
    def from_protobuf(cls, target: pb.TargetComponents) -> TargetWanted:
        """Read a filter target.

        Args:
            target: The target as the filter gives it.

        Returns:
            The wanted ids or categories.
        """
        kind = target.WhichOneof("components")
        if kind == "component_ids":
            return cls(ids=tuple(target.component_ids.ids))
        if kind == "component_categories":
            return cls(categories=tuple((c, 0) for c in target.component_categories.categories))
        if kind == "component_categories_types":
            return cls(
                categories=tuple(
                    (c.category, _category_subtype(c))
                    for c in target.component_categories_types.categories
                )
            )
        return cls()


@dataclass(frozen=True)
class SqlFilter:
    """A list filter; None or empty means "any".

    Time bounds are microseconds; `*_from` is inclusive, `*_to` exclusive. A
    dispatch without end has an end later than any bound. `queries` and
    `targets` are each OR-combined; the other conditions are AND-combined.
    """

    is_active: bool | None = None
    is_dry_run: bool | None = None
    is_recurring: bool | None = None
    dispatch_ids: Sequence[int] = ()
    start_from: int | None = None
    start_to: int | None = None
    end_from: int | None = None
    end_to: int | None = None
    update_from: int | None = None
    update_to: int | None = None
    queries: Sequence[str] = ()
    targets: Sequence[TargetWanted] = ()


@dataclass(frozen=True)
class PageKey:
    """Where a page starts: after the row with this sort value and id."""

    value: int
    id: int


@dataclass(frozen=True)
class Row:
    """One dispatch as listed: its sort value, id and serialized `Dispatch`."""

    sort_value: int
    id: int
    dispatch: bytes


class DispatchStore:
    """Dispatches of every microgrid in one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        """Open (and create if needed) the database.

        Args:
            path: The database file; `:memory:` for a throw-away store.

        Raises:
            sqlite3.Error: The file cannot be opened or is not a database of
                this schema.
        """
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            with self._transaction():
                version = self._db.execute("PRAGMA user_version").fetchone()[0]
                if version not in (0, _SCHEMA_VERSION):
                    raise sqlite3.DatabaseError(
                        f"{path} has schema version {version}, this server knows {_SCHEMA_VERSION}"
                    )
                for statement in _SCHEMA:
                    self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def create(
        self,
        microgrid_id: int,
        data: pb.DispatchData,
        now: datetime,
        end_time: datetime | None,
    ) -> pb.Dispatch:
        """Store a new dispatch and give it the next id.

        Args:
            microgrid_id: Its microgrid.
            data: The dispatch as validated by the servicer.
            now: The create (and update) time.
            end_time: Its computed end, None if it has none.

        Returns:
            The stored dispatch with its metadata.
        """
        now_us = to_micros(now)
        end_us = None if end_time is None else to_micros(end_time)
        with self._transaction():
            cursor = self._db.execute(
                "INSERT INTO dispatches (microgrid_id, type, is_active, is_dry_run,"
                " is_recurring, targets, start_time, end_time, create_time, update_time,"
                " dispatch) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, x'')",
                (microgrid_id, *_columns(data, end_us), now_us, now_us),
            )
            dispatch_id = cursor.lastrowid
            assert dispatch_id is not None
            dispatch = _dispatch(dispatch_id, now_us, now_us, end_us, data)
            self._db.execute(
                "UPDATE dispatches SET dispatch = ? WHERE id = ?",
                (dispatch.SerializeToString(), dispatch_id),
            )
        return dispatch

    def replace(
        self,
        microgrid_id: int,
        dispatch_id: int,
        data: pb.DispatchData,
        now: datetime,
        end_time: datetime | None,
    ) -> pb.Dispatch | None:
        """Replace the data of an existing dispatch.

        Args:
            microgrid_id: Its microgrid.
            dispatch_id: Its id.
            data: The new data, validated by the servicer.
            now: The update time.
            end_time: Its computed end, None if it has none.

        Returns:
            The stored dispatch, or None if there is no such dispatch.
        """
        now_us = to_micros(now)
        end_us = None if end_time is None else to_micros(end_time)
        with self._transaction():
            row = self._db.execute(
                "SELECT create_time FROM dispatches WHERE microgrid_id = ? AND id = ?",
                (microgrid_id, dispatch_id),
            ).fetchone()
            if row is None:
                return None
            dispatch = _dispatch(dispatch_id, row[0], now_us, end_us, data)
            self._db.execute(
                "UPDATE dispatches SET type = ?, is_active = ?, is_dry_run = ?, is_recurring = ?,"
                " targets = ?, start_time = ?, end_time = ?, update_time = ?, dispatch = ?"
                " WHERE id = ?",
                (*_columns(data, end_us), now_us, dispatch.SerializeToString(), dispatch_id),
            )
        return dispatch

    def get(self, microgrid_id: int, dispatch_id: int) -> pb.Dispatch | None:
        """Read one dispatch.

        Args:
            microgrid_id: Its microgrid.
            dispatch_id: Its id.

        Returns:
            The dispatch, or None if there is no such dispatch in that microgrid.
        """
        row = self._db.execute(
            "SELECT dispatch FROM dispatches WHERE microgrid_id = ? AND id = ?",
            (microgrid_id, dispatch_id),
        ).fetchone()
        return None if row is None else _parse(row[0])

    def delete(self, microgrid_id: int, dispatch_id: int) -> pb.Dispatch | None:
        """Delete one dispatch.

        Args:
            microgrid_id: Its microgrid.
            dispatch_id: Its id.

        Returns:
            The dispatch as it was, or None if there was no such dispatch.
        """
        with self._transaction():
            row = self._db.execute(
                "SELECT dispatch FROM dispatches WHERE microgrid_id = ? AND id = ?",
                (microgrid_id, dispatch_id),
            ).fetchone()
            if row is None:
                return None
            self._db.execute("DELETE FROM dispatches WHERE id = ?", (dispatch_id,))
        return _parse(row[0])

    def query(
        self,
        microgrid_id: int,
        where: SqlFilter,
        *,
        sort_field: int = pb.SORT_FIELD_UNSPECIFIED,
        descending: bool = True,
        after: PageKey | None = None,
        limit: int | None = None,
    ) -> list[Row]:
        """Select dispatches of a microgrid in sort order.

        Args:
            microgrid_id: The microgrid.
            where: The conditions.
            sort_field: A `SortField` value; unspecified sorts by create time.
            descending: Sort order.
            after: Start after this key (keyset pagination).
            limit: At most this many rows.

        Returns:
            The rows, sort value in microseconds.
        """
        column = _SORT_COLUMNS.get(sort_field, "create_time")
        clauses, params = _where(microgrid_id, where)
        if after is not None:
            op = "<" if descending else ">"
            clauses.append(f"({column}, id) {op} (?, ?)")
            params.extend((after.value, after.id))
        order = "DESC" if descending else "ASC"
        sql = (
            f"SELECT {column}, id, dispatch FROM dispatches WHERE {' AND '.join(clauses)}"
            f" ORDER BY {column} {order}, id {order}"
        )
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        return [Row(value, ident, blob) for value, ident, blob in self._db.execute(sql, params)]

    def count(self, microgrid_id: int, where: SqlFilter) -> int:
        """Count the dispatches of a microgrid that meet the conditions.

        Args:
            microgrid_id: The microgrid.
            where: The conditions.

        Returns:
            How many there are.
        """
        clauses, params = _where(microgrid_id, where)
        row = self._db.execute(
            f"SELECT COUNT(*) FROM dispatches WHERE {' AND '.join(clauses)}", params
        ).fetchone()
        return int(row[0])


def _columns(data: pb.DispatchData, end_us: int | None) -> tuple[object, ...]:
    recurring = (
        data.HasField("recurrence")
        and data.recurrence.freq != pb.RecurrenceRule.FREQUENCY_UNSPECIFIED
    )
    return (
        data.type,
        int(data.is_active),
        int(data.is_dry_run),
        int(recurring),
        target_tokens(data.target),
        data.start_time.ToMicroseconds(),
        end_us,
    )


def _where(microgrid_id: int, where: SqlFilter) -> tuple[list[str], list[object]]:
    clauses = ["microgrid_id = ?"]
    params: list[object] = [microgrid_id]
    for column, flag in (
        ("is_active", where.is_active),
        ("is_dry_run", where.is_dry_run),
        ("is_recurring", where.is_recurring),
    ):
        if flag is not None:
            clauses.append(f"{column} = ?")
            params.append(int(flag))
    if where.dispatch_ids:
        clauses.append(f"id IN ({', '.join('?' * len(where.dispatch_ids))})")
        params.extend(where.dispatch_ids)
    for column, low, high in (
        ("start_time", where.start_from, where.start_to),
        ("update_time", where.update_from, where.update_to),
    ):
        if low is not None:
            clauses.append(f"{column} >= ?")
            params.append(low)
        if high is not None:
            clauses.append(f"{column} < ?")
            params.append(high)
    # A dispatch without end (NULL) ends after every bound.
    if where.end_from is not None:
        clauses.append("(end_time IS NULL OR end_time >= ?)")
        params.append(where.end_from)
    if where.end_to is not None:
        clauses.append("(end_time IS NOT NULL AND end_time < ?)")
        params.append(where.end_to)
    _any_of(clauses, params, _query_terms(where.queries))
    _any_of(clauses, params, _target_terms(where.targets))
    return clauses, params


def _any_of(clauses: list[str], params: list[object], terms: list[tuple[str, object]]) -> None:
    if terms:
        clauses.append("(" + " OR ".join(term for term, _ in terms) + ")")
        params.extend(value for _, value in terms)


def _query_terms(queries: Sequence[str]) -> list[tuple[str, object]]:
    """`#N` matches the id N; any other text is a (case-sensitive) substring of the type."""
    terms: list[tuple[str, object]] = []
    for query in queries:
        if query.startswith("#") and query[1:].isdigit():
            terms.append(("id = ?", int(query[1:])))
        else:
            terms.append(("instr(type, ?) > 0", query))
    return terms


def _target_terms(targets: Sequence[TargetWanted]) -> list[tuple[str, object]]:
    terms: list[tuple[str, object]] = []
    for wanted in targets:
        terms += [("instr(targets, ?) > 0", f",i{i},") for i in wanted.ids]
        for category, subtype in wanted.categories:
            if subtype == 0:
                terms.append(("instr(targets, ?) > 0", f",c{category}."))
            else:
                terms.append(("instr(targets, ?) > 0", f",c{category}.{subtype},"))
                terms.append(("instr(targets, ?) > 0", f",c{category}.0,"))
    return terms


def _parse(blob: bytes) -> pb.Dispatch:
    dispatch = pb.Dispatch()
    dispatch.ParseFromString(blob)
    return dispatch


def _dispatch(
    dispatch_id: int, create_us: int, update_us: int, end_us: int | None, data: pb.DispatchData
) -> pb.Dispatch:
    metadata = pb.DispatchMetadata(
        dispatch_id=dispatch_id,
        create_time=_timestamp(create_us),
        update_time=_timestamp(update_us),
        end_time=None if end_us is None else _timestamp(end_us),
    )
    return pb.Dispatch(metadata=metadata, data=data)
