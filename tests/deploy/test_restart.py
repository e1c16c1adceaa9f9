"""Restarts and upgrades on a booted bookworm host drop no tunnel (issue 15).

One host: the package of the previous release (built from its commit in this repository's
history, PREVIOUS_COMMIT, under a version lower than this tree's) is installed; 100 tunnels
stream checksummed data both ways and 20 idle listeners that keep the original node's
keepalive rule wait, from the controller over the rig's network, while the relay is restarted
five times, upgraded to this version (which must restore the state the previous release handed
over) and restarted with a changed configuration. Then: a damaged hand-over state, a crash, and
a stop.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from offset_appliance import __version__
from offset_appliance.files import b64url_decode

from .restart_load import KEEPALIVE, Load, percentiles
from .rig import Host, Rig

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
PORT = 4567
APT = "DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0"
DROP_INS = "/etc/offset-relay/relay.d"
TUNNELS = int(os.environ.get("OFFSET_RESTART_TUNNELS", "100"))
IDLE = int(os.environ.get("OFFSET_RESTART_IDLE", "20"))
RESTARTS = 5
RESULTS = ROOT / "tests" / "deploy" / "restart-results.json"
# The previous release, built from this commit: the last release whose hand-over writes the
# state in format 1 (handover.FORMAT_VERSION = 1). The upgrade step proves that a relay of this
# tree restores what that one hands over, whatever format this tree itself writes.
PREVIOUS_COMMIT = "3054043ca26f1356fc03e0569cb6925d9132c4af"
# Its package's version: below this tree's, so that installing this tree's is an upgrade.
PREVIOUS = f"{__version__}~handover1"

# Run inside the unit (ExecStartPre, with NotifyAccess=all): replaces the state in the store
# with one of a format version no relay writes, sealed as a real one would be.
DAMAGE = """
from offset_appliance.relay import handover
manager = handover.ServiceManager.from_environment()
fd = handover.sealed_memfd(handover.MAGIC + (99).to_bytes(4, "big") + bytes(64))
manager.remove(handover.NAME_STATE)
manager.store(handover.NAME_STATE, [fd])
assert manager.barrier()
"""


def build_previous(workdir: Path) -> Path:
    """The package of PREVIOUS_COMMIT, versioned PREVIOUS: the release an upgrade starts from."""
    found = subprocess.run(
        [
            "git",
            "-C",
            str(ROOT),
            "rev-parse",
            "--verify",
            "--quiet",
            f"{PREVIOUS_COMMIT}^{{commit}}",
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
    )
    if found.returncode != 0:
        pytest.fail(
            f"commit {PREVIOUS_COMMIT} (the previous release) is not in {ROOT}"
            " (a shallow clone? fetch its history)",
            pytrace=False,
        )
    src = workdir / f"offset-relay-{PREVIOUS}"
    src.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", PREVIOUS_COMMIT],
        capture_output=True,
        stdin=subprocess.DEVNULL,
        check=True,
    )
    subprocess.run(["tar", "-xf", "-", "-C", str(src)], input=archive.stdout, check=True)
    shutil.copytree(src / "packaging" / "debian", src / "debian")
    changelog = src / "debian" / "changelog"
    text = changelog.read_text()
    changelog.write_text(re.sub(r"\(([^)]*)\)", f"({PREVIOUS})", text, count=1))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = "/usr/bin:/bin"
    result = subprocess.run(
        ["dpkg-buildpackage", "-us", "-uc", "-b"],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=900,
    )
    assert result.returncode == 0, f"building {PREVIOUS} failed:\n{result.stdout[-3000:]}"
    deb = workdir / f"offset-relay_{PREVIOUS}_all.deb"
    assert deb.is_file()
    return deb


@pytest.fixture(scope="module")
def rig(make_rig: Callable[..., Rig], tmp_path_factory: pytest.TempPathFactory) -> Rig:
    previous = build_previous(tmp_path_factory.mktemp("previous"))
    return make_rig(1, name="restart", repo_debs=[previous])


@pytest.fixture(scope="module")
def host(rig: Rig) -> Host:
    host = rig.hosts[0]
    # 100 tunnels are 300 connections from the controller's one address.
    install_relay(host, "50-test-load.toml", "[limits]\nmax_connections_per_ip = 2048\n")
    assert installed_version(host) == PREVIOUS
    return host


def install_relay(host: Host, drop_in: str, settings: str) -> None:
    """``apt install offset-relay`` from the rig's repository, then ``settings`` in the
    drop-in ``drop_in`` and a restart."""
    host.ssh(f"{APT} update")
    result = host.ssh(f"{APT} install offset-relay 2>&1", check=False, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:]
    host.write(f"{DROP_INS}/{drop_in}", settings)
    host.ssh("systemctl restart offset-relay")
    wait_active(host)


def installed_version(host: Host) -> str:
    return host.ssh("dpkg-query -W -f '${Version}' offset-relay").stdout


def unit(host: Host, *props: str) -> dict[str, str]:
    args = " ".join(f"-p {p}" for p in props)
    out = host.ssh(f"systemctl show offset-relay.service {args}").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(0.2)


def wait_active(host: Host) -> None:
    wait_for(
        "offset-relay to be active", lambda: unit(host, "ActiveState")["ActiveState"] == "active"
    )


def relay_key(host: Host) -> bytes:
    line = host.ssh(
        "journalctl -u offset-relay -o cat --no-pager | grep 'relay public key' | tail -1"
    ).stdout.split()
    return b64url_decode(line[-1], "relay public key")


def journal_cursor(host: Host) -> str:
    out = host.ssh("journalctl -n 0 --show-cursor --no-pager").stdout
    match = re.search(r"-- cursor: (\S+)", out)
    assert match, out
    return match.group(1)


def journal_since(host: Host, cursor: str, pid: str = "") -> list[str]:
    """The relay's journal lines since ``cursor`` (the last entry before the action looked at);
    only process ``pid``'s if given. ``--cursor`` includes that entry if it matches, which does
    no harm; bookworm's journalctl (252) with ``--after-cursor`` skips the first matching entry
    when the cursor's own entry does not match."""
    if pid:
        matches = f"_SYSTEMD_UNIT=offset-relay.service _PID={pid}"
    else:
        matches = "-u offset-relay"
    out = host.ssh(f"journalctl {matches} -o cat --no-pager --cursor '{cursor}'").stdout
    return out.splitlines()


