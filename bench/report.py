"""The results table: targets checked against results.json, rendered as Markdown."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One target of the issue and how the measured figure stands against it."""

    name: str
    value: float
    limit: float
    unit: str
    at_most: bool  # True: the value must not exceed the limit; False: it must reach it

    @property
    def met(self) -> bool:
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    @property
    def gap(self) -> float:
        """How far off, as a factor >= 1 (1.0 when met exactly)."""
        if self.limit <= 0 and self.at_most:  # a count that must be 0 (connections lost)
            return 1.0 if self.met else float(self.value + 1)
        if self.value <= 0:
            return 1.0 if self.met else float("inf")
        return self.value / self.limit if self.at_most else self.limit / self.value

    def shown(self) -> str:
        """The value with as many decimals as its size deserves."""
        return f"{self.value:,.0f}" if abs(self.value) >= 100 else f"{self.value:.2f}"

    def verdict(self) -> str:
        if self.met:
            return "met"
        if self.at_most:
            return f"missed: {self.gap:.2f}x the limit"
        return f"missed: {self.value / self.limit * 100:.0f}% of the target ({self.gap:.2f}x short)"

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "value": self.value,
            "target": self.limit,
            "unit": self.unit,
            "at_most": self.at_most,
            "met": self.met,
            "gap_factor": round(self.gap, 3),
        }


def headline_small(results: dict) -> dict | None:
    """The small-message run whose figures stand for test 2."""
    small = results.get("small")
    if not small:
        return None
    runs = small["runs"]
    return next((run for run in runs if run["connections_asked"] == small["headline"]), runs[-1])


def targets(results: dict) -> list[Target]:
    """The issue's targets that these results cover."""
    found = []
    if "bulk" in results:
        found.append(Target("bulk relay/floor CPU ratio", results["bulk"]["ratio"], 1.5, "x", True))
    run = headline_small(results)
    if run and run["messages_per_relay_cpu_second"]:
        found.append(
            Target(
                "small messages per second on one relay core",
                run["messages_per_relay_cpu_second"],
                50_000,
                "msg/s",
                False,
            )
        )
    if "handshakes" in results and results["handshakes"]["per_relay_cpu_second"]:
        found.append(
            Target(
                "handshakes per second on one relay core",
                results["handshakes"]["per_relay_cpu_second"],
                4000,
                "/s",
                False,
            )
        )
    if "idle" in results:
        found.append(
            Target(
                "RSS per idle connection",
                results["idle"]["rss_kib_per_connection"],
                20,
                "KiB",
                True,
            )
        )
    if "latency" in results:
        found.append(
            Target(
                "p99 round trip added by the relay, idle",
                results["latency"]["added_p99_us"] / 1000,
                1.0,
                "ms",
                True,
            )
        )
    instances = results.get("instances")
    if instances:
        runs = {run["instances"]: run for run in instances["runs"]}
        if 1 in runs and 2 in runs:
            worst = max(each["relay_cpu_us_per_message"] for each in runs[2]["per_instance"])
            found.append(
                Target(
                    "relay CPU per message, 2 instances against 1",
                    round(worst / runs[1]["relay_cpu_us_per_message"], 3),
                    1.1,
                    "x",
                    True,
                )
            )
    controls = results.get("controls")
    if controls:
        found.append(
            Target(
                "relay CPU per message, all controls on against off",
                round(1 + controls["overhead"], 3),
                1.1,
                "x",
                True,
            )
        )
    scale = results.get("scale")
    if scale:
        count = f"{scale['connections']:,}"
        found += [
            Target(f"connections lost, {count} idle", scale["lost"], 0, "", True),
            Target(
                f"relay CPU share of a core, {count} idle", scale["relay_cpu_share"], 0.25, "", True
            ),
            Target(
                f"relay RSS per connection, {count} idle",
                scale["rss_kib_per_connection"],
                4,
                "KiB",
                True,
            ),
            Target(
                f"stmgr probe p99 round trip, {count} idle",
                scale["probe_round_trip"]["p99_us"] / 1000,
                20,
                "ms",
                True,
            ),
        ]
    return found


