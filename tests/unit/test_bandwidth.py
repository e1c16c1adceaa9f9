"""Bandwidth limits and transfer budgets (relay/bandwidth.py, relay/usage.py) on an
in-process relay under a clock the test moves: rates, who shares a bucket, budgets and their
actions, UTC periods, the state file."""

from __future__ import annotations

import calendar
import json
import logging
import os
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from offset_appliance.config import Budgets, dump_config, load_config
from offset_appliance.errors import ConfigError
from offset_appliance.files import b64url_encode
from offset_appliance.relay.bandwidth import BUDGET_BATCH, MIN_READ
from offset_appliance.relay.clients import PAUSED_BY_RATE
from offset_appliance.relay.usage import (
    MAX_ENTRIES,
    Usage,
    UsageFileError,
    read_usage_file,
    write_usage_file,
)
from offset_appliance.wire.messages import (
    Accept,
    Connect,
    IncomingConnection,
    encode_init_connection,
)

from .server_rig import Node, Rig, config

# Random: Cap'n Proto packing would shrink zeros on the wire to almost nothing.
CHUNK = os.urandom(8192)
# Packing, framing and the tag: payload bytes are about 4% fewer than the bytes read.
OVERHEAD = 0.95


def utc(text: str) -> float:
    """Seconds since the epoch of a UTC time like ``2026-11-30T23:59:59``."""
    import time

    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%S")))


def payload(node: Node) -> int:
    return sum(len(message) for message in node.inbox)


def tunnel(rig: Rig, connector_identity=None) -> tuple[Node, Node, Node]:
    """Listen, connect, accept, with the connector's identity given."""
    listener = rig.listener()
    connector = rig.node(connector_identity)
    connector.send(encode_init_connection(Connect(listener.public_key)))
    rig.settle()
    assert listener.inbox.pop() == IncomingConnection(connector.public_key).encode()
    acceptor = rig.node(listener.identity)
    acceptor.send(encode_init_connection(Accept(connector.public_key)))
    rig.settle()
    return listener, connector, acceptor


def flood(node: Node, count: int = 200) -> None:
    for _ in range(count):
        node.send(CHUNK)


def run_for(rig: Rig, seconds: int) -> None:
    """Move the relay's clock in tenths of a second (less than any burst takes to refill),
    letting it serve what is due."""
    for _ in range(seconds * 10):
        rig.clock.advance(0.1)
        rig.settle()


# ---- rates ---------------------------------------------------------------------------------


def test_everything_off_by_default_keeps_the_read_path_untouched(rigs):
    rig = rigs()
    assert not rig.server.policy.bandwidth.enabled
    _, connector, acceptor = rig.tunnel()
    flood(connector, 50)
    rig.settle()
    assert payload(acceptor) == 50 * len(CHUNK)
    assert all(client.meter is None for client in rig.server.clients.values())
    assert rig.server.stats.throttled_seconds == dict.fromkeys(
        rig.server.stats.throttled_seconds, 0.0
    )


def test_a_connection_rate_paces_reads_and_drops_nothing(rigs):
    rate = 100_000
    rig = rigs(bandwidth={"connection_rate": rate})
    _, connector, acceptor = tunnel(rig)
    flood(connector)  # 1.6 MB, far more than the burst
    rig.settle()
    burst = payload(acceptor)
    # The burst (one second's worth here) and at most one read beyond it.
    assert rate * OVERHEAD <= burst <= rate + MIN_READ
    assert rig.client_of(connector).paused & PAUSED_BY_RATE
    run_for(rig, 5)
    paced = payload(acceptor) - burst
    assert 5 * rate * OVERHEAD - MIN_READ <= paced <= 5 * rate + MIN_READ
    assert rig.server.stats.throttled_seconds["connection"] >= 4.0
    # Nothing was dropped: lift the limit and the rest arrives, in order.
    rig.server.relay.apply(config(), rig.clock())
    rig.settle()
    assert payload(acceptor) == 200 * len(CHUNK)
    assert all(message == CHUNK for message in acceptor.inbox)
    assert connector.is_open and acceptor.is_open


def test_reads_stay_small_while_a_rate_applies(rigs):
    rig = rigs(bandwidth={"connection_rate": 64_000})
    _, connector, _ = tunnel(rig)
    flood(connector)
    rig.settle()
    run_for(rig, 2)
    assert rig.client_of(connector).recv_size <= MIN_READ