def relay_timings(host: Host) -> dict[str, list[float]]:
    """Where a pause goes, from the journal's monotonic stamps of each hand-over: SIGTERM to
    handed over (serializing), handed over to the new process starting (systemd), and its
    start to every connection restored (interpreter start-up and restoring)."""
    out = host.ssh("journalctl -u offset-relay -o short-monotonic --no-pager").stdout
    marks = {
        "Stopping offset-relay": "stopping",
        "handed over": "handed",
        "Starting offset-relay": "starting",
        "connections restored": "restored",
    }
    events = []
    for line in out.splitlines():
        match = re.match(r"\[\s*(\d+\.\d+)\]", line)
        kind = next((k for text, k in marks.items() if text in line), None)
        if match and kind:
            events.append((kind, float(match.group(1))))
    timings: dict[str, list[float]] = {"serialize": [], "systemd": [], "start_and_restore": []}
    for index in range(len(events) - 3):
        window = events[index : index + 4]
        if [kind for kind, _ in window] == ["stopping", "handed", "starting", "restored"]:
            (_, stop), (_, handed), (_, start), (_, restored) = window
            timings["serialize"].append(round(handed - stop, 3))
            timings["systemd"].append(round(start - handed, 3))
            timings["start_and_restore"].append(round(restored - start, 3))
    return timings