def _steal_text(results: dict) -> str:
    """The hypervisor's share of the CPUs over the run (absent from older results)."""
    steal = results.get("steal_share")
    if steal is None:
        return ""
    return (
        f"; the hypervisor took {steal * 100:.1f}% of the CPUs' time during the run (steal:"
        " time charged to whatever ran without its work being done)"
    )


def _size(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:g} {unit}"
    return f"{count} B"


def _n(value: float | None, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _ms(us: float) -> str:
    return f"{us / 1000:.2f} ms"


def _pair(stats: dict) -> str:
    return f"{_ms(stats['p50_us'])} / {_ms(stats['p99_us'])}"


def _verdicts(results: dict) -> dict[str, str]:
    return {target.name: target.verdict() for target in targets(results)}


def table_rows(results: dict) -> list[tuple[str, ...]]:
    """(test, figure, measured, floor, ratio, target) rows."""
    verdict = _verdicts(results)
    rows: list[tuple[str, ...]] = []
    if "bulk" in results:
        b = results["bulk"]
        gib = b["bytes"] / (1 << 30)
        rows.append(
            (
                f"1 bulk: {_size(b['bytes'])} in {_size(b['message_bytes'])} messages, one tunnel",
                "relay CPU per GiB",
                f"{b['relay_cpu_per_gib']:.2f} s",
                f"{b['floor_cpu_per_gib']:.2f} s (ChaCha20-Poly1305 open + seal)",
                f"{b['ratio']:.2f}",
                f"ratio <= 1.5: {verdict['bulk relay/floor CPU ratio']}",
            )
        )
        rows.append(
            (
                "",
                "throughput (wall; per relay CPU second)",
                f"{_n(b['mb_per_s'])} MB/s; {_n(b['mb_per_relay_cpu_second'])} MB/s",
                f"{_n(b['bytes'] / 1e6 / (b['floor_cpu_per_gib'] * gib))} MB/s",
                "",
                f"relay busy {b['relay_cpu_share'] * 100:.0f}% of a core",
            )
        )
    run = headline_small(results)
    if run:
        small = results["small"]
        floor_us = small["floor_cpu_us_per_message"]
        rows.append(
            (
                f"2 small: {small['message_bytes']} B messages, {_n(run['tunnels'])} tunnels "
                f"({_n(run['connections'])} connections), both ways",
                "messages/s per relay core (wall)",
                f"{_n(run['messages_per_relay_cpu_second'])} ({_n(run['messages_per_s'])})",
                f"{_n(1e6 / floor_us)} (open + seal)",
                f"{run['relay_cpu_us_per_message'] / floor_us:.1f}",
                ">= 50,000/s: " + verdict.get("small messages per second on one relay core", "n/a"),
            )
        )
        rows.append(
            (
                "",
                "relay CPU per message",
                f"{run['relay_cpu_us_per_message']:.1f} us",
                f"{floor_us:.1f} us",
                f"{run['relay_cpu_us_per_message'] / floor_us:.1f}",
                f"relay busy {run['relay_cpu_share'] * 100:.0f}% of a core",
            )
        )
    if run and results["small"].get("window_runs"):
        by_window = sorted([run, *results["small"]["window_runs"]], key=lambda r: r["window"])
        rows.append(
            (
                "",
                "relay CPU per message by messages in flight per tunnel and direction",
                "; ".join(
                    f"{r['window']}: {r['relay_cpu_us_per_message']:.1f} us "
                    f"({_n(r['messages_per_relay_cpu_second'])}/s)"
                    for r in by_window
                ),
                "",
                "",
                "more in flight, more messages per system call",
            )
        )
    if "handshakes" in results:
        h = results["handshakes"]
        rows.append(
            (
                f"3 handshakes: version + handshake + listen, {h['concurrency']} in flight",
                "per relay core (wall)",
                f"{_n(h['per_relay_cpu_second'])}/s ({_n(h['per_s'])}/s)",
                f"{_n(h['floor_per_s'])}/s (Ed25519 sign + verify, 2 X25519)",
                f"{h['ratio']:.2f}",
                ">= 4,000/s: " + verdict["handshakes per second on one relay core"],
            )
        )
    if "idle" in results:
        i = results["idle"]
        rows.append(
            (
                f"4 idle: {_n(i['connections'])} listen connections for {i['hold_seconds']:.0f} s",
                "RSS per connection",
                f"{i['rss_kib_per_connection']:.1f} KiB",
                "",
                "",
                "<= 20 KiB: " + verdict["RSS per idle connection"],
            )
        )
        rows.append(
            (
                "",
                "stmgr probe round trip p50 / p99",
                _pair(i["probe_round_trip"]),
                "",
                "",
                f"{i['lost']} lost, {i['probe_failures']} probes failed",
            )
        )
    if "latency" in results:
        lat = results["latency"]
        rows.append(
            (
                f"5 latency: {lat['message_bytes']} B round trip through a tunnel, idle",
                "p50 / p99",
                _pair(lat["relay"]),
                _pair(lat["direct"]) + " (direct, no relay)",
                "",
                f"added p99 {_ms(lat['added_p99_us'])} <= 1 ms: "
                + verdict["p99 round trip added by the relay, idle"],
            )
        )
    if run and "latency" in run:
        rows.append(
            (
                "5 latency: the same, while test 2 runs",
                "p50 / p99",
                _pair(run["latency"]),
                "",
                "",
                "",
            )
        )
    if "small" in results:
        for each in results["small"]["runs"]:
            rows.append(
                (
                    f"6 growth: {_n(each['connections'])} connections",
                    "relay CPU per message; RSS per connection",
                    f"{each['relay_cpu_us_per_message']:.1f} us; "
                    f"{each['rss_kib_per_connection']:.1f} KiB",
                    "",
                    "",
                    f"{_n(each['messages_per_s'])} msg/s wall",
                )
            )
    if "instances" in results:
        runs = results["instances"]["runs"]
        floor_us = results["instances"].get("floor_cpu_us_per_message")
        single = next((r for r in runs if r["instances"] == 1), None)
        for r in runs:
            each = "; ".join(f"{i['relay_cpu_us_per_message']:.1f} us" for i in r["per_instance"])
            note = f"{_n(r['messages_per_s'])} msg/s in all (wall), relays busy "
            note += f"{r['relay_cpu_share']:.2f} cores"
            if single and r is not single:
                worst = max(i["relay_cpu_us_per_message"] for i in r["per_instance"])
                change = worst / single["relay_cpu_us_per_message"] - 1
                note += f"; per instance {change * 100:+.0f}% against 1 (within 10%: "
                note += ("yes" if change <= 0.10 else "no") + ")"
            rows.append(
                (
                    f"8 instances: test 2's load over {r['instances']} relay(s), "
                    f"{_n(r['tunnels'])} tunnels",
                    "relay CPU per message, each instance",
                    each,
                    f"{floor_us:.1f} us" if floor_us else "",
                    f"{r['relay_cpu_us_per_message'] / floor_us:.1f}" if floor_us else "",
                    note,
                )
            )
    if "wire" in results:
        w = results["wire"]
        seen = f"; {run['wire_bytes_per_message']:.0f} B seen by test 2's clients" if run else ""
        rows.append(
            (
                f"7 wire: bytes per {w['message_bytes']} B message",
                "ours (padding 0-255 B)",
                f"{w['ours']:.0f} B{seen}",
                f"{w['no_padding']:.0f} B (no padding)",
                f"{w['ours'] / w['no_padding']:.2f}",
                f"the original's padding (0-65535 B): {_n(w['original'])} B, "
                f"{w['original'] / w['ours']:.0f}x ours",
            )
        )
    if "controls" in results:
        c = results["controls"]
        name = "relay CPU per message, all controls on against off"
        rows.append(
            (
                f"9 controls: test 2's load ({_n(c['connections'])} connections), every "
                "control on with generous limits",
                "relay CPU per message, off; on",
                f"{c['relay_cpu_us_per_message_off']:.1f} us; "
                f"{c['relay_cpu_us_per_message_on']:.1f} us",
                "",
                f"{1 + c['overhead']:.3f}",
                f"<= 1.10: {verdict[name]} ({c['overhead'] * 100:+.1f}%, cheapest of "
                f"{c['rounds']} run(s) each)",
            )
        )
    if "scale" in results:
        sc = results["scale"]
        count = f"{sc['connections']:,}"
        rows += [
            (
                f"10 scale: {count} listen connections from {sc['source_addresses']} loopback"
                f" addresses, held {sc['hold_seconds']:.0f} s, rekey every"
                f" {sc['rekey_interval']:g} s",
                "connections lost; rekeyed",
                f"{sc['lost']}; {_n(sc['rekeyed_connections'])} of {count}",
                "",
                "",
                f"0 lost: {verdict[f'connections lost, {count} idle']}"
                + (
                    f"; {sc['rekeys']:,} rekeys, every one due in the hold"
                    if sc.get("rekeys_due_in_hold")
                    else ""
                ),
            ),
            (
                "",
                f"relay CPU, share of a core (hold; busiest, quietest {sc['bucket_seconds']:g} s)",
                f"{sc['relay_cpu_share']:.3f} ({sc['relay_cpu_share_max_bucket']:.3f},"
                f" {sc['relay_cpu_share_min_bucket']:.3f})",
                "",
                "",
                f"<= 0.25: {verdict[f'relay CPU share of a core, {count} idle']}"
                + (
                    f" (at the original's hourly rekeys, estimated from this run:"
                    f" {sc['relay_cpu_share_at_hourly_rekeys']:.3f})"
                    if sc.get("relay_cpu_share_at_hourly_rekeys") is not None
                    else ""
                ),
            ),
            (
                "",
                "relay RSS per connection",
                f"{sc['rss_kib_per_connection']:.2f} KiB",
                "",
                "",
                f"<= 4 KiB: {verdict[f'relay RSS per connection, {count} idle']}"
                f" ({sc['rss_kib'] / 1024:,.0f} MiB in all)",
            ),
            (
                "",
                "stmgr probe round trip p50 / p99",
                _pair(sc["probe_round_trip"]),
                "",
                "",
                f"p99 <= 20 ms: {verdict[f'stmgr probe p99 round trip, {count} idle']}"
                f" ({sc['probe_failures']} of"
                f" {sc['probe_round_trip']['samples'] + sc['probe_failures']} probes failed)",
            ),
            (
                "",
                "set up; tear down (relay CPU)",
                f"{sc['setup_seconds']:.0f} s ({sc['setup_relay_cpu_seconds']:.0f} s);"
                f" {sc['teardown_seconds']:.1f} s ({sc['teardown_relay_cpu_seconds']:.1f} s)",
                "",
                "",
                "",
            ),
        ]
    rows.extend(_original_rows(results))
    return rows


def _versus(ours: float | None, theirs: float | None) -> str:
    """Ours divided by the original's, for figures where lower is better."""
    return f"ours / original {ours / theirs:.2f}" if ours and theirs else ""


def _original_rows(results: dict) -> list[tuple[str, ...]]:
    """The same loads against the original strelay (``--original``); none without it."""
    original = dict(results.get("original") or {})
    rows: list[tuple[str, ...]] = []
    for name in ("bulk", "small", "handshakes", "idle"):
        if "error" in original.get(name, {}):
            error = original.pop(name)["error"]
            rows.append((f"{name}, the original strelay", "failed", error, "", "", ""))
    if "bulk" in original:
        b = original["bulk"]
        ours = results.get("bulk", {}).get("relay_cpu_per_gib")
        rows.append(
            (
                "1 bulk, the original strelay",
                "relay CPU per GiB; throughput (wall; per relay CPU second)",
                f"{b['relay_cpu_per_gib']:.2f} s; {_n(b['mb_per_s'])} MB/s; "
                f"{_n(b['mb_per_relay_cpu_second'])} MB/s",
                "",
                _versus(ours, b["relay_cpu_per_gib"]),
                f"relay busy {b['relay_cpu_share'] * 100:.0f}% of a core",
            )
        )
    if "small" in original:
        m = original["small"]
        ours = (headline_small(results) or {}).get("relay_cpu_us_per_message")
        rows.append(
            (
                f"2 small, the original strelay ({_n(m['connections'])} connections)",
                "messages/s per relay core (wall); relay CPU per message; RSS per connection",
                f"{_n(m['messages_per_relay_cpu_second'])} ({_n(m['messages_per_s'])}); "
                f"{m['relay_cpu_us_per_message']:.1f} us; {m['rss_kib_per_connection']:.1f} KiB",
                "",
                _versus(ours, m["relay_cpu_us_per_message"]),
                f"{m['wire_bytes_per_message']:.0f} B on the wire per 64 B message",
            )
        )
    if "handshakes" in original:
        h = original["handshakes"]
        rows.append(
            (
                "3 handshakes, the original strelay",
                "per relay core (wall)",
                f"{_n(h['per_relay_cpu_second'])}/s ({_n(h['per_s'])}/s)",
                "",
                "",
                "",
            )
        )
    if "idle" in original:
        i = original["idle"]
        ours = results.get("idle", {}).get("rss_kib_per_connection")
        rows.append(
            (
                "4 idle, the original strelay",
                "RSS per connection",
                f"{i['rss_kib_per_connection']:.1f} KiB",
                "",
                _versus(ours, i["rss_kib_per_connection"]),
                "",
            )
        )
    return rows


def markdown_table(results: dict) -> str:
    """The results as one Markdown table."""
    header = ("Test", "Figure", "Measured", "Floor (same run)", "Ratio", "Target / note")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table_rows(results):
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in row) + " |")
    return "\n".join(lines)


