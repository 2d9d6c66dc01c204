"""The pure schedule: given dispatches and an instant, what runs and when that changes.

Everything that decides whether a dispatch runs lives in this package. It
never reads the clock and never does I/O: the caller passes `now` in and acts
on the answer (the way h11 keeps HTTP free of sockets).

Its rooms, each importing only the ones above it:

* `instants`: instants as whole seconds, numbered frequencies and weekdays,
  cached calendar facts (month lengths, days passing a filter).
* `month_rules`: what compiled rules share (remembered windows and chains),
  and MONTHLY/YEARLY rules without lists, by month arithmetic.
* `list_rules`: `_Rule`, any rule with `by...` lists, by walking months.
* `compiler`: which of these answers a recurrence (closed form for plain
  MINUTELY..WEEKLY rules), validation, and the caches of compiled rules.
* `queries`: `run_state`, `running_at`, `end_time`, `validate`: the names
  re-exported here, the only ones callers use.

The results equal `frequenz-client-dispatch`'s `Dispatch.started_at(now)`,
`Dispatch._until(now)` and `Dispatch.next_run_after(now)` for every valid
dispatch, quirks included:

* `next_run` ignores `active`: an inactive dispatch still has a `next_run`.
* `duration: None` runs from `start_time` on for ever and ignores the
  recurrence; its `next_run` is `start_time` until that instant, then `None`.
* `duration: 0` (or less) never runs.
* Frequency `UNSPECIFIED` makes a dispatch a one-off, whatever else its
  recurrence says.
* Occurrences follow `dateutil.rrule` with the rule's `dtstart` = `start_time`
  truncated to the second: `by...` lists expand or limit, MONTHLY and YEARLY
  rules without `by...` lists skip months lacking the start's day (a monthly
  rule started on January 31 has no February occurrence), `count` counts
  occurrences, `until` is inclusive, weeks start on Monday, times are UTC and
  the seconds of every occurrence are the start's seconds. A dispatch never
  runs before its own `start_time`, even when the first occurrence is the same
  second truncated.
* A run is the latest occurrence `o <= now` with `now < o + duration`;
  back-to-back or overlapping runs therefore merge.

Invalid recurrence rules, where the reference raises or walks to the year
9999: interval below 1, a weekday `UNSPECIFIED` (or any unknown name), a
`by...` value out of range (minutes 0-59, hours 0-23, month days 1-31 or
-31..-1, months 1-12), an HOURLY rule whose `byhours` the interval can never
reach, or a MINUTELY rule whose `byhours`/`byminutes` it can never reach. Such
a dispatch never runs: `run_state` gives `running=False`, `next_run=None`,
`changes_at=None` (with `duration: None` the recurrence is ignored, as by the
reference). `run_state` and `running_at` never raise for them, so one bad
dispatch cannot stop a whole set; `validate` raises `InvalidRecurrence` with
the reason, for callers that want to refuse or log such rules.

Cost: one-offs and rules without `by...` lists of MINUTELY to WEEKLY use
closed-form arithmetic on whole seconds, with nothing cached; MONTHLY and
YEARLY rules without lists use month arithmetic; rules with lists walk
calendar months near `now` (never the occurrences since the start). Both
kinds are compiled once per (rule, start) into small objects held in bounded
LRU caches, which remember the last answer's window (consecutive calls
usually cost nothing); month shapes, slot lists and filter sets are shared by
rules of the same shape. A `count` end is turned once into the instant of the
last occurrence, counting whole months where all days are alike. A day that
never exists (February 30) is recognised at once and never occurs (`validate`
does not flag it: the rule is well-formed, just empty).

`changes_at` is exact, except for rules with month or month-day filters (or
MONTHLY and YEARLY rules whose gaps vary) whose runs chain back to back over
more than `CHAIN_LIMIT` days (e.g. an endless DAILY rule limited to some
months, with a duration of a day or more): there it is the end of the last
run examined, an instant at least `CHAIN_LIMIT - 1` days ahead at which the
state does not change yet and from which the caller recomputes. Not
thread-safe beyond what the GIL gives: the remembered windows are replaced
whole, so a race only costs a recomputation.
"""

from bridge.schedule.instants import CHAIN_LIMIT
from bridge.schedule.queries import (
    InvalidRecurrence,
    RunState,
    end_time,
    run_state,
    running_at,
    validate,
)

__all__ = [
    "CHAIN_LIMIT",
    "InvalidRecurrence",
    "RunState",
    "end_time",
    "run_state",
    "running_at",
    "validate",
]