def test_a_prefix_rate_is_shared_by_every_connection_from_the_prefix(rigs):
    rate = 100_000
    rig = rigs(bandwidth={"prefix_rate": rate})
    pairs = [tunnel(rig) for _ in range(2)]
    for _, connector, _ in pairs:
        flood(connector)
    rig.settle()
    run_for(rig, 1)  # the burst and the first reads' debt are behind
    start = sum(payload(acceptor) for _, _, acceptor in pairs)
    run_for(rig, 4)
    moved = sum(payload(acceptor) for _, _, acceptor in pairs) - start
    # Loopback is one prefix: both tunnels together get the rate, not twice it.
    assert 4 * rate * OVERHEAD - 2 * MIN_READ <= moved <= 4 * rate + 2 * MIN_READ
    assert rig.server.stats.throttled_seconds["prefix"] > 0
    assert min(payload(acceptor) for _, _, acceptor in pairs) > rate  # both were served


def test_a_key_rate_is_shared_by_the_connections_of_one_key_only(rigs):
    rate = 100_000
    rig = rigs(bandwidth={"key_rate": rate})
    heavy = SigningKey.generate()
    same_key = [tunnel(rig, heavy) for _ in range(2)]
    _, other, other_acceptor = tunnel(rig)
    for _, connector, _ in same_key:
        flood(connector)
    rig.settle()
    run_for(rig, 1)
    start = sum(payload(acceptor) for _, _, acceptor in same_key)
    run_for(rig, 4)
    moved = sum(payload(acceptor) for _, _, acceptor in same_key) - start
    assert 4 * rate * OVERHEAD - 2 * MIN_READ <= moved <= 4 * rate + 2 * MIN_READ
    assert rig.server.stats.throttled_seconds["key"] > 0
    # Another key has a bucket of its own (and its whole burst).
    flood(other, 10)
    rig.settle()
    assert payload(other_acceptor) == 10 * len(CHUNK)


def test_a_total_rate_bounds_the_whole_relay(rigs):
    rate = 200_000
    rig = rigs(bandwidth={"total_rate": rate, "total_burst": 65536})
    pairs = [tunnel(rig) for _ in range(3)]
    for _, connector, _ in pairs:
        flood(connector)
    rig.settle()
    run_for(rig, 1)
    start = sum(payload(acceptor) for _, _, acceptor in pairs)
    run_for(rig, 3)
    moved = sum(payload(acceptor) for _, _, acceptor in pairs) - start
    assert 3 * rate * OVERHEAD - 3 * MIN_READ <= moved <= 3 * rate + 3 * MIN_READ
    assert rig.server.stats.throttled_seconds["total"] > 0


def test_a_reload_applies_new_rates_to_open_connections(rigs):
    rig = rigs()
    _, connector, acceptor = tunnel(rig)
    rig.server.relay.apply(config(bandwidth={"connection_rate": 50_000}), rig.clock())
    flood(connector)
    rig.settle()
    assert rig.client_of(connector).paused & PAUSED_BY_RATE
    held = payload(acceptor)
    assert held < 200 * len(CHUNK)
    # Raised: the paused connection is looked at again at once and reads more.
    rig.server.relay.apply(config(bandwidth={"connection_rate": 400_000}), rig.clock())
    rig.settle()
    run_for(rig, 1)
    assert payload(acceptor) >= held + 400_000 * OVERHEAD - MIN_READ
    rig.server.relay.apply(config(), rig.clock())
    rig.settle()
    assert payload(acceptor) == 200 * len(CHUNK)
    assert not rig.server.policy.bandwidth.enabled
    assert rig.client_of(connector).meter is None


def test_closing_a_paused_connection_counts_its_throttled_time(rigs):
    rig = rigs(bandwidth={"connection_rate": 10_000, "connection_burst": 4096})
    _, connector, _ = tunnel(rig)
    flood(connector, 10)
    rig.settle()
    assert rig.client_of(connector).paused & PAUSED_BY_RATE
    rig.clock.advance(0.5)
    connector.close()
    run_for(rig, 10)  # it is read again once its debt is paid: the close is seen then
    assert len(rig.server.clients) == 1  # the listener; the tunnel is gone
    assert rig.server.stats.throttled_seconds["connection"] >= 0.5
    assert not rig.server.policy.bandwidth._keys and not rig.server.policy.bandwidth._prefixes