def machine_line(machine: dict) -> str:
    """Where the numbers come from, in one sentence."""
    line = (
        f"{machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']:.0f} GiB RAM, "
        f"Linux {machine['kernel']}, Python {machine['python']}, PyNaCl {machine['pynacl']}"
    )
    if machine["relay_python"] != machine["python_executable"]:
        line += f"; the relay ran on {machine['relay_python']} ({machine['relay_python_version']})"
    return line


def markdown(results: dict) -> str:
    """RESULTS.md: the Performance section for the README."""
    machine = results["machine"]
    client_share = ""
    run = headline_small(results)
    if run:
        client_share = (
            f" In test 2 the client processes used {run['client_cpu_seconds'] / run['seconds']:.2f}"
            f" CPU seconds per second while the relay used {run['relay_cpu_share']:.2f}."
        )
    parts = [
        "## Performance",
        "",
        f"Measured by `make bench` on {results['date']} in {results['duration_seconds']:.0f} s: "
        f"{machine_line(machine)}. One-minute load average {results['load_average_before']:.1f}"
        f" before the run and {results['load_average_after']:.1f} after it"
        + _steal_text(results)
        + ".",
        "",
        "The relay is one single-threaded process. Load comes from separate client processes on"
        " the same machine, so clients and relay share its cores: wall-clock rates (in"
        ' parentheses) are what this machine reached with both running, and the "per relay'
        " core\" figures divide the work done by the relay's own CPU time (the kernel's count,"
        " from `/proc/<pid>/schedstat`), which is what the targets mean."
        + client_share
        + " Each floor is measured in one process at the start and at the end of the same run"
        " (the lower reading counts), and the ratio is relay cost / floor cost, so a slower"
        " machine moves both together.",
        "",
        markdown_table(results),
        "",
    ]
    if run and "latency" in run:
        parts += [
            "While test 2 runs the relay is saturated: every tunnel keeps"
            f" {run['window']} messages in flight each way ({_n(run['in_flight'])} in all),"
            " so a round trip mostly waits behind them; in flight / rate is"
            f" {run['in_flight'] / run['messages_per_s'] * 1000:.0f} ms here.",
            "",
        ]
    if results.get("original"):
        parts += [
            'The rows "the original strelay" are the original strelay, same machine, same'
            " clients, in the same run: the same loads against the original's own build"
            " (github freedomlayer/offset), measured the same way. The"
            " original pads every message with 0 to 65,535 random bytes (test 7), so each of"
            " its messages costs it more encryption and more bytes to move than ours.",
            "",
        ]
    found = targets(results)
    if found:
        met = sum(1 for target in found if target.met)
        parts.append(f"Targets met: {met} of {len(found)}.")
        for target in found:
            parts.append(
                f"- {target.name}: {target.shown()} {target.unit} against "
                f"{'at most' if target.at_most else 'at least'} {target.limit:,g} {target.unit}"
                f": {target.verdict()}"
            )
        parts.append("")
    parts.append(
        "Raw figures are in `bench/results.json`; where the time goes, and what to change, is in"
        " `bench/PROFILE.md`."
    )
    return "\n".join(parts) + "\n"
