"""Bandwidth limits and transfer budgets: what each client may read into the relay.

Every byte read from a client is charged, after the read, to token buckets (per connection,
per public key, per IP prefix, for the whole relay: ``[bandwidth]``) and to transfer counts
(per key and prefix per UTC day and month, the relay per month: ``[budgets]``). A bucket in
debt pauses the connection's reading (back-pressure, as a full output queue does) until it
has refilled: nothing is dropped and no tunnel is closed; reads are kept small while a rate
applies, so the pauses stay short and the rate even. Past a budget a client is slowed to
``floor_rate`` (a bucket of its own) or, with ``action = "refuse"``, its new tunnels are
refused (``Policy.opened``).

It decides and counts; it does no IO on connections: a pause or resume it decides is a
``Pause`` / ``Resume`` action (relay/actions.py) queued for the relay to apply.

With every setting at 0 the server's read path pays one attribute test per read and nothing
else. Before the handshake a connection's bytes count against its connection, its prefix and
the relay; its key's buckets and counts apply from the handshake on.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..config import Bandwidth as BandwidthConfig
from ..config import Budgets as BudgetsConfig
from ..config import Config
from ..files import b64url_encode
from .actions import PAUSED_BY_RATE, Action, Pause, Resume
from .clients import Client
from .meters import SLACK, Bucket, Meter, auto_burst
from .metrics import Stats
from .usage import Entry, Usage, UsageFileError, period_of, read_usage_file, write_usage_file

log = logging.getLogger("strelay")

# While a rate applies, one read takes at most about 1/32 s of the lowest rate (and at least
# this), so a pause lasts tens of milliseconds, not a whole read's worth of seconds.
MIN_READ = 16 * 1024
READ_FRACTION = 32
# Without a rate, a connection's bytes are added to its budgets once this many are pending.
BUDGET_BATCH = 64 * 1024
STATE_FILE_NAME = "usage.json"


def source_key(client: Client) -> str:
    """The IP prefix a connection counts under (limits.ipv4_prefix / ipv6_prefix)."""
    return client.source


class BandwidthControl:
    """The ``[bandwidth]`` and ``[budgets]`` of one server."""

    def __init__(
        self,
        config: Config,
        clients: Mapping[int, Client],
        actions: deque[Action],
        stats: Stats,
        now: float,
        wallclock: Callable[[], float] = time.time,
    ) -> None:
        self.clients = clients  # the relay's table, read only
        self.actions = actions  # where its pauses and resumes go
        self.stats = stats
        # UTC days and months come from the wall clock; every deadline from the ``now``
        # the relay passes in.
        self.wallclock = wallclock
        self.enabled = False  # read by the server on every read: False costs nothing more
        self.generation = 0
        self.rates = BandwidthConfig()
        self.budgets = BudgetsConfig()
        self.usage: Usage | None = None
        self.state_path: Path | None = None
        self._dirty = False
        self._write_failed = False
        self._clock_behind = False  # the wall clock reads a day before the current period
        self._next_save = 0.0
        self._total: Bucket | None = None
        self._total_floor: Bucket | None = None
        self._keys: dict[bytes, Bucket] = {}
        self._prefixes: dict[str, Bucket] = {}
        self._floors: dict[tuple[str, str], Bucket] = {}
        self._timers: list[tuple[float, int, int]] = []
        self._throttled_shown: dict[str, float] = {}
        self._seq = itertools.count()
        self.apply_config(config, now)

    # ---- settings ----------------------------------------------------------------------

    @property
    def budgets_on(self) -> bool:
        b = self.budgets
        return bool(
            b.key_daily or b.key_monthly or b.prefix_daily or b.prefix_monthly or b.total_monthly
        )

    @property
    def _floor_on(self) -> bool:
        """Whether a spent budget slows its connections to a floor bucket."""
        b = self.budgets
        return self.budgets_on and b.action == "throttle" and bool(b.floor_rate)

    def apply_config(self, config: Config, now: float) -> None:
        """Take new settings (at start and on reload); they apply to every connection at once."""
        rates, budgets = config.bandwidth, config.budgets
        was_on = self.budgets_on
        old_path = self.state_path
        self.rates, self.budgets = rates, budgets
        if self.budgets_on:
            self.state_path = self._state_path(budgets)
            if not was_on:
                self._start_counting(now)
            elif self.state_path != old_path:
                self._dirty = True
                self._next_save = now
                if self.state_path is None:
                    log.info("budgets: no state file now; counts start at 0 on the next start")
            self._set_budgets()
        elif was_on:
            self.save(now)
            self.usage = None
            self.state_path = None
            self._floors.clear()
            self._total_floor = None
        self.enabled = self.budgets_on or bool(
            rates.connection_rate or rates.key_rate or rates.prefix_rate or rates.total_rate
        )
        self._set_rates(now)
        self.generation += 1
        # Paused connections are looked at again now: a rate raised or lifted frees them.
        rates_on = bool(rates.connection_rate or rates.key_rate or rates.prefix_rate)
        rates_on = rates_on or bool(rates.total_rate)
        # A budget already spent gets its floor bucket at the next read, as a rate does.
        rates_on = rates_on or self._floor_on
        for client in self.clients.values():
            if rates_on and client.recv_size > MIN_READ:
                client.recv_size = MIN_READ  # the next read is charged to a rate: a small one
            meter = client.meter
            if meter is None:
                continue
            if not self.enabled:
                client.meter = None
                self._detach(meter)
                if client.paused & PAUSED_BY_RATE:
                    self._resume(client, meter, now)
            elif meter.paused_since is not None:
                meter.resume_at = now
                heapq.heappush(self._timers, (now, next(self._seq), client.id))
        if not self.enabled:
            self._timers.clear()

    def _state_path(self, budgets: BudgetsConfig) -> Path | None:
        if budgets.state_file:
            return Path(budgets.state_file)
        directory = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
        return Path(directory) / STATE_FILE_NAME if directory else None

    def _set_rates(self, now: float) -> None:
        r = self.rates
        if r.total_rate:
            burst = auto_burst(r.total_rate, r.total_burst)
            if self._total is None:
                self._total = Bucket("total", float(r.total_rate), burst, now)
            else:
                self._total.set(float(r.total_rate), burst)
        else:
            self._total = None
        for table, rate, burst in (
            (self._keys, r.key_rate, r.key_burst),
            (self._prefixes, r.prefix_rate, r.prefix_burst),
        ):
            if not rate:
                table.clear()
            for bucket in table.values():
                bucket.set(float(rate), auto_burst(rate, burst))
        floor = self.budgets.floor_rate
        for bucket in self._floors.values():
            bucket.set(float(floor), auto_burst(floor, 0))
        if self._total_floor is not None:
            self._total_floor.set(float(floor), auto_burst(floor, 0))

    def _set_budgets(self) -> None:
        usage = self.usage
        assert usage is not None
        b = self.budgets
        usage.key_scope.set_limits(b.key_daily, b.key_monthly)
        usage.prefix_scope.set_limits(b.prefix_daily, b.prefix_monthly)
        usage.total_scope.set_limits(0, b.total_monthly)
        for entry in usage.refresh_over():
            self._log_over(entry)
        if not (b.action == "throttle" and b.floor_rate):
            self._floors.clear()
            self._total_floor = None

    # ---- the state file ----------------------------------------------------------------

    def _start_counting(self, now: float) -> None:
        wall = self.wallclock()
        self.usage = Usage(wall)
        self._dirty = False
        self._next_save = now + self.budgets.save_interval
        path = self.state_path
        if path is None:
            log.info(
                "budgets: no state file (budgets.state_file unset and no STATE_DIRECTORY): "
                "transfer counts start at 0 on every start"
            )
            return
        try:
            document = read_usage_file(path)
        except FileNotFoundError:
            log.info("budgets: no state file at %s yet; counting from 0", path)
            return
        except (OSError, UsageFileError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log.warning(
                "budgets: state file %s unusable (%s): counting from 0; it is replaced at the "
                "next save",
                path,
                reason,
            )
            return
        self.usage.take(document, wall)
        log.info(
            "budgets: counts read from %s (%d keys, %d prefixes, %d bytes this month)",
            path,
            len(self.usage.keys),
            len(self.usage.prefixes),
            self.usage.total.month,
        )

    def save(self, now: float) -> None:
        """Write the state file now, if there is one and anything changed."""
        if self.usage is None or self.state_path is None:
            return
        self._flush(now)
        if not self._dirty:
            return
        self._next_save = now + self.budgets.save_interval
        try:
            write_usage_file(self.state_path, self.usage.document(self.wallclock()))
        except OSError as exc:
            # Said once, not at every save_interval while it lasts.
            if not self._write_failed:
                log.error(
                    "budgets: cannot write %s: %s (counting goes on; tried again every %g s)",
                    self.state_path,
                    exc.strerror or exc,
                    self.budgets.save_interval,
                )
            self._write_failed = True
            return
        if self._write_failed:
            log.info("budgets: %s written again", self.state_path)
            self._write_failed = False
        self._dirty = False

    def tick(self, now: float) -> None:
        """Every few seconds: a new UTC day or month, and the periodic save."""
        usage = self.usage
        if usage is None:
            return
        wall = self.wallclock()
        if usage.behind(wall):
            if not self._clock_behind:
                log.warning(
                    "budgets: the clock reads %s, before the current period's day %s (stepped "
                    "back?): counting goes on in %s until the clock passes it",
                    period_of(wall)[0],
                    usage.day,
                    usage.day,
                )
                self._clock_behind = True
        elif self._clock_behind:
            self._clock_behind = False
        if period_of(wall)[0] > usage.day:
            self._flush(now)  # the bytes read so far belong to the period that ends
        if usage.roll(wall):
            log.info("budgets: a new period, %s: daily counts start again", usage.day)
            self._dirty = True
            self._floors.clear()
            self._total_floor = None
            self.generation += 1
            self._wake_paused(now)
        if now >= self._next_save:
            # Even with nothing settled since the last save: the bytes each connection holds
            # below its batch are settled by the save (a quiet tunnel's last ones included).
            self._next_save = now + self.budgets.save_interval
            self.save(now)

    def stop(self, now: float) -> None:
        """The relay stops (or hands over): save the counts."""
        self.save(now)

    def usage_document(self, now: float) -> dict[str, Any] | None:
        """The counts, for the hand-over to the next process."""
        if self.usage is None:
            return None
        self._flush(now)
        return self.usage.document(self.wallclock())

    def take_usage(self, document: object) -> None:
        """The counts handed over by the previous process (newer than the state file)."""
        if self.usage is None or document is None:
            return
        try:
            self.usage.take(document, self.wallclock())
        except UsageFileError as exc:
            log.warning("budgets: handed-over counts unusable (%s); keeping the state file's", exc)
            return
        self.generation += 1

    # ---- metrics -----------------------------------------------------------------------

    def gauges(self) -> dict[str, Any]:
        usage = self.usage
        if usage is None:
            return {"budget_used": {"total_month": 0, "total_day": 0}, "budget_over": {}}
        return {
            "budget_used": {"total_month": usage.total.month, "total_day": usage.total.day},
            "budget_over": usage.over_counts(),
        }

    def throttled_seconds(self, now: float) -> dict[str, float]:
        """Seconds spent paused, by kind, for a scrape: the pauses that ended (counted in
        ``Stats`` when they end) and those still running, so that a long pause shows while
        it lasts. Never less than at the scrape before (a pause ending a moment earlier in
        the loop than a scrape looked at it must not take the counter back)."""
        seconds = dict(self.stats.throttled_seconds)
        for client in self.clients.values():
            meter = client.meter
            if meter is not None and meter.paused_since is not None and now > meter.paused_since:
                seconds[meter.kind] = seconds.get(meter.kind, 0.0) + now - meter.paused_since
        shown = self._throttled_shown
        for kind, value in seconds.items():
            if value < shown.get(kind, 0.0):
                seconds[kind] = shown[kind]
        self._throttled_shown = seconds
        return seconds

    # ---- the read path -----------------------------------------------------------------

    def opened(self, client: Client) -> tuple[str, int] | None:
        """``client`` finished its handshake: its key counts from now on. If its new tunnels
        are to be refused (``action = "refuse"``), returns who is over and that budget."""
        meter = client.meter
        if meter is not None:
            meter.generation = -1  # attach the key's bucket and counts at the next read
        usage = self.usage
        if usage is None or self.budgets.action != "refuse":
            return None
        key = client.wire.peer_public_key
        candidates = [usage.total, usage.prefixes.get(source_key(client))]
        if key is not None:
            candidates.append(usage.keys.get(b64url_encode(key)))
        for entry in candidates:
            if entry is not None and entry.over:
                return self._spent(entry)
        return None

    def _spent(self, entry: Entry) -> tuple[str, int]:
        """Who is over, and the budget (in bytes) it has spent."""
        scope = entry.scope
        who = "the relay" if scope.name == "total" else f"{scope.name} {entry.name}"
        if entry.month >= scope.month_limit:
            return f"{who}, monthly budget", int(scope.month_limit)
        return f"{who}, daily budget", int(scope.day_limit)

    def charge(self, client: Client, size: int, now: float) -> None:
        """``size`` bytes were read from ``client``: count them, pause it if in debt.

        Small reads are added up on the connection and settled once they reach its batch
        (the size of one paced read, or ``BUDGET_BATCH``): a chatty connection of small
        messages costs one addition a read. The rate over time is unchanged; a bucket or a
        budget only learns of the bytes up to one batch late."""
        meter = client.meter
        if meter is None or meter.generation != self.generation:
            meter = self._attach(client, now)
        pending = meter.pending + size
        if pending < meter.batch:
            meter.pending = pending
            return
        meter.pending = 0
        self._settle(client, meter, pending, now)

    def _settle(
        self, client: Client, meter: Meter, size: int, now: float, pause: bool = True
    ) -> None:
        """Charge ``size`` bytes to the counts and buckets of ``meter``."""
        if meter.usage:
            self._dirty = True
            for entry in meter.usage:
                entry.day += size
                entry.month += size
                if not entry.over and entry.is_over():
                    self._went_over(entry)
        buckets = meter.buckets
        if not buckets:
            return
        wait = 0.0
        kind = ""
        for bucket in buckets:
            tokens = bucket.tokens + (now - bucket.last) * bucket.rate
            if tokens > bucket.burst:
                tokens = bucket.burst
            tokens -= size
            bucket.tokens = tokens
            bucket.last = now
            if tokens < -SLACK:
                need = -tokens / bucket.rate
                if need > wait:
                    wait, kind = need, bucket.kind
        if client.recv_size > meter.max_read:
            client.recv_size = meter.max_read
        if wait and pause:
            if meter.paused_since is None:
                meter.paused_since = now
                meter.kind = kind
                self.actions.append(Pause(client.id, PAUSED_BY_RATE))
            meter.resume_at = now + wait
            heapq.heappush(self._timers, (meter.resume_at, next(self._seq), client.id))

    def _flush(self, now: float) -> None:
        """Settle every connection's batch (before the counts are saved or a period ends);
        a connection in debt is paused at its next read."""
        for client in self.clients.values():
            meter = client.meter
            if meter is not None and meter.pending:
                pending, meter.pending = meter.pending, 0
                self._settle(client, meter, pending, now, pause=False)

    def closed(self, client: Client, now: float) -> None:
        """``client`` is gone: count what it read last, let go of its shared buckets."""
        meter = client.meter
        if meter is not None:
            if meter.pending:
                self._settle(client, meter, meter.pending, now, pause=False)
            client.meter = None
            self._detach(meter)
            if meter.paused_since is not None:
                self.stats.throttled_seconds[meter.kind] += now - meter.paused_since

    def adopt(self, client: Client, now: float) -> None:
        """A connection handed over while paused by a rate: look at it again now."""
        if client.paused & PAUSED_BY_RATE:
            meter = client.meter = Meter()
            meter.paused_since, meter.kind, meter.resume_at = now, "connection", now
            heapq.heappush(self._timers, (now, next(self._seq), client.id))

    # ---- timers ------------------------------------------------------------------------

    def next_deadline(self) -> float:
        return self._timers[0][0] if self._timers else float("inf")

    def handle_timer(self, now: float) -> None:
        """Resume the connections whose buckets have refilled."""
        timers = self._timers
        clients = self.clients
        while timers and timers[0][0] <= now:
            when, _, cid = heapq.heappop(timers)
            client = clients.get(cid)
            if client is None:
                continue
            meter = client.meter
            if meter is None or meter.paused_since is None or meter.resume_at != when:
                continue
            if meter.generation != self.generation:
                meter = self._attach(client, now)
            # A shared bucket may have been drawn on since: wait for it, do not add to it.
            wait = max((bucket.wait(now) for bucket in meter.buckets), default=0.0)
            if wait:
                meter.resume_at = now + wait
                heapq.heappush(timers, (meter.resume_at, next(self._seq), cid))
            else:
                self._resume(client, meter, now)

    def _resume(self, client: Client, meter: Meter, now: float) -> None:
        if meter.paused_since is not None:
            self.stats.throttled_seconds[meter.kind] += now - meter.paused_since
            meter.paused_since = None
        self.actions.append(Resume(client.id, PAUSED_BY_RATE))

    def _wake_paused(self, now: float) -> None:
        for client in self.clients.values():
            meter = client.meter
            if meter is not None and meter.paused_since is not None:
                meter.resume_at = now
                heapq.heappush(self._timers, (now, next(self._seq), client.id))

    # ---- attaching a connection to its buckets and counts ------------------------------

    def _shared(
        self,
        table: dict[Any, Bucket],
        name: object,
        kind: str,
        rate: int,
        burst: int,
        now: float,
    ) -> Bucket:
        bucket = table.get(name)
        if bucket is None:
            bucket = table[name] = Bucket(kind, float(rate), auto_burst(rate, burst), now)
            bucket.table, bucket.name = table, name
        return bucket

    def _detach(self, meter: Meter) -> None:
        for bucket in meter.shared:
            bucket.users -= 1
            if bucket.users <= 0 and bucket.table is not None:
                if bucket.table.get(bucket.name) is bucket:
                    del bucket.table[bucket.name]
        meter.shared = []

    def _attach(self, client: Client, now: float) -> Meter:
        old = client.meter
        meter = Meter()
        connection = None
        if old is not None:
            meter.paused_since, meter.kind, meter.resume_at = (
                old.paused_since,
                old.kind,
                old.resume_at,
            )
            connection = next((b for b in old.buckets if b.kind == "connection"), None)
            meter.pending = old.pending
            self._detach(old)
        meter.generation = self.generation
        client.meter = meter
        r = self.rates
        buckets: list[Bucket] = []
        shared: list[Bucket] = []
        key = client.wire.peer_public_key
        prefix = source_key(client)
        if r.connection_rate:
            burst = auto_burst(r.connection_rate, r.connection_burst)
            if connection is None:
                connection = Bucket("connection", float(r.connection_rate), burst, now)
            else:
                connection.set(float(r.connection_rate), burst)
            buckets.append(connection)
        if r.key_rate and key is not None:
            shared.append(self._shared(self._keys, key, "key", r.key_rate, r.key_burst, now))
        if r.prefix_rate:
            shared.append(
                self._shared(self._prefixes, prefix, "prefix", r.prefix_rate, r.prefix_burst, now)
            )
        if self._total is not None:
            buckets.append(self._total)
        usage = self.usage
        if usage is not None:
            entries = [usage.total]
            entry, pruned = usage.entry(usage.prefixes, usage.prefix_scope, prefix)
            entries.append(entry)
            if key is not None:
                key_entry, pruned_keys = usage.entry(
                    usage.keys, usage.key_scope, b64url_encode(key)
                )
                entries.append(key_entry)
                pruned = pruned or pruned_keys
            if pruned:
                self.generation += 1
                meter.generation = self.generation
            meter.usage = tuple(entries)
            b = self.budgets
            if b.action == "throttle" and b.floor_rate:
                for entry in entries:
                    if not entry.over:
                        continue
                    if entry is usage.total:
                        if self._total_floor is None:
                            self._total_floor = Bucket(
                                "budget", float(b.floor_rate), auto_burst(b.floor_rate, 0), now
                            )
                        buckets.append(self._total_floor)
                    else:
                        shared.append(
                            self._shared(
                                self._floors,
                                (entry.scope.name, entry.name),
                                "budget",
                                b.floor_rate,
                                0,
                                now,
                            )
                        )
        for bucket in shared:
            bucket.users += 1
        meter.shared = shared
        meter.buckets = tuple(buckets + shared)
        if meter.buckets:
            lowest = min(bucket.rate for bucket in meter.buckets)
            meter.max_read = max(MIN_READ, int(lowest) // READ_FRACTION)
            meter.batch = meter.max_read
        elif meter.usage:
            meter.batch = BUDGET_BATCH
        return meter

    # ---- budgets -----------------------------------------------------------------------

    def _went_over(self, entry: Entry) -> None:
        entry.over = True
        self._log_over(entry)
        if self._floor_on:
            self.generation += 1  # its connections get the floor bucket at their next read
            # Their next read is charged to the floor: keep it small, not a bulk read (whose
            # debt would pause them for that read's worth of seconds at the floor rate).
            for other in self.clients.values():
                meter = other.meter
                if other.recv_size > MIN_READ and meter is not None and entry in meter.usage:
                    other.recv_size = MIN_READ

    def _log_over(self, entry: Entry) -> None:
        b = self.budgets
        if b.action == "refuse":
            outcome = "new tunnels refused"
        elif b.floor_rate:
            outcome = f"slowed to {b.floor_rate} B/s"
        else:
            outcome = "counted only (floor_rate = 0)"
        who, budget = self._spent(entry)
        log.warning("budgets: %s of %d bytes spent: %s", who, budget, outcome)