# ---- budgets -------------------------------------------------------------------------------


def test_over_a_key_budget_with_refuse_new_tunnels_are_refused_open_ones_kept(rigs, caplog):
    rig = rigs(budgets={"key_daily": 200_000, "action": "refuse"})
    heavy = SigningKey.generate()
    listener, connector, acceptor = tunnel(rig, heavy)
    flood(connector, 40)  # 320 KB
    with caplog.at_level(logging.WARNING, "strelay"):
        rig.settle()
    assert payload(acceptor) == 40 * len(CHUNK)  # refuse does not slow anyone
    assert "budget of 200000 bytes spent: new tunnels refused" in caplog.text
    again = Node(rig, heavy)
    rig.settle()
    assert again.eof  # closed right after its handshake
    stats = rig.server.stats
    assert stats.refused["budget"] == 1 and stats.closed["budget"] == 1
    # Another key is not refused; the open tunnel still carries data.
    fresh = rig.node()
    assert fresh.is_open
    flood(connector, 5)
    rig.settle()
    assert payload(acceptor) == 45 * len(CHUNK)
    assert rig.server.snapshot().budget_over == {"key": 1, "prefix": 0, "total": 0}


def test_over_a_prefix_budget_with_refuse_everyone_from_it_is_refused(rigs):
    rig = rigs(budgets={"prefix_monthly": 100_000, "action": "refuse"})
    _, connector, _ = tunnel(rig)
    flood(connector, 20)
    rig.settle()
    late = Node(rig)
    rig.settle()
    assert late.eof
    assert rig.server.stats.refused["budget"] == 1


def test_over_a_budget_with_throttle_a_key_is_slowed_to_the_floor(rigs):
    floor = 20_000
    rig = rigs(budgets={"key_daily": 100_000, "floor_rate": floor})
    _, connector, acceptor = tunnel(rig)
    flood(connector, 100)
    rig.settle()
    assert rig.client_of(connector).paused & PAUSED_BY_RATE
    # The budget (overshot by the read that crossed it), the floor bucket's burst (64 KiB),
    # then the floor rate.
    start = payload(acceptor)
    assert start < 100 * len(CHUNK) // 2
    run_for(rig, 5)
    moved = payload(acceptor) - start
    assert 5 * floor * OVERHEAD - MIN_READ <= moved <= 5 * floor + MIN_READ
    assert rig.server.stats.throttled_seconds["budget"] > 0
    assert rig.server.snapshot().budget_over["key"] == 1


def test_a_reload_that_puts_a_key_over_slows_its_open_connection_in_short_pauses(rigs):
    # Counted without a floor first: the tunnel runs at full speed, its reads grow large.
    rig = rigs(budgets={"key_daily": 100_000, "action": "refuse"})
    _, connector, acceptor = tunnel(rig)
    flood(connector, 400)
    rig.settle()
    assert payload(acceptor) == 400 * len(CHUNK)
    assert rig.client_of(connector).recv_size > 4 * MIN_READ
    # The same budget, now with a floor: the open connection's next read is a small one,
    # so it is paused for a fraction of a second at a time, not for a large read's worth.
    floor = 65536
    throttle = {"key_daily": 100_000, "action": "throttle", "floor_rate": floor}
    rig.server.relay.apply(config(budgets=throttle), rig.clock())
    start = payload(acceptor)
    flood(connector, 400)
    rig.settle()
    # The floor bucket's burst (64 KiB), the batch counted before the reload, one read.
    assert payload(acceptor) - start <= floor + BUDGET_BATCH + MIN_READ
    assert rig.client_of(connector).paused & PAUSED_BY_RATE
    run_for(rig, 2)
    assert rig.server.stats.throttled_seconds["budget"] > 0  # pauses ended
    moved = payload(acceptor) - start
    assert moved <= floor + BUDGET_BATCH + 2 * floor + MIN_READ