def test_restarts_upgrade_and_config_change_drop_no_tunnel(
    rig: Rig, host: Host, deb_package: Path
) -> None:
    load = Load((host.address, PORT), relay_key(host))
    phases: list[str] = []
    try:
        load.set_up(TUNNELS, IDLE)
        load.start()
        time.sleep(2)

        def restart(phase: str, command: str) -> None:
            load.mark(phase)
            phases.append(phase)
            host.ssh(command, timeout=600)
            wait_active(host)
            time.sleep(3)
            closed = [(p.name, p.closed) for p in load.peers if p.closed]
            assert not closed, f"{phase}: {len(closed)} closed, first {closed[:3]}"

        for n in range(RESTARTS):
            restart(f"restart-{n + 1}", "systemctl restart offset-relay")
        rig.publish([deb_package])
        cursor = journal_cursor(host)
        restart("upgrade", f"{APT} update >/dev/null && {APT} install offset-relay >/dev/null")
        assert installed_version(host) == __version__
        # The relay now running, this version's, took every connection back from the state
        # the previous release handed over (the warning form of the line counts closed ones).
        lines = journal_since(host, cursor, unit(host, "MainPID")["MainPID"])
        restored = [m for line in lines if (m := re.search(r"hand-over: \d+ connections.*", line))]
        assert [m.group() for m in restored] == [
            f"hand-over: {len(load.peers)} connections restored"
        ], lines
        host.write(f"{DROP_INS}/60-test-changed.toml", 'log_level = "debug"\n')
        restart("config", "systemctl restart offset-relay")
        assert host.ssh("strelay --print-config --config /etc/offset-relay/relay.toml").stdout
        # Past the original's keepalive time after the last restart: every idle listener
        # must have had a KaMessage in time, from the new process.
        load.mark("after")
        time.sleep(KEEPALIVE + 5)
        load.finish()
    finally:
        load.close()
        host.ssh(f"rm -f {DROP_INS}/60-test-changed.toml")
    closed = [(p.name, p.closed) for p in load.peers if p.closed]
    assert not closed, f"{len(closed)} connections closed, first {closed[:3]}"
    bad = [(p.name, p.bad[:2]) for p in load.peers if p.bad]
    assert not bad, f"lost, duplicated or reordered messages: {bad[:3]}"
    for a, b in load.ends:
        assert a.sent == b.expected and b.sent == a.expected, f"tunnel {a.tunnel} short"
    assert max(p.longest_ka_gap for p in load.idle) < KEEPALIVE
    results = {
        "tunnels": TUNNELS,
        "idle_listeners": IDLE,
        "messages": sum(a.sent + b.sent for a, b in load.ends),
        "bytes_each_message": 1024,
        "longest_keepalive_gap_idle_s": round(max(p.longest_ka_gap for p in load.idle), 3),
        "pause_s": {
            phase: {k: round(v, 3) for k, v in percentiles(load.pauses(phase)).items()}
            for phase in phases
        },
    }
    results["relay_side_s"] = relay_timings(host)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


def test_damaged_state_closes_connections_cleanly_and_the_relay_runs(host: Host) -> None:
    load = Load((host.address, PORT), relay_key(host))
    dropin = "/run/systemd/system/offset-relay.service.d"
    try:
        load.set_up(3, 2)
        load.start()
        time.sleep(1)
        load.sending = False  # so that a close is seen as one, not as a reset of a send
        time.sleep(1)
        host.write("/usr/local/lib/offset-damage-state.py", DAMAGE)
        host.ssh(f"mkdir -p {dropin}")
        host.write(
            f"{dropin}/90-test-damage.conf",
            "[Service]\nNotifyAccess=all\n"
            "ExecStartPre=+/usr/bin/python3 /usr/local/lib/offset-damage-state.py\n",
        )
        host.ssh("systemctl daemon-reload")
        cursor = journal_cursor(host)
        host.ssh("systemctl restart offset-relay")
        wait_active(host)
        wait_for(
            "every peer to see its connection closed", lambda: all(p.closed for p in load.peers), 30
        )
        load.finish(timeout=1)
    finally:
        load.close()
        host.ssh(
            f"rm -rf {dropin} /usr/local/lib/offset-damage-state.py && systemctl daemon-reload"
        )
    assert all(p.closed == "closed by the relay" for p in load.peers)  # a FIN, no reset
    lines = journal_since(host, cursor)
    unusable = [line for line in lines if "hand-over state unusable" in line]
    assert len(unusable) == 1, lines
    assert "version 99" in unusable[0] and "11 connections closed" in unusable[0]
    assert not any("Traceback" in line for line in lines)
    # The relay serves: a new tunnel carries data.
    fresh = Load((host.address, PORT), relay_key(host))
    try:
        fresh.set_up(1, 0)
        fresh.start()
        time.sleep(1)
        fresh.finish()
        ((a, b),) = fresh.ends
        assert a.expected > 0 and b.expected > 0 and not any(p.closed for p in fresh.peers)
    finally:
        fresh.close()


