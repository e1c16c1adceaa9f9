"""The Debian package on a real bookworm host: install, run, survive, reload, purge (issue 3).

One host serves the whole module, so the tests run in the order written: install first,
purge last. Every test that breaks something puts it back before it ends.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from offset_appliance import __version__
from tests.helpers import metric_samples

from .rig import Host, Rig

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
IDENTITY = "/var/lib/offset-relay/relay.ident"
DROP_INS = "/etc/offset-relay/relay.d"
PORT = 4567
EXPOSURE_TARGET = 1.5
APT = "DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0"


@dataclass(frozen=True)
class Installed:
    """The host after ``apt install offset-relay``, and what apt printed doing it."""

    host: Host
    apt_output: str
    missing_before: tuple[str, ...]


@pytest.fixture(scope="module")
def rig(make_rig: Callable[..., Rig], deb_package: Path) -> Rig:
    return make_rig(1, name="pkg", repo_debs=[deb_package])


@pytest.fixture(scope="module")
def installed(rig: Rig) -> Installed:
    host = rig.hosts[0]
    deps = ("python3-nacl", "python3-tomli-w", "python3-sdnotify")
    missing = tuple(d for d in deps if host.ssh(f"dpkg -s {d}", check=False).returncode != 0)
    host.ssh(f"{APT} update")
    result = host.ssh(f"{APT} install offset-relay 2>&1", check=False, timeout=600)
    assert result.returncode == 0, f"apt install failed:\n{result.stdout[-4000:]}"
    return Installed(host, result.stdout, missing)


@pytest.fixture(scope="module")
def host(installed: Installed) -> Host:
    return installed.host


@pytest.fixture(scope="module")
def ticket(host: Host, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The relay's ticket, made on the host from its identity and fetched (the private key
    stays on the host)."""
    made = host.ssh(
        "t=$(mktemp -u) && stmgr relay-ticket --address "
        f"{host.address}:{PORT} --idfile {IDENTITY} --output $t && cat $t && rm $t"
    ).stdout
    path = tmp_path_factory.mktemp("ticket") / "relay.relay"
    path.write_text(made)
    return path


# --- helpers ---------------------------------------------------------------------------