def test_a_connection_of_a_key_that_goes_over_elsewhere_reads_small_at_once(rigs):
    floor = 65536
    rig = rigs(budgets={"key_daily": 3_000_000, "action": "throttle", "floor_rate": floor})
    heavy = SigningKey.generate()
    _, quiet, quiet_acceptor = tunnel(rig, heavy)
    # The quiet connection moves a lot once (its reads grow), then waits.
    flood(quiet, 300)
    rig.settle()
    assert rig.client_of(quiet).recv_size > floor + MIN_READ
    # Another connection of the same key spends the rest of the budget.
    _, busy, _ = tunnel(rig, heavy)
    flood(busy, 200)
    rig.settle()
    assert rig.server.snapshot().budget_over["key"] == 1
    # The quiet one speaks again: it gets the floor from its first read on (its bucket's
    # burst, and one small read), not a large read beyond it.
    start = payload(quiet_acceptor)
    flood(quiet, 300)
    rig.settle()
    assert payload(quiet_acceptor) - start <= floor + MIN_READ
    assert rig.client_of(quiet).paused & PAUSED_BY_RATE


def test_throttled_seconds_include_the_pauses_still_running(rigs):
    rig = rigs(bandwidth={"connection_rate": 10_000, "connection_burst": 4096})
    _, connector, _ = tunnel(rig)
    flood(connector, 10)  # 80 KB: eight seconds of debt
    rig.settle()
    assert rig.client_of(connector).paused & PAUSED_BY_RATE

    def scraped() -> float:
        text = rig.server.metrics_text()
        (line,) = [
            line
            for line in text.splitlines()
            if line.startswith('offset_relay_throttled_seconds_total{kind="connection"}')
        ]
        return float(line.split()[-1])

    seen = [scraped()]
    for _ in range(6):
        rig.clock.advance(0.5)
        rig.settle()
        seen.append(scraped())
    # A counter: it grows while the pause lasts, and never goes back.
    assert seen[-1] >= 2.5
    assert seen == sorted(seen)
    run_for(rig, 10)  # the pause ends
    assert not rig.client_of(connector).paused & PAUSED_BY_RATE
    assert scraped() >= seen[-1]


def test_a_new_utc_day_lifts_a_daily_budget(rigs):
    rig = rigs(budgets={"key_daily": 100_000, "action": "refuse"})
    control = rig.server.policy.bandwidth
    control.wallclock = lambda: utc("2026-11-30T23:59:58")
    control.usage.day, control.usage.month = "2026-11-30", "2026-11"  # as if started then
    heavy = SigningKey.generate()
    _, connector, _ = tunnel(rig, heavy)
    flood(connector, 20)
    rig.settle()
    refused = Node(rig, heavy)
    rig.settle()
    assert refused.eof
    control.wallclock = lambda: utc("2026-12-01T00:00:01")
    rig.clock.advance(3)  # the next status tick
    rig.settle()
    assert control.usage.day == "2026-12-01"
    assert rig.node(heavy).is_open


def test_usage_rolls_over_by_utc_day_and_month():
    usage = Usage(utc("2026-11-30T12:00:00"))
    usage.key_scope.set_limits(1000, 0)
    entry, _ = usage.entry(usage.keys, usage.key_scope, "k")
    entry.day = entry.month = 1500
    usage.total.day = usage.total.month = 1500
    assert usage.refresh_over() == [entry]
    assert not usage.roll(utc("2026-11-30T23:59:59"))
    assert usage.roll(utc("2026-12-01T00:00:00"))  # a new day and a new month
    assert (usage.day, usage.month) == ("2026-12-01", "2026-12")
    assert usage.keys == {} and usage.total.month == 0
    entry, _ = usage.entry(usage.keys, usage.key_scope, "k")
    entry.day = entry.month = 1500
    entry.over = True
    assert usage.roll(utc("2026-12-02T00:00:00"))  # same month: the month's count stays
    assert (entry.day, entry.month, entry.over) == (0, 1500, False)
    usage.key_scope.set_limits(0, 1000)
    assert usage.refresh_over() == [entry]