def scrape(host: Host, metric: str) -> float:
    """One sample of the relay's /metrics, read on the host."""
    fetch = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9477/metrics').read().decode())"
    out = host.ssh(f'python3 -c "{fetch}"').stdout
    values = [line.split()[-1] for line in out.splitlines() if line.startswith(metric + " ")]
    assert len(values) == 1, out
    return float(values[0])


def test_a_bad_drop_in_then_restart_serves_on_with_the_handed_over_config(
    rig: Rig, host: Host, deb_package: Path
) -> None:
    if installed_version(host) != __version__:  # run alone: the host has the previous release
        rig.publish([deb_package])
        host.ssh(f"{APT} update >/dev/null && {APT} install offset-relay >/dev/null", timeout=600)
    metrics = f"{DROP_INS}/60-test-metrics.toml"
    typo = f"{DROP_INS}/60-test-typo.toml"
    host.write(metrics, '[metrics]\nenabled = true\nlisten = "127.0.0.1:9477"\n')
    host.ssh("systemctl restart offset-relay")
    wait_active(host)
    load = Load((host.address, PORT), relay_key(host))
    try:
        load.set_up(3, 1)
        load.start()
        before = unit(host, "MainPID")["MainPID"]
        host.write(typo, '[limits]\nmax_connections = "many"\n')
        cursor = journal_cursor(host)
        host.ssh("systemctl restart offset-relay")  # returns once the new process is ready
        state = unit(host, "ActiveState", "MainPID", "StatusText")
        assert state["ActiveState"] == "active" and state["MainPID"] != before
        lines = journal_since(host, cursor, state["MainPID"])
        errors = [line for line in lines if "configuration not loaded" in line]
        assert errors == [
            f"ERROR configuration not loaded: {typo}: limits.max_connections: expected a number, "
            "got 'many'; serving with the configuration of the previous process (the "
            "hand-over's) until a reload or restart reads good files"
        ], lines
        assert f"INFO hand-over: {len(load.peers)} connections restored" in lines
        assert state["StatusText"].startswith(
            f"configuration not loaded, serving the hand-over's: {typo}: "
        ), state
        assert scrape(host, "offset_relay_config_last_reload_successful") == 0
        # The drop-in fixed: a reload applies the files.
        host.write(typo, "[limits]\nmax_connections = 30000\n")
        host.ssh("systemctl reload offset-relay")
        wait_for(
            "the reload to succeed",
            lambda: scrape(host, "offset_relay_config_last_reload_successful") == 1,
        )
        lines = journal_since(host, cursor, state["MainPID"])
        assert any(re.search(r"limits.max_connections \S+ -> 30000", line) for line in lines), lines
        assert not unit(host, "StatusText")["StatusText"].startswith("configuration not loaded")
        load.finish()
    finally:
        load.close()
        host.ssh(f"rm -f {typo} {metrics} && systemctl restart offset-relay")
    closed = [(p.name, p.closed) for p in load.peers if p.closed]
    assert not closed, f"{len(closed)} connections closed, first {closed[:3]}"
    for a, b in load.ends:
        assert a.sent == b.expected > 0 and b.sent == a.expected > 0, f"tunnel {a.tunnel} short"