def probe(ticket: Path, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    """``stmgr probe`` from the controller, with the project's own code."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "offset_appliance.cli.stmgr",
            "probe",
            str(ticket),
            "--timeout",
            str(timeout),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=timeout + 30,
    )


def assert_probe_ok(ticket: Path) -> None:
    result = probe(ticket)
    assert result.returncode == 0, f"probe failed ({result.returncode}): {result.stderr.strip()}"
    assert result.stdout.startswith("OK relay "), result.stdout


def unit(host: Host, *props: str) -> dict[str, str]:
    """Properties of offset-relay.service, as systemctl show gives them."""
    args = " ".join(f"-p {p}" for p in props)
    out = host.ssh(f"systemctl show offset-relay.service {args}").stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def wait_for(what: str, check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(0.3)


def wait_active(host: Host) -> None:
    wait_for(
        "offset-relay to be active", lambda: unit(host, "ActiveState")["ActiveState"] == "active"
    )


def identity_digest(host: Host) -> str:
    return host.ssh(f"sha256sum {IDENTITY}").stdout.split()[0]


def journal_cursor(host: Host) -> str:
    out = host.ssh("journalctl -n 0 --show-cursor --no-pager").stdout
    match = re.search(r"-- cursor: (\S+)", out)
    assert match, out
    return match.group(1)


def journal_since(
    host: Host, cursor: str, identifier: str | None = None, *, not_pid: str | None = None
) -> list[str]:
    """Messages of offset-relay.service logged after ``cursor``: from one program if
    ``identifier`` is given, and not from process ``not_pid`` if that is given."""
    out = host.ssh(
        f"journalctl --no-pager -o json -u offset-relay.service --after-cursor='{cursor}'"
    ).stdout
    messages = []
    for line in out.splitlines():
        entry = json.loads(line)
        if not_pid is not None and entry.get("_PID") == not_pid:
            continue
        if identifier is None or entry.get("SYSLOG_IDENTIFIER") == identifier:
            message = entry.get("MESSAGE")
            messages.append(message if isinstance(message, str) else repr(message))
    return messages


@pytest.fixture
def drop_in(host: Host) -> Iterator[Callable[[str, str], None]]:
    """Write drop-ins into relay.d; removes them afterwards and brings the relay back."""
    written: list[str] = []

    def write(name: str, content: str) -> None:
        path = f"{DROP_INS}/{name}"
        host.write(path, content)
        written.append(path)

    yield write
    if written:
        host.ssh("rm -f " + " ".join(written))
        host.ssh("systemctl reset-failed offset-relay; systemctl restart offset-relay")
        wait_active(host)


# --- the package itself ------------------------------------------------------------------


def test_package_is_built_with_the_project_version(deb_package: Path, tmp_path: Path) -> None:
    fields = {
        name: subprocess.run(
            ["dpkg-deb", "-f", str(deb_package), name],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for name in ("Package", "Version", "Architecture", "Depends")
    }
    assert (fields["Package"], fields["Version"], fields["Architecture"]) == (
        "offset-relay",
        __version__,
        "all",
    )
    for dep in ("python3-nacl", "python3-tomli-w", "python3-sdnotify", "systemd"):
        assert re.search(rf"(^|, ){re.escape(dep)}\b", fields["Depends"]), fields["Depends"]
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(deb_package)], capture_output=True, text=True, check=True
    ).stdout
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    for path in (
        "/usr/bin/strelay",
        "/usr/bin/stmgr",
        "/usr/share/man/man1/strelay.1.gz",
        "/usr/share/man/man1/stmgr.1.gz",
        "/etc/offset-relay/relay.toml",
        "/etc/offset-relay/relay.d/",
        "/lib/systemd/system/offset-relay.service",
        "/usr/lib/sysusers.d/offset-relay.conf",
        "/usr/lib/python3/dist-packages/offset_appliance/relay/server.py",
    ):
        assert path in paths, f"{path} missing from the package"
    subprocess.run(["dpkg-deb", "-e", str(deb_package), str(tmp_path / "control")], check=True)
    conffiles = (tmp_path / "control" / "conffiles").read_text().split()
    assert "/etc/offset-relay/relay.toml" in conffiles


def test_lintian_reports_no_errors_or_warnings(deb_package: Path) -> None:
    result = subprocess.run(
        ["lintian", "--fail-on", "none", "--display-level", ">=warning", str(deb_package)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    findings = [line for line in result.stdout.splitlines() if line[:2] in ("E:", "W:")]
    assert findings == [], "\n".join(findings)
    # Any override must say why, in a comment just above it.
    overrides = ROOT / "packaging" / "debian" / "offset-relay.lintian-overrides"
    if overrides.exists():
        lines = overrides.read_text().splitlines()
        for number, line in enumerate(lines):
            if line.strip() and not line.startswith("#"):
                assert number > 0 and lines[number - 1].startswith("#"), line


# --- on a fresh host ---------------------------------------------------------------------


def test_host_boots_with_systemd(rig: Rig) -> None:
    host = rig.hosts[0]
    state = rig.boot_states[host.name]
    if state.failed_units:
        print(f"\n{host.name} booted {state.state}; failed units: {', '.join(state.failed_units)}")
    assert state.state in ("running", "degraded"), state
    assert host.ssh("cat /proc/1/comm").stdout.strip() == "systemd"
    assert host.ssh("systemctl is-system-running", check=False).stdout.strip() == state.state


def test_apt_install_resolves_dependencies(installed: Installed) -> None:
    # The dependencies were not on the host: apt found them in the repository, as it
    # finds them in the archive for a user.
    assert installed.missing_before == ("python3-nacl", "python3-tomli-w", "python3-sdnotify")
    for package in installed.missing_before:
        assert f"Setting up {package} " in installed.apt_output
    status = installed.host.ssh("dpkg-query -W -f '${Status} ${Version}' offset-relay").stdout
    assert status == f"install ok installed {__version__}"


def test_service_is_active_enabled_and_listening(host: Host) -> None:
    props = unit(host, "ActiveState", "SubState", "UnitFileState", "MainPID", "Type")
    assert props["ActiveState"] == "active" and props["SubState"] == "running", props
    assert props["UnitFileState"] == "enabled"
    assert props["Type"] == "notify"
    user = host.ssh(f"stat -c %U /proc/{props['MainPID']}").stdout.strip()
    assert user == "offset-relay"
    uid = host.ssh("id -u offset-relay").stdout.strip()
    # Listening sockets (state 0A) on port 4567, IPv4 and IPv6, owned by the relay's user.
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        rows = [line.split() for line in host.read(table).splitlines()[1:]]
        listening = [r for r in rows if r[1].endswith(f":{PORT:04X}") and r[3] == "0A"]
        assert listening and all(r[7] == uid for r in listening), f"nothing on {PORT} in {table}"


def test_watchdog_is_fed_by_the_relay(host: Host) -> None:
    props = unit(host, "WatchdogUSec", "WatchdogTimestampMonotonic", "NotifyAccess")
    assert props["WatchdogUSec"] == "30s" and props["NotifyAccess"] == "main", props
    # strelay pings every WatchdogSec/2 from its loop; systemd records each ping.
    wait_for(
        "a watchdog ping",
        lambda: (
            unit(host, "WatchdogTimestampMonotonic")["WatchdogTimestampMonotonic"]
            != props["WatchdogTimestampMonotonic"]
        ),
        timeout=25,
    )


def test_identity_is_private_to_the_service_user(host: Host) -> None:
    assert host.ssh(f"stat -c '%a %U %G %F' {IDENTITY}").stdout.strip() == (
        "600 offset-relay offset-relay regular file"
    )
    assert host.ssh("stat -c '%a %U' /var/lib/offset-relay").stdout.strip() == ("700 offset-relay")
    passwd = host.ssh("getent passwd offset-relay").stdout.strip().split(":")
    assert int(passwd[2]) < 1000 and passwd[6] in ("/usr/sbin/nologin", "/sbin/nologin")


def test_probe_passes_through_a_real_tunnel(host: Host, ticket: Path, tmp_path: Path) -> None:
    made = json.loads(ticket.read_text())
    assert made["address"] == f"{host.address}:{PORT}"
    assert_probe_ok(ticket)
    # The probe holds the relay to the ticket's key: the same relay under another key fails.
    other = json.loads(ticket.read_text())
    other["publicKey"] = "A" * 43
    wrong = tmp_path / "wrong.relay"
    wrong.write_text(json.dumps(other))
    assert probe(wrong).returncode == 1


# --- what the package ships for monitoring and reference ---------------------------------

DOC = "/usr/share/doc/offset-relay"
TEXTFILE = "/var/lib/prometheus/node-exporter/offset_relay_probe.prom"
HOST_TICKET = "/var/lib/offset-relay/relay.relay"


def unit_state(host: Host, name: str) -> dict[str, str]:
    """LoadState, UnitFileState, ActiveState and Result of the unit ``name``."""
    out = host.ssh(
        f"systemctl show {name} -p LoadState -p UnitFileState -p ActiveState -p Result"
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_readme_and_examples_are_installed(host: Host) -> None:
    listed = set(host.ssh("dpkg -L offset-relay").stdout.split())
    assert {
        f"{DOC}/README.md.gz",
        f"{DOC}/examples/relay.toml",
        f"{DOC}/examples/offset-relay.rules.yml",
        f"{DOC}/examples/offset-relay.json",
        "/lib/systemd/system/offset-relay-probe.service",
        "/lib/systemd/system/offset-relay-probe.timer",
    } <= listed
    # The examples are the project's files, uncompressed, as they are used.
    for local, installed in (
        ("examples/relay.toml", "relay.toml"),
        ("packaging/prometheus/offset-relay.rules.yml", "offset-relay.rules.yml"),
        ("packaging/grafana/offset-relay.json", "offset-relay.json"),
    ):
        assert host.read(f"{DOC}/examples/{installed}") == (ROOT / local).read_text()
    assert "## Monitoring" in host.ssh(f"zcat {DOC}/README.md.gz").stdout


def test_installed_rules_pass_promtool(host: Host, tmp_path: Path) -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool (Debian package prometheus) is not installed here")
    rules = tmp_path / "offset-relay.rules.yml"
    rules.write_text(host.read(f"{DOC}/examples/offset-relay.rules.yml"))
    result = subprocess.run(["promtool", "check", "rules", rules], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_probe_timer_is_installed_but_not_enabled(host: Host) -> None:
    for name in ("offset-relay-probe.timer", "offset-relay-probe.service"):
        state = unit_state(host, name)
        assert state["LoadState"] == "loaded", (name, state)
        assert state["ActiveState"] == "inactive", (name, state)
    assert unit_state(host, "offset-relay-probe.timer")["UnitFileState"] == "disabled"
    verify = host.ssh(
        "systemd-analyze verify --man=no offset-relay-probe.service offset-relay-probe.timer 2>&1",
        check=False,
    )
    assert verify.returncode == 0 and "offset-relay" not in verify.stdout, verify.stdout


def test_probe_timer_writes_metrics_where_debians_node_exporter_reads(host: Host) -> None:
    host.ssh(
        f"runuser -u offset-relay -- stmgr relay-ticket --address {host.address}:{PORT} "
        f"--idfile {IDENTITY} --output {HOST_TICKET}"
    )
    try:
        host.ssh("systemctl enable --now offset-relay-probe.timer")
        assert unit_state(host, "offset-relay-probe.timer")["ActiveState"] == "active"
        triggers = host.ssh("systemctl show -p Triggers offset-relay-probe.timer").stdout
        assert triggers.strip() == "Triggers=offset-relay-probe.service"
        # A oneshot: start returns once the probe has run and its result is in place.
        host.ssh("systemctl start offset-relay-probe.service")
        samples = metric_samples(host.read(TEXTFILE))
        label = f'{{address="{host.address}:{PORT}"}}'
        assert samples[f"offset_relay_probe_success{label}"] == 1, samples
        assert samples[f"offset_relay_probe_exit_code{label}"] == 0, samples
        assert host.ssh(f"stat -c '%a %U' {TEXTFILE}").stdout.strip() == "644 root"
        assert host.ssh("ls -A /var/lib/prometheus/node-exporter").stdout.split() == [
            "offset_relay_probe.prom"
        ]

        # An unreachable relay is a result too: success 0, and the unit did its job.
        host.ssh("systemctl stop offset-relay")
        try:
            host.ssh("systemctl start offset-relay-probe.service")
            samples = metric_samples(host.read(TEXTFILE))
            assert samples[f"offset_relay_probe_success{label}"] == 0, samples
            assert samples[f"offset_relay_probe_exit_code{label}"] == 2, samples
        finally:
            host.ssh("systemctl start offset-relay")
            wait_active(host)

        # A probe that cannot run (no ticket) fails the unit and leaves no stale result,
        # so that the alert on absent(offset_relay_probe_success) fires.
        host.ssh(f"rm {HOST_TICKET}")
        assert host.ssh("systemctl start offset-relay-probe.service", check=False).returncode != 0
        assert unit_state(host, "offset-relay-probe.service")["Result"] == "exit-code"
        assert host.ssh(f"test -e {TEXTFILE}", check=False).returncode != 0
    finally:
        host.ssh(
            "systemctl disable --now offset-relay-probe.timer; "
            "systemctl reset-failed offset-relay-probe.service; "
            f"rm -f {HOST_TICKET} {TEXTFILE}"
        )
    assert unit_state(host, "offset-relay-probe.timer")["UnitFileState"] == "disabled"


def test_restart_keeps_the_identity(host: Host, ticket: Path) -> None:
    before = identity_digest(host)
    pid = unit(host, "MainPID")["MainPID"]
    host.ssh("systemctl restart offset-relay")
    wait_active(host)
    assert unit(host, "MainPID")["MainPID"] != pid
    assert identity_digest(host) == before
    assert_probe_ok(ticket)  # the old ticket still names the relay's key


def test_reinstall_and_reconfigure_keep_the_identity(host: Host, ticket: Path) -> None:
    before = identity_digest(host)
    host.ssh(f"{APT} install --reinstall offset-relay", timeout=600)
    host.ssh("DEBIAN_FRONTEND=noninteractive dpkg-reconfigure offset-relay")
    wait_active(host)
    assert identity_digest(host) == before
    assert host.ssh(f"ls {IDENTITY}.new", check=False).returncode != 0
    assert_probe_ok(ticket)


def test_killed_relay_is_restarted(host: Host, ticket: Path) -> None:
    before = unit(host, "MainPID", "NRestarts")
    # The kill of the rest of the control group may be refused where cgroups are read-only
    # (some sandboxes); what matters is that the relay itself dies and comes back.
    host.ssh("systemctl kill -s KILL offset-relay", check=False)

    def restarted() -> bool:
        now = unit(host, "MainPID", "NRestarts", "ActiveState")
        return now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])

    wait_for("offset-relay to be restarted", restarted)
    assert int(unit(host, "NRestarts")["NRestarts"]) == int(before["NRestarts"]) + 1
    assert_probe_ok(ticket)


def test_stalled_loop_is_killed_by_the_watchdog_and_restarted(host: Host, ticket: Path) -> None:
    # A runtime unit drop-in shortens the watchdog, so that the test waits seconds, not 30.
    override = "/run/systemd/system/offset-relay.service.d"
    host.ssh(f"mkdir -p {override}")
    host.write(f"{override}/watchdog.conf", "[Service]\nWatchdogSec=3s\nTimeoutAbortSec=5s\n")
    host.ssh("systemctl daemon-reload && systemctl restart offset-relay")
    wait_active(host)
    try:
        before = unit(host, "MainPID", "NRestarts")
        cursor = journal_cursor(host)
        # SIGSTOP freezes the event loop as a wedged one would be: no WATCHDOG=1 any more.
        host.ssh(f"kill -STOP {before['MainPID']}")

        def restarted() -> bool:
            now = unit(host, "MainPID", "ActiveState")
            return now["ActiveState"] == "active" and now["MainPID"] not in ("0", before["MainPID"])

        wait_for("the watchdog to restart the relay", restarted, timeout=40)
        assert int(unit(host, "NRestarts")["NRestarts"]) == int(before["NRestarts"]) + 1
        messages = journal_since(host, cursor)
        # SIGABRT is the watchdog's signal (WatchdogSignal=); nothing else here sends it.
        assert any("with signal SIGABRT" in m for m in messages), messages
        assert_probe_ok(ticket)
    finally:
        host.ssh(f"rm -rf {override} && systemctl daemon-reload")
        host.ssh("systemctl reset-failed offset-relay; systemctl restart offset-relay")
        wait_active(host)


def test_reload_applies_a_new_log_level(
    host: Host, ticket: Path, drop_in: Callable[[str, str], None]
) -> None:
    pid = unit(host, "MainPID")["MainPID"]
    cursor = journal_cursor(host)
    drop_in("50-test-debug.toml", 'log_level = "debug"\n')
    host.ssh("systemctl reload offset-relay")
    wait_for(
        "the relay to log the reload",
        lambda: any("configuration reloaded" in m for m in journal_since(host, cursor)),
    )
    assert unit(host, "MainPID")["MainPID"] == pid  # reloaded in place, not restarted
    assert not any(m.startswith("DEBUG") for m in journal_since(host, cursor, "strelay"))
    assert_probe_ok(ticket)
    # The probe's connections, logged at debug level only: the new level is in force.
    wait_for(
        "debug messages about the probe's connections",
        lambda: any(m.startswith("DEBUG") for m in journal_since(host, cursor, "strelay")),
    )


_FETCH = (
    "import urllib.request as u; "
    'print(u.urlopen("http://127.0.0.1:9477/metrics", timeout=5).read().decode())'
)


def _scrape(host: Host) -> dict[str, float]:
    """The relay's /metrics, read on the host (the endpoint listens on loopback)."""
    return metric_samples(host.ssh(f"python3 -c {_FETCH!r}").stdout)


def test_reload_with_a_bad_config_fails_and_the_relay_says_so(
    host: Host, ticket: Path, drop_in: Callable[[str, str], None]
) -> None:
    """A bad drop-in fails ``systemctl reload``; the running relay, which hears of it all the
    same, keeps every old setting and reports it in its log, STATUS= and /metrics."""
    drop_in("40-test-metrics.toml", "[metrics]\nenabled = true\n")
    host.ssh("systemctl restart offset-relay")  # the metrics endpoint takes a restart
    wait_active(host)
    wait_for(
        "the metrics endpoint",
        lambda: host.ssh(f"python3 -c {_FETCH!r}", check=False).returncode == 0,
    )
    assert _scrape(host)["offset_relay_config_last_reload_successful"] == 1
    pid = unit(host, "MainPID")["MainPID"]
    cursor = journal_cursor(host)
    bad = f"{DROP_INS}/90-test-bad.toml"
    # A good change and a bad one in the same file: neither is applied.
    drop_in(
        "90-test-bad.toml", 'log_level = "debug"\n[limits]\nmax_half_tunnels_per_listener = 5000\n'
    )
    reload = host.ssh("systemctl reload offset-relay", check=False)
    assert reload.returncode != 0, reload.stdout + reload.stderr
    wait_for(
        "the relay to refuse the reload",
        lambda: any("reload failed" in m for m in journal_since(host, cursor, "strelay")),
    )
    relay_lines = [
        m for m in journal_since(host, cursor, "strelay") if "reload failed, keeping" in m
    ]
    assert len(relay_lines) == 1, relay_lines
    assert f"{bad}: limits.max_half_tunnels_per_listener: must be between" in relay_lines[0]
    props = unit(host, "MainPID", "ActiveState", "StatusText")
    assert (props["MainPID"], props["ActiveState"]) == (pid, "active")
    assert props["StatusText"].startswith(f"reload failed: {bad}: limits.max_half_tunnels")
    values = _scrape(host)
    assert values["offset_relay_config_last_reload_successful"] == 0
    since = values["offset_relay_config_last_reload_success_timestamp_seconds"]
    # The old log level is still in force: the probe's connections log nothing at debug.
    assert_probe_ok(ticket)
    assert not any(m.startswith("DEBUG") for m in journal_since(host, cursor, "strelay"))

    # Fixed: the reload goes through, the metric says so, the new level applies.
    cursor = journal_cursor(host)
    host.write(bad, 'log_level = "debug"\n')
    host.ssh("systemctl reload offset-relay")
    wait_for(
        "the relay to log the reload",
        lambda: any("configuration reloaded" in m for m in journal_since(host, cursor)),
    )
    changes = [m for m in journal_since(host, cursor, "strelay") if " -> " in m]
    assert len(changes) == 1 and changes[0].endswith("reload: log_level info -> debug"), changes
    values = _scrape(host)
    assert values["offset_relay_config_last_reload_successful"] == 1
    assert values["offset_relay_config_last_reload_success_timestamp_seconds"] > since
    assert not unit(host, "StatusText")["StatusText"].startswith("reload failed")
    assert unit(host, "MainPID")["MainPID"] == pid
    assert_probe_ok(ticket)


def test_unknown_key_fails_once_without_a_restart_loop(
    host: Host, drop_in: Callable[[str, str], None]
) -> None:
    # A stop empties the fd store: the start has no hand-over to fall back on (a restart
    # would serve on with the handed-over configuration, tests/deploy/test_restart.py).
    host.ssh("systemctl stop offset-relay")
    cursor = journal_cursor(host)
    old_pid = unit(host, "MainPID")["MainPID"]
    drop_in("90-test-unknown.toml", "no_such_key = 1\n")
    assert host.ssh("systemctl start offset-relay", check=False).returncode != 0
    props = unit(host, "ActiveState", "Result", "ExecMainStatus", "NRestarts")
    assert props == {
        "ActiveState": "failed",
        "Result": "exit-code",
        "ExecMainStatus": "78",
        "NRestarts": "0",
    }
    # What the new process said, without the running relay's farewell.
    messages = journal_since(host, cursor, "strelay", not_pid=old_pid)
    assert messages == [f"strelay: {DROP_INS}/90-test-unknown.toml: unknown key 'no_such_key'"], (
        messages
    )
    # Well past RestartSec=: a restart loop would have started again by now.
    time.sleep(5)
    props = unit(host, "ActiveState", "NRestarts")
    assert props == {"ActiveState": "failed", "NRestarts": "0"}
    assert journal_since(host, cursor, "strelay", not_pid=old_pid) == messages


def test_unit_is_hardened_to_the_target_exposure(
    host: Host, capsys: pytest.CaptureFixture[str]
) -> None:
    report = host.ssh("systemd-analyze security --no-pager offset-relay.service").stdout
    match = re.search(r"Overall exposure level for offset-relay\.service: ([\d.]+)", report)
    assert match, report
    exposure = float(match.group(1))
    with capsys.disabled():  # shown in every run, not only when the test fails
        print(f"\nsystemd-analyze security offset-relay.service: exposure {exposure}")
        print("\n".join(line for line in report.splitlines() if line.startswith("✗")))
    assert exposure <= EXPOSURE_TARGET
    verify = host.ssh("systemd-analyze verify --man=no offset-relay.service 2>&1", check=False)
    assert verify.returncode == 0 and "offset-relay" not in verify.stdout, verify.stdout


def test_memory_deny_write_execute_is_enforced_and_the_relay_works(
    host: Host, ticket: Path
) -> None:
    assert unit(host, "MemoryDenyWriteExecute")["MemoryDenyWriteExecute"] == "yes"
    # The setting really is enforced here: W+X memory is refused under it...
    wx = "import mmap; mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)"
    denied = host.ssh(
        f'systemd-run --quiet --wait --pipe -p MemoryDenyWriteExecute=yes python3 -c "{wx}"',
        check=False,
    )
    assert denied.returncode != 0 and "PermissionError" in denied.stderr, denied.stderr
    allowed = host.ssh(f'systemd-run --quiet --wait --pipe python3 -c "{wx}"', check=False)
    assert allowed.returncode == 0, allowed.stderr
    # ...and the relay, whose handshakes run on PyNaCl, works under it.
    assert_probe_ok(ticket)


def test_relay_dumps_no_core_and_has_a_memory_ceiling(host: Host) -> None:
    props = unit(host, "LimitCORE", "MemoryMax", "MainPID")
    assert props["LimitCORE"] == "0"
    assert props["MemoryMax"] == str(2 << 30)
    pid = props["MainPID"]
    core = next(
        line for line in host.read(f"/proc/{pid}/limits").splitlines() if "core file" in line
    )
    assert core.split()[4:6] == ["0", "0"], core
    # Not dumpable (prctl): the kernel gives the process's /proc files to root, not to
    # the service user it runs as.
    owner = host.ssh(f"stat -c %U /proc/{pid}/environ").stdout.strip()
    assert owner == "root"


# Frees most of 100 MB of heap blocks (one kept at the top, so the heap cannot simply
# shrink), then asks glibc to give the free pages back, as the relay does over its ceiling.
TRIM = """
import ctypes
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
blocks = [bytes(1000) + bytes([n % 256]) for n in range(100000)]
keep = blocks[-1]
del blocks
before = rss()
ctypes.CDLL(None).malloc_trim(0)
print(before, rss())
"""


def test_the_default_memory_ceiling_is_said_at_start_and_trims_under_the_unit_filters(
    host: Host,
) -> None:
    # The start line names the ceiling and what it came from: the unit's group where the
    # host enforces MemoryMax, the machine's memory where it does not (a test host on a
    # machine whose cgroups are hybrid v1 does not: it has no memory group of its own), read
    # with /proc/meminfo hidden by ProcSubset=pid.
    lines = host.ssh(
        "journalctl -u offset-relay -b -o cat --no-pager | grep 'memory ceiling [0-9o]'"
    ).stdout
    last = lines.strip().splitlines()[-1]
    limit = host.ssh(
        "cat /sys/fs/cgroup/system.slice/offset-relay.service/memory.max"
        " /sys/fs/cgroup/memory/system.slice/offset-relay.service/memory.limit_in_bytes"
        " 2>/dev/null | head -1",
        check=False,
    ).stdout.strip()
    if limit == str(2 << 30):
        assert (
            "memory ceiling 1638.4 MiB of resident memory (auto: 80 % of 2048.0 MiB, the memory"
            in last
        ), last
    else:
        assert "(auto: 80 % of " in last and "the machine's memory" in last, (limit, last)
    # malloc_trim, which the ceiling relies on to give memory back, works under the unit's
    # system call filter (a filtered call would fail with EPERM and give nothing back).
    unit_text = host.ssh("systemctl cat offset-relay").stdout
    filters = [line.strip() for line in unit_text.splitlines() if line.startswith("SystemCall")]
    assert len(filters) == 4, filters
    properties = " ".join(f"-p {_quote(line)}" for line in filters)
    result = host.ssh(
        f"systemd-run --quiet --wait --pipe -p NoNewPrivileges=yes {properties} "
        f"python3 -c {_quote(TRIM)}"
    )
    before, after = map(int, result.stdout.split())
    assert before > 90_000_000 and after < before // 4, (before, after)


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def test_open_file_limit_is_raised(host: Host) -> None:
    configured = int(unit(host, "LimitNOFILE")["LimitNOFILE"])
    assert configured >= 65536
    pid = unit(host, "MainPID")["MainPID"]

    def nofile(pid: str) -> tuple[int, int]:
        line = next(
            x
            for x in host.read(f"/proc/{pid}/limits").splitlines()
            if x.startswith("Max open files")
        )
        soft, hard = line.split()[3:5]
        return int(soft), int(hard)

    # systemd cannot raise a limit above its own hard limit (a sandboxed controller may
    # cap the container's), so expect the configured value up to that ceiling.
    ceiling = nofile("1")[1]
    assert nofile(pid) == (min(configured, ceiling), min(configured, ceiling))


def test_remove_keeps_the_identity_and_purge_removes_it(host: Host, ticket: Path) -> None:
    before = identity_digest(host)
    # The probe's timer, once the operator has started it, goes with the package.
    host.ssh("systemctl enable --now offset-relay-probe.timer")
    host.ssh(f"{APT} remove offset-relay", timeout=600)
    assert host.ssh("systemctl is-active offset-relay", check=False).stdout.strip() != "active"
    assert unit_state(host, "offset-relay-probe.timer")["ActiveState"] == "inactive"
    assert identity_digest(host) == before
    assert host.ssh("getent passwd offset-relay", check=False).returncode == 0

    host.ssh(f"{APT} install offset-relay", timeout=600)
    wait_active(host)
    assert identity_digest(host) == before
    assert_probe_ok(ticket)

    host.ssh(f"{APT} purge offset-relay", timeout=600)
    left = host.ssh(
        "ls -d /var/lib/offset-relay /etc/offset-relay /lib/systemd/system/offset-relay.service"
        " 2>/dev/null; getent passwd offset-relay; getent group offset-relay; true"
    ).stdout
    assert left == ""
    assert host.ssh("dpkg -s offset-relay", check=False).returncode != 0
    assert probe(ticket, timeout=3).returncode == 2
    wants = host.ssh("ls /etc/systemd/system/timers.target.wants/ 2>/dev/null; true").stdout
    assert "offset-relay-probe" not in wants


def test_install_from_the_deb_file_makes_a_new_identity_after_purge(
    host: Host, ticket: Path, deb_package: Path, tmp_path: Path
) -> None:
    # The way an operator given only the .deb installs it; apt still fetches dependencies.
    host.put(deb_package, f"/root/{deb_package.name}")
    host.ssh(f"{APT} install /root/{deb_package.name}", timeout=600)
    wait_active(host)
    assert host.ssh(f"stat -c '%a %U' {IDENTITY}").stdout.strip() == "600 offset-relay"
    # Purge took the old identity with it: the old ticket no longer names this relay.
    assert probe(ticket).returncode == 1
    fresh = tmp_path / "fresh.relay"
    fresh.write_text(
        host.ssh(
            f"stmgr relay-ticket --address {host.address}:{PORT} --idfile {IDENTITY} "
            "--output /root/fresh.relay && cat /root/fresh.relay"
        ).stdout
    )
    assert_probe_ok(fresh)


def test_identity_is_made_by_the_service_user_and_root_follows_no_link(host: Host) -> None:
    # The service user owns the state directory. While the package makes a missing
    # identity, a process of that user swaps every file it can for a symbolic link to a
    # root-owned file: root must never write, chown or chmod through one.
    host.ssh("install -m 0644 /dev/null /root/target && echo untouched > /root/target")
    host.ssh("systemctl stop offset-relay")
    host.ssh(f"rm -f {IDENTITY}")
    swapper = (
        "setpriv --reuid=offset-relay --regid=offset-relay --clear-groups -- sh -c '"
        "cd /var/lib/offset-relay; end=$(( $(date +%s) + 20 )); "
        "while [ $(date +%s) -lt $end ]; do for f in relay.ident.new relay.ident.new.tmp; do "
        "[ -L $f ] || { [ -e $f ] && ln -sfn /root/target $f; }; done; done' "
        ">/dev/null 2>&1 & echo $!"
    )
    pid = host.ssh(swapper).stdout.strip()
    try:
        host.ssh("DEBIAN_FRONTEND=noninteractive dpkg-reconfigure offset-relay", check=False)
    finally:
        host.ssh(f"kill {pid} 2>/dev/null; true")
    assert host.ssh("stat -c '%a %U %G' /root/target").stdout.strip() == "644 root root"
    assert host.read("/root/target").strip() == "untouched"
    # Whatever the swapper did, a clean run gives a private regular identity again.
    host.ssh(f"[ -L {IDENTITY} ] && rm -f {IDENTITY}; rm -f {IDENTITY}.new; true")
    host.ssh(f"[ -f {IDENTITY} ] || DEBIAN_FRONTEND=noninteractive dpkg-reconfigure offset-relay")
    host.ssh("systemctl restart offset-relay")
    wait_active(host)
    assert host.ssh(f"stat -c '%a %U %F' {IDENTITY}").stdout.strip() == (
        "600 offset-relay regular file"
    )


def test_purge_keeps_an_account_that_existed_before_the_package(
    host: Host, deb_package: Path
) -> None:
    host.ssh(f"{APT} purge offset-relay", timeout=600)
    host.ssh(
        "groupadd --system offset-relay && useradd --system --gid offset-relay "
        "--home-dir /nonexistent --shell /usr/sbin/nologin offset-relay"
    )
    try:
        host.ssh(f"{APT} install /root/{deb_package.name}", timeout=600)
        wait_active(host)
        host.ssh(f"{APT} purge offset-relay", timeout=600)
        assert host.ssh("getent passwd offset-relay", check=False).returncode == 0
        assert host.ssh("getent group offset-relay", check=False).returncode == 0
        assert host.ssh("ls -d /etc/offset-relay", check=False).returncode != 0
    finally:
        host.ssh("userdel offset-relay; groupdel offset-relay; true", check=False)