def test_a_quiet_tunnel_s_last_bytes_are_saved_without_waiting_for_more(tmp_path):
    path = tmp_path / "usage.json"
    rig = Rig(budgets={"total_monthly": 10**12, "state_file": str(path), "save_interval": 1})
    try:
        _, connector, acceptor = tunnel(rig)
        for rounds in (10, 3):  # then less than a batch: nothing settles by itself
            for _ in range(rounds):
                connector.send(b"x" * 8192)
                acceptor.send(b"y" * 8192)
                rig.settle()
            rig.clock.advance(2.5)  # a save
            rig.settle()
        read = rig.client_of(connector).bytes_in + rig.client_of(acceptor).bytes_in
        for _ in range(2):  # quiet from now on: the saves still settle what is held
            rig.clock.advance(2.5)
            rig.settle()
        assert read_usage_file(path)["total"][1] >= read
    finally:
        rig.close()


def test_a_clock_stepped_back_keeps_the_current_period_and_no_byte_is_counted_twice():
    usage = Usage(utc("2026-12-01T00:10:00"))
    usage.total.day = usage.total.month = 700
    # Stepped back across midnight and the month's end: still December the first.
    assert usage.behind(utc("2026-11-30T21:10:00"))
    assert not usage.roll(utc("2026-11-30T21:10:00"))
    assert (usage.day, usage.month) == ("2026-12-01", "2026-12")
    assert (usage.total.day, usage.total.month) == (700, 700)
    # Back on the current day: nothing is started again.
    assert not usage.behind(utc("2026-12-01T00:20:00"))
    assert not usage.roll(utc("2026-12-01T00:20:00"))
    assert usage.total.month == 700
    # A state file written in a later period than the clock now reads: kept, not dropped.
    document = usage.document(utc("2026-12-01T00:20:00"))
    later = Usage(utc("2026-11-30T20:00:00"))
    later.take(document, utc("2026-11-30T20:00:00"))
    assert (later.day, later.month, later.total.month) == ("2026-12-01", "2026-12", 700)


def test_a_clock_stepped_back_is_said_once_and_counting_goes_on(rigs, caplog):
    rig = rigs(budgets={"total_monthly": 10**9})
    control = rig.server.policy.bandwidth
    control.usage.day, control.usage.month = "2026-12-01", "2026-12"
    control.wallclock = lambda: utc("2026-11-30T22:00:00")
    with caplog.at_level(logging.INFO, "strelay"):
        for _ in range(3):
            rig.clock.advance(3)
            rig.settle()
    assert caplog.text.count("budgets: the clock reads 2026-11-30, before") == 1
    assert "a new period" not in caplog.text
    assert control.usage.day == "2026-12-01"


def test_usage_tables_are_bounded():
    usage = Usage(0.0)
    for index in range(MAX_ENTRIES):
        entry, pruned = usage.entry(usage.prefixes, usage.prefix_scope, f"p{index}")
        entry.month = index
        assert not pruned
    _, pruned = usage.entry(usage.prefixes, usage.prefix_scope, "new")
    assert pruned and len(usage.prefixes) == MAX_ENTRIES * 3 // 4 + 1
    assert f"p{MAX_ENTRIES - 1}" in usage.prefixes and "p0" not in usage.prefixes


# ---- the state file ------------------------------------------------------------------------


def test_state_file_is_written_atomically_and_read_back(tmp_path):
    path = tmp_path / "usage.json"
    usage = Usage(utc("2026-11-30T12:00:00"))
    entry, _ = usage.entry(usage.keys, usage.key_scope, "A" * 43)
    entry.day, entry.month = 10, 20
    usage.total.day, usage.total.month = 10, 20
    write_usage_file(path, usage.document(utc("2026-11-30T12:00:00")))
    assert sorted(os.listdir(tmp_path)) == ["usage.json"]  # no temporary left behind
    assert os.stat(path).st_mode & 0o777 == 0o600
    again = Usage(utc("2026-11-30T13:00:00"))
    again.take(read_usage_file(path), utc("2026-11-30T13:00:00"))
    assert (again.keys["A" * 43].day, again.keys["A" * 43].month) == (10, 20)
    later = Usage(utc("2026-12-01T00:00:00"))  # a new month: nothing carries over
    later.take(read_usage_file(path), utc("2026-12-01T00:00:00"))
    assert later.keys == {} and later.total.month == 0