def test_crash_keeps_the_listening_sockets_and_closes_live_connections(host: Host) -> None:
    key = relay_key(host)
    load = Load((host.address, PORT), key)
    try:
        load.set_up(1, 1)
        load.start()
        assert unit(host, "NFileDescriptorStore")["NFileDescriptorStore"] == "2"  # listen
        restarts = int(unit(host, "NRestarts")["NRestarts"])
        host.ssh("systemctl kill -s SIGKILL offset-relay", check=False)
        wait_for(
            "the crash restart", lambda: unit(host, "SubState")["SubState"] == "auto-restart", 10
        )
        # While no process runs, connects wait in the kept listening socket's backlog.
        assert unit(host, "NFileDescriptorStore")["NFileDescriptorStore"] == "2"
        probe = subprocess.run(
            [
                "python3",
                "-c",
                "import sys, socket\n"
                f"s = socket.create_connection(('{host.address}', {PORT}), timeout=30)\n"
                "s.settimeout(30)\n"
                "sys.exit(0 if len(s.recv(12)) > 0 else 1)\n",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert probe.returncode == 0, probe.stderr  # answered once the relay was back
        wait_active(host)
        assert int(unit(host, "NRestarts")["NRestarts"]) == restarts + 1
        wait_for("live connections to be closed", lambda: all(p.closed for p in load.peers), 30)
        load.finish(timeout=1)
    finally:
        load.close()


# The original node's reconnect back-off (stnode: BACKOFF_TICKS 8 ticks of TICK_MS 1000 ms):
# a node back online within it has not noticed more than one failed attempt.
ORIGINAL_BACKOFF = 8.0
CRASH_RESULTS = ROOT / "tests" / "deploy" / "crash-results.json"


def test_a_crash_mid_transfer_is_an_outage_shorter_than_the_original_node_back_off(
    host: Host,
) -> None:
    """kill -9 while 10 tunnels stream both ways: every peer sees its connection end; each
    reconnects at once, its connect waits in the kept listening socket, and it is served as
    soon as the new process runs; the outage as each side saw it is recorded."""
    load = Load((host.address, PORT), relay_key(host))
    try:
        load.set_up(10, 5)
        load.start()
        time.sleep(2)  # mid-transfer
        old_pid = unit(host, "MainPID")["MainPID"]
        killed = time.monotonic()
        host.ssh("systemctl kill -s SIGKILL offset-relay", check=False)
        wait_for("every peer to see the crash", lambda: all(p.closed for p in load.peers), 30)
        # The peers reconnect at once: the connects wait in the backlog of the listening
        # socket kept in the fd store while no process runs, and are answered by the next.
        again = Load((host.address, PORT), relay_key(host))
        try:
            again.set_up(10, 5)
            served = time.monotonic()
            again.start()
            time.sleep(1)
            again.finish()
        finally:
            again.close()
        new_pid = unit(host, "MainPID")["MainPID"]
    finally:
        load.close()
    assert new_pid != old_pid
    assert all(not p.bad for p in load.peers), [p.bad for p in load.peers if p.bad][:3]
    assert all(not p.closed for p in again.peers), [p.closed for p in again.peers][:3]
    assert all(a.expected > 0 and b.expected > 0 for a, b in again.ends)
    seen = sorted(p.closed_at - killed for p in load.peers)
    figures = {
        "tunnels": 10,
        "idle_listeners": 5,
        "peers_saw_the_close_after_s": {"first": round(seen[0], 3), "last": round(seen[-1], 3)},
        "how_peers_saw_it": sorted({p.closed or "" for p in load.peers}),
        "reconnected_and_served_after_kill_s": round(served - killed, 3),
        "original_node_backoff_s": ORIGINAL_BACKOFF,
    }
    CRASH_RESULTS.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    # Back within the original node's back-off: its first attempt after the close is the
    # one that is served (each connect above was the first, made at once, and none was
    # refused), and the unit's restart delay leaves the new process time to start in it.
    restart_delay = unit(host, "RestartUSec")["RestartUSec"]
    assert re.fullmatch(r"(\d+ms|[1-4]s|[1-4]\.\d+s)", restart_delay), restart_delay


def test_stop_empties_the_store(host: Host) -> None:
    load = Load((host.address, PORT), relay_key(host))
    try:
        load.set_up(1, 0)
        load.start()
        host.ssh("systemctl stop offset-relay")
        assert unit(host, "NFileDescriptorStore")["NFileDescriptorStore"] == "0"
        wait_for("connections to be closed", lambda: all(p.closed for p in load.peers), 10)
        load.finish(timeout=1)
    finally:
        load.close()
        host.ssh("systemctl start offset-relay")
    wait_active(host)
    assert unit(host, "NFileDescriptorStore")["NFileDescriptorStore"] == "2"