@pytest.mark.parametrize(
    "content",
    [b"", b"{not json", b"[]", b'{"format": "other"}', b"\xff\xfe", None],
    ids=["empty", "truncated", "list", "foreign", "binary", "bad counts"],
)
def test_a_damaged_state_file_is_one_line_and_a_fresh_start(tmp_path, caplog, content):
    path = tmp_path / "usage.json"
    if content is None:
        document = Usage(0.0).document(0.0)
        document["keys"] = {"k": [5, -1]}
        content = json.dumps(document).encode()
    path.write_bytes(content)
    with pytest.raises(UsageFileError):
        read_usage_file(path)
    with caplog.at_level(logging.INFO, "strelay"):
        rig = Rig(budgets={"total_monthly": 10**9, "state_file": str(path)})
    try:
        lines = [r for r in caplog.records if "unusable" in r.getMessage()]
        assert len(lines) == 1 and str(path) in lines[0].getMessage()
        assert rig.server.policy.bandwidth.usage.total.month == 0
        rig.node()  # and it serves
    finally:
        rig.close()
    # The next save replaces the damaged file with a good one.
    read_usage_file(path)


def test_counts_survive_a_restart_through_the_state_file(tmp_path):
    path = tmp_path / "usage.json"
    budgets = {"key_monthly": 10**9, "prefix_monthly": 10**9, "state_file": str(path)}
    rig = Rig(budgets=budgets)
    heavy = SigningKey.generate()
    try:
        _, connector, _ = tunnel(rig, heavy)
        flood(connector, 20)
        rig.settle()
    finally:
        rig.close()  # the stop saves
    key = b64url_encode(bytes(heavy.verify_key))
    saved = json.loads(path.read_text())
    assert saved["keys"][key][1] > 20 * len(CHUNK)
    assert saved["prefixes"]["127.0.0.1"][1] >= saved["keys"][key][1]
    rig = Rig(budgets=budgets)
    try:
        usage = rig.server.policy.bandwidth.usage
        assert usage is not None
        assert usage.keys[key].month == saved["keys"][key][1]
        assert usage.total.month == saved["total"][1]
    finally:
        rig.close()


def test_the_state_file_is_saved_at_most_every_save_interval(tmp_path):
    path = tmp_path / "usage.json"
    rig = Rig(budgets={"total_monthly": 10**9, "state_file": str(path), "save_interval": 30})
    try:
        rig.node()
        rig.clock.advance(3)
        rig.settle()
        assert not path.exists()  # not yet due
        rig.clock.advance(30)
        rig.settle()
        first = read_usage_file(path)["total"][1]
        assert first > 0
        rig.node()
        rig.clock.advance(3)
        rig.settle()
        assert read_usage_file(path)["total"][1] == first  # the next one waits its turn
    finally:
        rig.close()


def test_without_a_state_file_counts_start_at_zero_and_the_log_says_so(caplog, monkeypatch):
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    with caplog.at_level(logging.INFO, "strelay"):
        rig = Rig(budgets={"total_monthly": 10**9})
    rig.close()
    assert caplog.text.count("no state file") == 1


def test_state_directory_gives_the_default_state_file(tmp_path, monkeypatch):
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path))
    rig = Rig(budgets={"total_monthly": 10**9})
    try:
        rig.node()
    finally:
        rig.close()
    assert read_usage_file(tmp_path / "usage.json")["total"][1] > 0


def test_the_handover_carries_the_counts(rigs):
    rig = rigs(budgets={"total_monthly": 10**9})
    _, connector, _ = tunnel(rig)
    flood(connector, 10)
    rig.settle()
    state = rig.server.relay.export_state(rig.clock())
    other = rigs(budgets={"total_monthly": 10**9})
    other.server.policy.bandwidth.take_usage(state.usage)
    assert (
        other.server.policy.bandwidth.usage.total.month
        == rig.server.policy.bandwidth.usage.total.month
    )


# ---- configuration -------------------------------------------------------------------------


def _load(tmp_path: Path, text: str):
    path = tmp_path / "relay.toml"
    path.write_text('identity_file = "/a"\nlisten = ["0.0.0.0:1"]\n' + text)
    return load_config(path)


def test_config_defaults_are_all_off_and_round_trip(tmp_path):
    config_ = _load(tmp_path, "")
    assert config_.budgets == Budgets() and not config_.bandwidth.connection_rate
    text = dump_config(
        _load(
            tmp_path,
            "[bandwidth]\nkey_rate = 1000000\nkey_burst = 65536\n"
            '[budgets]\nprefix_daily = 5000000\naction = "refuse"\nsave_interval = 5.5\n',
        )
    )
    again = tmp_path / "again.toml"
    again.write_text(text)
    loaded = load_config(again)
    assert loaded.bandwidth.key_rate == 1000000 and loaded.budgets.action == "refuse"
    assert loaded.budgets.save_interval == 5.5 and loaded.budgets.state_file == ""


@pytest.mark.parametrize(
    ("table", "key", "value", "words"),
    [
        ("bandwidth", "connection_rate", "100", "between 1024"),
        ("bandwidth", "key_rate", "-1", "between 1024"),
        ("bandwidth", "prefix_burst", "10", "between 4096"),
        ("bandwidth", "total_rate", "1.5", "integer"),
        ("bandwidth", "total_burst", '"x"', "number"),
        ("bandwidth", "speed", "1", "unknown key"),
        ("budgets", "key_daily", "-5", "no budget"),
        ("budgets", "prefix_monthly", "true", "number"),
        ("budgets", "total_monthly", str(1 << 61), "no budget"),
        ("budgets", "action", '"drop"', "throttle, refuse"),
        ("budgets", "floor_rate", "10", "between 1024"),
        ("budgets", "state_file", '"relative.json"', "absolute"),
        ("budgets", "state_file", '"/nonexistent-dir/usage.json"', "does not exist"),
        ("budgets", "save_interval", "0", "between 1"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path, table, key, value, words):
    with pytest.raises(ConfigError) as raised:
        _load(tmp_path, f"[{table}]\n{key} = {value}\n")
    message = str(raised.value)
    assert f"relay.toml: {table}.{key}" in message and words in message


def test_a_throttled_connection_and_the_counts_travel_through_the_handover(tmp_path, monkeypatch):
    from .test_handover import FakeStore, _restart

    monkeypatch.delenv("STATE_DIRECTORY", raising=False)  # no state file: the hand-over only
    store = FakeStore(tmp_path / "notify")
    rig = Rig(bandwidth={"connection_rate": 50_000}, budgets={"total_monthly": 10**12})
    try:
        _, connector, acceptor = tunnel(rig)
        flood(connector, 40)
        rig.settle()
        assert rig.client_of(connector).paused & PAUSED_BY_RATE
        counted = rig.server.policy.bandwidth.usage.total.month
        _restart(rig, store)
        assert rig.server.policy.bandwidth.usage.total.month >= counted
        run_for(rig, 10)  # resumed after the hand-over, still at the rate
        assert payload(acceptor) == 40 * len(CHUNK)
        assert connector.is_open and acceptor.is_open
    finally:
        rig.close()
        store.close()


def test_a_state_file_that_cannot_be_written_is_said_once(tmp_path, caplog):
    path = tmp_path / "usage.json"
    blocker = tmp_path / ".usage.json.tmp"  # a directory where the temporary file goes
    blocker.mkdir()
    rig = Rig(budgets={"total_monthly": 10**9, "state_file": str(path), "save_interval": 1})
    try:
        with caplog.at_level(logging.INFO, "strelay"):
            for _ in range(3):
                rig.node()
                rig.clock.advance(3)
                rig.settle()
            assert not path.exists()
            blocker.rmdir()
            rig.node()
            rig.clock.advance(3)
            rig.settle()
        assert caplog.text.count("cannot write") == 1
        assert caplog.text.count("written again") == 1
        assert read_usage_file(path)["total"][1] > 0
    finally:
        rig.close()


def test_a_budget_refusal_is_a_strike_towards_a_ban(rigs):
    from offset_appliance.config import Bans

    rig = rigs(
        budgets={"key_daily": 100_000, "action": "refuse"},
        bans=Bans(enabled=True, threshold=1),
    )
    heavy = SigningKey.generate()
    _, connector, _ = tunnel(rig, heavy)
    flood(connector, 20)
    rig.settle()
    for _ in range(2):
        refused = Node(rig, heavy)
        rig.settle()
        assert refused.eof
    # More refusals than the threshold: loopback is banned, once.
    assert rig.server.policy.bans.is_banned("127.0.0.1", rig.clock())
    assert rig.server.stats.refused["budget"] == 2
