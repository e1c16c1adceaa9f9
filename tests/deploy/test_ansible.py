"""``ansible-playbook deploy-relay.yml`` on two freshly booted bookworm hosts (issue 4).

The controller side is a copy of ``ansible/`` with an inventory of the rig's hosts, used
the way the README tells an operator to. The hosts reach the package through the apt
source they already have (the rig's local repository). The module deploys once, then does
what an operator does next, in the order written: run again, run in check mode, lint,
check the hosts with testinfra, use the tickets, move a relay to another address, change
and break its settings, reinstall a relay from a .deb file, and point a ticket at nothing.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from offset_appliance.config import Config

from .conftest import make_signed_repo
from .rig import NET_PREFIX, Host, Rig, run

pytestmark = pytest.mark.deploy

ROOT = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = ROOT / "ansible"
TESTINFRA_DIR = Path(__file__).resolve().parent / "testinfra"
README = ROOT / "README.md"
# The controller's tools: the ones installed beside the interpreter running the tests.
BIN = Path(sys.executable).parent
PORT = 4567
TICKET_ON_HOST = "/var/lib/offset-relay/relay.relay"
IDENTITY_ON_HOST = "/var/lib/offset-relay/relay.ident"
APT_KEYRING = "/etc/apt/keyrings/offset-relay.asc"
# Debian's own ansible-core package (bookworm: 2.14), which tools/install-deps installs.
DEBIAN_ANSIBLE_PLAYBOOK = Path("/usr/bin/ansible-playbook")
APT_SOURCES = "/etc/apt/sources.list.d/offset-relay.sources"
OLD_APT_SOURCES = "/etc/apt/sources.list.d/offset-relay.list"

_TASK = re.compile(r"^(?:TASK|RUNNING HANDLER) \[(?:[^]:]+ : )?(.+?)\] \**$")
_RESULT = re.compile(r"^(changed|ok|skipping|fatal|failed): \[([^]\s]+)")
_RECAP = re.compile(
    r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+"
    r"skipped=(\d+)\s+rescued=(\d+)\s+ignored=(\d+)"
)
_RECAP_FIELDS = ("ok", "changed", "unreachable", "failed", "skipped", "rescued", "ignored")


@dataclass(frozen=True)
class PlaybookRun:
    """One ``ansible-playbook`` run: its exit status, output, recap and changed tasks."""

    returncode: int
    output: str
    recap: dict[str, dict[str, int]]
    changed: frozenset[tuple[str, str]]

    @classmethod
    def parse(cls, returncode: int, output: str) -> PlaybookRun:
        """Read the default callback's output: task headers, per-host results, recap."""
        recap: dict[str, dict[str, int]] = {}
        changed: set[tuple[str, str]] = set()
        task = ""
        for line in output.splitlines():
            if match := _TASK.match(line):
                task = match.group(1)
            elif match := _RESULT.match(line):
                if match.group(1) == "changed":
                    changed.add((match.group(2), task))
            elif match := _RECAP.match(line):
                counts = (int(n) for n in match.groups()[1:])
                recap[match.group(1)] = dict(zip(_RECAP_FIELDS, counts, strict=True))
        return cls(returncode, output, recap, frozenset(changed))

    def tail(self) -> str:
        return self.output[-6000:]

    def assert_clean(self, hosts: list[str]) -> None:
        """Succeeded on every host, changed nothing, failed nothing."""
        assert self.returncode == 0, self.tail()
        assert set(self.recap) == set(hosts), self.tail()
        for name, counts in self.recap.items():
            assert counts["failed"] == counts["unreachable"] == 0, (name, self.tail())
            assert counts["changed"] == 0, (name, sorted(self.changed), self.tail())


@dataclass(frozen=True)
class Controller:
    """The operator's machine: a copy of ``ansible/`` and an inventory of the rig's hosts."""

    rig: Rig
    directory: Path
    host_vars: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [host.name for host in self.rig.hosts]

    def write_inventory(self) -> None:
        """inventory/relays.yml, the file ansible.cfg reads (JSON is YAML too)."""
        inventory = {
            "relays": {
                "hosts": {
                    host.name: {"ansible_host": host.address, **self.host_vars.get(host.name, {})}
                    for host in self.rig.hosts
                },
                "vars": {
                    "ansible_user": "root",
                    "ansible_ssh_private_key_file": str(self.rig.key),
                    "ansible_ssh_common_args": f"-F {self.rig.ssh_config}",
                    "ansible_python_interpreter": "/usr/bin/python3",
                },
            }
        }
        (self.directory / "inventory" / "relays.yml").write_text(json.dumps(inventory, indent=2))

    def playbook(
        self, *args: str, ansible_playbook: Path = BIN / "ansible-playbook"
    ) -> PlaybookRun:
        """``ansible-playbook deploy-relay.yml ARGS`` in the copy, as the README says (by
        default the ansible-core of the test dependencies)."""
        self.write_inventory()
        env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_FORCE_COLOR": "0",
            "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.default",
        }
        result = subprocess.run(
            [ansible_playbook, "deploy-relay.yml", *args],
            cwd=self.directory,
            env=env,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=600,
        )
        return PlaybookRun.parse(result.returncode, result.stdout + result.stderr)

    def ticket(self, host: Host) -> Path:
        return self.directory / "tickets" / f"{host.name}.relay"


@dataclass(frozen=True)
class Deployment:
    """The hosts after the first ``ansible-playbook`` run, and that run."""

    controller: Controller
    first_run: PlaybookRun

    @property
    def hosts(self) -> list[Host]:
        return self.controller.rig.hosts


def copy_ansible_dir(into: Path) -> Path:
    """A pristine copy of ``ansible/``, without an operator's inventory or tickets."""
    return Path(
        shutil.copytree(
            ANSIBLE_DIR,
            into,
            ignore=shutil.ignore_patterns("tickets", "relays.yml", "*.retry"),
        )
    )


def public_key_on_host(host: Host) -> str:
    """The identity's public key, as stmgr derives it on the host (the key stays there)."""
    script = (
        "set -eu; d=$(mktemp -d); trap 'rm -rf \"$d\"' EXIT; "
        f"PYTHONDONTWRITEBYTECODE=1 stmgr relay-ticket --address 127.0.0.1:1 "
        f'--idfile {IDENTITY_ON_HOST} --output "$d/t"; cat "$d/t"'
    )
    return json.loads(host.ssh(script).stdout)["publicKey"]


def probe(ticket: Path) -> subprocess.CompletedProcess[str]:
    """The controller's ``stmgr probe`` through a ticket."""
    return subprocess.run(
        [BIN / "stmgr", "probe", ticket, "--timeout", "10"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )


def assert_probe_passes(ticket: Path) -> None:
    result = probe(ticket)
    assert result.returncode == 0, f"probe exit {result.returncode}: {result.stderr.strip()}"


def unit_state(host: Host) -> dict[str, str]:
    """What tells whether the relay was restarted: its main process and when it started."""
    out = host.ssh(
        "systemctl show offset-relay.service -p MainPID -p ExecMainStartTimestampMonotonic"
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


@pytest.fixture(scope="module")
def deployment(
    make_rig: Callable[..., Rig], deb_package: Path, tmp_path_factory: pytest.TempPathFactory
) -> Deployment:
    # Ansible's apt module needs python3-apt on the host and installs it itself from the
    # host's apt sources, which on a real host reach the Debian archive.
    rig = make_rig(2, name="ansible", repo_debs=[deb_package], repo_packages=["python3-apt"])
    directory = copy_ansible_dir(tmp_path_factory.mktemp("controller") / "ansible")
    controller = Controller(rig, directory)
    return Deployment(controller, controller.playbook())


# --- the first run, and runs that must change nothing --------------------------------------


def relay_journals(hosts: list[Host]) -> str:
    """The relay's recent journal on each host, to show why a run failed."""
    parts = []
    for host in hosts:
        journal = host.ssh(
            "journalctl -u offset-relay.service -n 40 --no-pager -o cat", check=False
        )
        parts.append(f"--- {host.name}: journalctl -u offset-relay.service\n{journal.stdout}")
    return "\n".join(parts)


def test_deploy_succeeds_on_bare_hosts(deployment: Deployment) -> None:
    run_ = deployment.first_run
    assert run_.returncode == 0, run_.tail() + relay_journals(deployment.hosts)
    names = deployment.controller.names
    assert set(run_.recap) == set(names), run_.tail()
    for name in names:
        assert run_.recap[name]["failed"] == run_.recap[name]["unreachable"] == 0
        assert (name, "Install offset-relay from the apt sources") in run_.changed
        assert (name, "Write the relay's settings drop-in") in run_.changed
        assert (name, "Make the relay's ticket for its public address") in run_.changed
        assert (name, "Write the ticket on the controller") in run_.changed


def test_relays_change_one_at_a_time_and_are_probed_from_the_controller(
    deployment: Deployment,
) -> None:
    output = deployment.first_run.output
    # serial: 1 by default, one play batch per relay.
    assert output.count("PLAY [Deploy Offset relays]") == len(deployment.hosts), output
    for host in deployment.hosts:
        assert f"ok: [{host.name} -> localhost]" in output
    assert "Probe the relay through its ticket, from the host" in output
    at_once = deployment.controller.playbook("-e", "offset_relay_serial=100%")
    at_once.assert_clean(deployment.controller.names)
    assert at_once.output.count("PLAY [Deploy Offset relays]") == 1, at_once.tail()


def test_second_run_changes_nothing(deployment: Deployment) -> None:
    deployment.controller.playbook().assert_clean(deployment.controller.names)


def test_check_mode_with_diff_is_clean(deployment: Deployment) -> None:
    run_ = deployment.controller.playbook("--check", "--diff")
    run_.assert_clean(deployment.controller.names)
    assert "--- before" not in run_.output, run_.tail()


def test_tags_select_one_concern(deployment: Deployment) -> None:
    run_ = deployment.controller.playbook("--tags", "offset_relay_ticket")
    run_.assert_clean(deployment.controller.names)
    assert "TASK [offset_relay : Make the relay's ticket for its public address]" in run_.output
    for other in ("Install offset-relay from the apt sources", "Write the relay's settings"):
        assert other not in run_.output, run_.tail()


def test_role_passes_ansible_lint_production_profile(tmp_path: Path) -> None:
    # On a copy: ansible-lint keeps a cache in the project it lints.
    directory = copy_ansible_dir(tmp_path / "ansible")
    result = subprocess.run(
        [
            BIN / "ansible-lint",
            "--offline",
            "--profile",
            "production",
            "deploy-relay.yml",
            "roles/offset_relay",
        ],
        cwd=directory,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Profile 'production' was required, and it passed" in output, output[-4000:]


# --- the hosts, checked by testinfra -----------------------------------------------------


def test_testinfra_checks_pass_on_every_host(deployment: Deployment) -> None:
    # The README's command, through the operator's inventory.
    inventory = deployment.controller.directory / "inventory" / "relays.yml"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-v",
            "-p",
            "no:cacheprovider",
            # Only the checks' own conftest: they do not need the rig's fixtures.
            f"--confcutdir={TESTINFRA_DIR}",
            "--hosts=ansible://relays",
            f"--ansible-inventory={inventory}",
            str(TESTINFRA_DIR),
        ],
        cwd=ROOT,
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert re.search(r"=+ \d+ passed in ", summary), summary
    for host in deployment.hosts:
        assert f"[ansible://{host.name}] PASSED" in result.stdout, result.stdout[-6000:]


# --- the tickets ---------------------------------------------------------------------------


def test_tickets_arrived_on_the_controller(deployment: Deployment) -> None:
    keys = set()
    for host in deployment.hosts:
        ticket = json.loads(deployment.controller.ticket(host).read_text())
        assert ticket == {
            "publicKey": public_key_on_host(host),
            "address": f"{host.address}:{PORT}",
        }
        keys.add(ticket["publicKey"])
    assert len(keys) == len(deployment.hosts)


def test_scp_of_a_ticket_works_as_the_readme_says(deployment: Deployment, tmp_path: Path) -> None:
    readme = README.read_text()
    assert f":{TICKET_ON_HOST} " in readme and "scp root@" in readme
    host = deployment.hosts[0]
    copy = tmp_path / "relay1.relay"
    run(
        [
            "scp",
            "-F",
            deployment.controller.rig.ssh_config,
            f"root@{host.address}:{TICKET_ON_HOST}",
            copy,
        ]
    )
    assert copy.read_bytes() == deployment.controller.ticket(host).read_bytes()


def test_probe_passes_through_both_tickets(deployment: Deployment) -> None:
    for host in deployment.hosts:
        assert_probe_passes(deployment.controller.ticket(host))


# --- changes an operator makes -------------------------------------------------------------


def test_new_public_address_remakes_only_that_ticket(deployment: Deployment) -> None:
    controller = deployment.controller
    kept, moved = deployment.hosts
    # A second address on the moved host's interface, as if it got a new public address.
    subnet = moved.address.rsplit(".", 1)[0]
    assert subnet.startswith(NET_PREFIX)
    new_address = f"{subnet}.200:{PORT}"
    run(["ip", "-n", moved.netns, "addr", "add", f"{subnet}.200/24", "dev", "host0"])
    kept_ticket = controller.ticket(kept).read_bytes()
    old_ticket = json.loads(controller.ticket(moved).read_text())
    units = {host.name: unit_state(host) for host in deployment.hosts}

    controller.host_vars[moved.name] = {"offset_relay_public_address": new_address}
    run_ = controller.playbook()

    assert run_.returncode == 0, run_.tail()
    assert run_.recap[kept.name]["changed"] == 0, sorted(run_.changed)
    assert {host for host, _ in run_.changed} == {moved.name}
    assert {task for _, task in run_.changed} == {
        "Remove the outdated ticket (stmgr never overwrites one)",
        "Make the relay's ticket for its public address",
        "Write the ticket on the controller",
    }
    assert controller.ticket(kept).read_bytes() == kept_ticket
    new_ticket = json.loads(controller.ticket(moved).read_text())
    assert new_ticket == {"publicKey": old_ticket["publicKey"], "address": new_address}
    assert json.loads(moved.read(TICKET_ON_HOST)) == new_ticket
    # A ticket is not the relay's business: neither relay was restarted.
    assert {host.name: unit_state(host) for host in deployment.hosts} == units
    assert_probe_passes(controller.ticket(moved))
    # The next run, probing from the controller this time, finds everything in place.
    again = controller.playbook(
        "-e",
        "offset_relay_verify_from_controller=true",
        "-e",
        f"offset_relay_controller_stmgr={BIN / 'stmgr'}",
    )
    again.assert_clean(controller.names)
    for host in deployment.hosts:
        assert f"ok: [{host.name} -> localhost]" in again.output, again.tail()


def test_settings_change_restarts_only_that_relay(deployment: Deployment) -> None:
    controller = deployment.controller
    changed, untouched = deployment.hosts
    units = {host.name: unit_state(host) for host in deployment.hosts}
    controller.host_vars[changed.name] = {
        "offset_relay_log_level": "debug",
        "offset_relay_limits": {"max_connections_per_ip": 64},
        "offset_relay_timeouts": {"keepalive": 30},
        "offset_relay_metrics_enabled": True,
    }

    run_ = controller.playbook()

    assert run_.returncode == 0, run_.tail() + relay_journals([changed])
    # The metrics endpoint needs a restart; the other settings alone would be reloaded.
    assert run_.changed == {
        (changed.name, "Write the relay's settings drop-in"),
        (changed.name, "Restart instead of reload when the listen addresses or metrics change"),
        (changed.name, "Restart offset-relay"),
    }, run_.tail()
    drop_in = changed.read("/etc/offset-relay/relay.d/50-ansible.toml")
    assert 'log_level = "debug"' in drop_in
    assert "max_connections_per_ip = 64" in drop_in
    assert "keepalive = 30.0" in drop_in
    assert '[metrics]\nenabled = true\nlisten = "127.0.0.1:9477"' in drop_in
    assert unit_state(changed)["MainPID"] != units[changed.name]["MainPID"]
    assert unit_state(untouched) == units[untouched.name]
    fetch = (
        "import urllib.request as r; "
        "print(r.urlopen('http://127.0.0.1:9477/metrics', timeout=5).read().decode())"
    )
    metrics = changed.ssh(f"python3 -c {shlex.quote(fetch)}").stdout
    assert "# TYPE offset_relay_" in metrics


def test_limits_and_log_level_change_by_reload(deployment: Deployment) -> None:
    """What SIGHUP applies is reloaded: the relay keeps its process and its connections."""
    controller = deployment.controller
    changed = deployment.hosts[0]
    settings = controller.host_vars.get(changed.name, {})
    unit = unit_state(changed)
    controller.host_vars[changed.name] = {
        **settings,
        "offset_relay_log_level": "info",
        "offset_relay_limits": {"max_connections_per_ip": 32},
    }

    run_ = controller.playbook("--limit", changed.name)

    assert run_.returncode == 0, run_.tail()
    assert run_.changed == {
        (changed.name, "Write the relay's settings drop-in"),
        (changed.name, "Reload offset-relay"),
    }, run_.tail()
    assert unit_state(changed)["MainPID"] == unit["MainPID"]
    journal = changed.ssh("journalctl -u offset-relay.service -n 30 --no-pager -o cat").stdout
    assert "configuration reloaded" in journal, journal


# The controls of who uses the relay, each set by its variable, generous enough that the
# play's own probe still passes (it listens and connects with keys of its own).
CONTROLS = {
    "offset_relay_access": {
        "connect_deny": ["9s1Yw3Y3nBL0hHN3lTxsVr2O8TmTjmBkS5oDq8yRcnA"],
        "ip_deny": ["198.51.100.0/24", "2001:db8:dead::/48"],
    },
    "offset_relay_bandwidth": {"key_rate": 50000000, "total_rate": 500000000},
    "offset_relay_budgets": {"key_monthly": 10**12, "action": "refuse", "save_interval": 30},
    "offset_relay_bans": {"enabled": True, "threshold": 500, "window": 60},
    "offset_relay_limits": {"max_connections_per_ip": 32, "ipv6_prefix": 56},
}
CONTROLS_IN_CONFIG = {"access", "bandwidth", "budgets", "bans"} <= set(Config.__dataclass_fields__)


@pytest.mark.skipif(
    not CONTROLS_IN_CONFIG,
    reason="the relay's configuration has no [access], [bandwidth], [budgets], [bans] yet",
)
def test_the_controls_are_set_by_their_variables_and_reloaded(deployment: Deployment) -> None:
    """offset_relay_access, _bandwidth, _budgets, _bans and the new [limits] keys reach the
    relay by reload (same process), each change logged; a wrong type fails the play at
    argument validation, before anything is written."""
    controller = deployment.controller
    changed = deployment.hosts[0]
    settings = controller.host_vars.get(changed.name, {})
    unit = unit_state(changed)
    cursor = changed.ssh("journalctl -n 0 --show-cursor --no-pager -o cat").stdout.split()[-1]
    controller.host_vars[changed.name] = {**settings, **CONTROLS}

    run_ = controller.playbook("--limit", changed.name)

    assert run_.returncode == 0, run_.tail() + relay_journals([changed])
    assert run_.changed == {
        (changed.name, "Write the relay's settings drop-in"),
        (changed.name, "Reload offset-relay"),
    }, run_.tail()
    assert unit_state(changed)["MainPID"] == unit["MainPID"]
    drop_in = changed.read("/etc/offset-relay/relay.d/50-ansible.toml")
    for table in ("[access]", "[bandwidth]", "[budgets]", "[bans]"):
        assert table in drop_in, drop_in
    assert 'action = "refuse"' in drop_in and "save_interval = 30.0" in drop_in
    assert "enabled = true" in drop_in and "ipv6_prefix = 56" in drop_in
    journal = changed.ssh(
        f"journalctl -u offset-relay.service --after-cursor={shlex.quote(cursor)} --no-pager -o cat"
    ).stdout
    for line in (
        "reload: bandwidth.key_rate 0 -> 50000000",
        "reload: budgets.action throttle -> refuse",
        "reload: bans.enabled false -> true",
        "reload: limits.ipv6_prefix 64 -> 56",
    ):
        assert line in journal, journal

    controller.host_vars[changed.name] = {
        **settings,
        **CONTROLS,
        "offset_relay_budgets": {"action": "drop"},
    }
    refused = controller.playbook("--limit", changed.name)
    assert refused.returncode != 0
    assert "action" in refused.output and "throttle, refuse" in refused.output, refused.tail()
    assert changed.read("/etc/offset-relay/relay.d/50-ansible.toml") == drop_in
    controller.host_vars[changed.name] = {**settings, **CONTROLS}


def identity_key(identity: Path) -> str:
    """The public key of an identity on the controller, as the README shows it."""
    shown = subprocess.run(
        [BIN / "stmgr", "relay-ticket", "--address", "relay.example.org:4567",
         "--idfile", identity, "--output", "-"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(shown.stdout)["publicKey"]


@pytest.mark.skipif(
    not CONTROLS_IN_CONFIG,
    reason="the relay's configuration has no [access] yet",
)
def test_a_private_relay_is_verified_with_the_probe_identity(deployment: Deployment) -> None:
    """With listen_allow set, the play's probe is refused and the play fails naming the list
    and offset_relay_probe_identity; with that variable, the role makes the identity on the
    controller (0600), admits its key in the list it writes and the play passes, from the
    controller and from the host (whose temporary copy of the identity is gone after)."""
    controller = deployment.controller
    host = deployment.hosts[0]
    settings = controller.host_vars.get(host.name, {})
    nodes_key = "9s1Yw3Y3nBL0hHN3lTxsVr2O8TmTjmBkS5oDq8yRcnA"
    private = {**settings, "offset_relay_access": {"listen_allow": [nodes_key]}}
    controller.host_vars[host.name] = private
    try:
        refused = controller.playbook("--limit", host.name, "-e", "offset_relay_verify_timeout=3")

        assert refused.returncode != 0
        assert failed_tasks(refused, host.name) == [
            "Fail for a relay that does not pass the probe"
        ], refused.tail()
        assert "refused the probe's listen" in refused.output, refused.tail()
        assert "offset_relay_access.listen_allow" in refused.output, refused.tail()
        assert "Set offset_relay_probe_identity" in refused.output, refused.tail()
        assert "misbehaved or proved another public key" not in refused.output, refused.tail()

        identity = controller.directory / "probe.ident"
        assert not identity.exists()
        controller.host_vars[host.name] = {**private, "offset_relay_probe_identity": "probe.ident"}
        run_ = controller.playbook("--limit", host.name)

        assert run_.returncode == 0, run_.tail() + relay_journals([host])
        assert identity.stat().st_mode & 0o777 == 0o600
        key = identity_key(identity)
        drop_in = tomllib.loads(host.read("/etc/offset-relay/relay.d/50-ansible.toml"))
        assert drop_in["access"]["listen_allow"] == [nodes_key, key]
        ticket = controller.ticket(host)
        assert probe(ticket).returncode == 1  # throwaway identities: still private
        admitted = subprocess.run(
            [BIN / "stmgr", "probe", ticket, "--listener-idfile", identity],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert admitted.returncode == 0, admitted.stderr
        controller.playbook("--limit", host.name).assert_clean([host.name])

        from_host = controller.playbook(
            "--limit", host.name, "-e", "offset_relay_verify_from_controller=false"
        )
        from_host.assert_clean([host.name])
        assert "Copy the probe's identity to the host for the probe" in from_host.output
        left = host.ssh("find /tmp /root -name '*.ident'", check=False).stdout.strip()
        assert left == "", left
        assert identity_key(identity) == key  # the same identity, not made again
    finally:
        controller.host_vars[host.name] = settings
        controller.playbook("--limit", host.name)
    assert_probe_passes(controller.ticket(host))


def test_bad_settings_never_reach_the_relay(deployment: Deployment) -> None:
    """A value the relay would refuse fails the play before the drop-in is replaced."""
    controller = deployment.controller
    host = deployment.hosts[0]
    drop_in = host.read("/etc/offset-relay/relay.d/50-ansible.toml")
    unit = unit_state(host)
    settings = controller.host_vars.get(host.name, {})
    # More concurrent handshakes than connections: refused by strelay.
    controller.host_vars[host.name] = {
        "offset_relay_limits": {"max_connections": 100, "max_handshakes": 512}
    }

    run_ = controller.playbook("--limit", host.name)

    assert run_.returncode != 0
    assert run_.recap[host.name]["failed"] == 1, run_.tail()
    assert "lower max_handshakes too" in run_.output, run_.tail()
    # Named by the drop-in the value was meant for, not by Ansible's temporary file.
    assert "/etc/offset-relay/relay.d/50-ansible.toml: limits.max_handshakes" in run_.output, (
        run_.tail()
    )
    assert ".source.toml" not in run_.output, run_.tail()
    assert host.read("/etc/offset-relay/relay.d/50-ansible.toml") == drop_in
    assert unit_state(host) == unit
    controller.host_vars[host.name] = settings


def test_identity_from_the_controller_in_a_vault(deployment: Deployment, tmp_path: Path) -> None:
    """A relay moved from elsewhere keeps its identity: installed from an ansible-vault file
    on the controller (made 0644, as the original stmgr leaves it), 0600 on the host, owned
    by the service user, never shown in the output, and the relay's ticket carries its key."""
    controller = deployment.controller
    host = deployment.hosts[0]
    ident = tmp_path / "moved.ident"
    run([BIN / "stmgr", "gen-ident", "--output", ident])
    ident.chmod(0o644)
    plain = ident.read_text()
    key = json.loads(
        run([BIN / "stmgr", "relay-ticket", "-a", "h:1", "-i", ident, "-o", "-"]).stdout
    )
    password = tmp_path / "vault-password"
    password.write_text("correct horse battery staple\n")
    run(
        [BIN / "ansible-vault", "encrypt", "--vault-password-file", password, ident],
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    assert ident.read_text().startswith("$ANSIBLE_VAULT")
    unit = unit_state(host)

    run_ = controller.playbook(
        "--limit",
        host.name,
        "--vault-password-file",
        str(password),
        "-e",
        f"offset_relay_identity_src={ident}",
    )

    assert run_.returncode == 0, run_.tail()
    assert (host.name, "Install the relay's identity from the controller") in run_.changed
    assert (host.name, "Restart offset-relay") in run_.changed
    private = json.loads(plain)["privateKey"]
    assert private not in run_.output
    assert host.read(IDENTITY_ON_HOST) == plain
    owner = host.ssh(f"stat -c '%U %a' {IDENTITY_ON_HOST}").stdout.split()
    assert owner == ["offset-relay", "600"]
    assert unit_state(host)["MainPID"] != unit["MainPID"]
    assert json.loads(controller.ticket(host).read_text())["publicKey"] == key["publicKey"]
    assert_probe_passes(controller.ticket(host))
    again = controller.playbook(
        "--limit",
        host.name,
        "--vault-password-file",
        str(password),
        "-e",
        f"offset_relay_identity_src={ident}",
    )
    again.assert_clean([host.name])


def test_a_poisoned_ticket_is_remade_and_never_fetched(deployment: Deployment) -> None:
    """What a compromised relay (its user owns the state directory) could leave for the
    play: a ticket with each key twice, then a ticket that is a link to a root-only file.
    The play remakes a root-owned ticket and writes the controller's copy itself."""
    controller = deployment.controller
    host = deployment.hosts[0]
    good = json.loads(controller.ticket(host).read_text())
    poisoned = (
        f'{{"publicKey": "{good["publicKey"]}", "address": "{good["address"]}", '
        f'"publicKey": "{"A" * 43}", "address": "evil.example:443"}}'
    )
    as_relay = "setpriv --reuid=offset-relay --regid=offset-relay --clear-groups --"
    host.ssh(f"rm -f {TICKET_ON_HOST}")
    host.ssh(f"{as_relay} sh -c {shlex.quote(f'cat > {TICKET_ON_HOST}')}", input=poisoned)

    run_ = controller.playbook("--limit", host.name)

    assert run_.returncode == 0, run_.tail()
    assert (host.name, "Make the relay's ticket for its public address") in run_.changed
    assert json.loads(controller.ticket(host).read_text()) == good
    assert json.loads(host.read(TICKET_ON_HOST)) == good
    assert host.ssh(f"stat -c '%U %a %F' {TICKET_ON_HOST}").stdout.strip() == (
        "root 644 regular file"
    )

    host.ssh("install -m 0600 /dev/null /root/secret && echo not-for-the-controller > /root/secret")
    host.ssh(f"rm -f {TICKET_ON_HOST} && {as_relay} ln -s /root/secret {TICKET_ON_HOST}")
    run_ = controller.playbook("--limit", host.name)
    assert run_.returncode == 0, run_.tail()
    assert "not-for-the-controller" not in controller.ticket(host).read_text()
    assert "not-for-the-controller" not in run_.output
    assert json.loads(controller.ticket(host).read_text()) == good
    assert host.ssh(f"stat -c '%U %F' {TICKET_ON_HOST}").stdout.strip() == "root regular file"
    assert host.ssh("stat -c '%U %a' /root/secret").stdout.strip() == "root 600"
    controller.playbook("--limit", host.name).assert_clean([host.name])


def test_an_identity_that_is_a_link_fails_the_play_and_is_never_followed(
    deployment: Deployment,
) -> None:
    controller = deployment.controller
    host = deployment.hosts[0]
    host.ssh("install -m 0644 /dev/null /root/target && echo untouched > /root/target")
    host.ssh(f"mv {IDENTITY_ON_HOST} /root/relay.ident.saved")
    try:
        host.ssh(
            "setpriv --reuid=offset-relay --regid=offset-relay --clear-groups -- "
            f"ln -s /root/target {IDENTITY_ON_HOST}"
        )
        run_ = controller.playbook("--limit", host.name)
        assert run_.returncode != 0
        assert "is not a regular file" in run_.output, run_.tail()
        assert host.ssh("stat -c '%U %G %a' /root/target").stdout.strip() == "root root 644"
        assert host.read("/root/target").strip() == "untouched"
    finally:
        host.ssh(f"rm -f {IDENTITY_ON_HOST} && mv /root/relay.ident.saved {IDENTITY_ON_HOST}")
    controller.playbook("--limit", host.name).assert_clean([host.name])


def test_reinstall_from_a_deb_file(deployment: Deployment, deb_package: Path) -> None:
    """A relay purged (identity and all) and deployed again from a .deb on the controller
    comes back with a new identity and a ticket that matches it."""
    controller = deployment.controller
    host = deployment.hosts[0]
    old_key = json.loads(controller.ticket(host).read_text())["publicKey"]
    host.ssh("DEBIAN_FRONTEND=noninteractive apt-get -q -y purge offset-relay")

    run_ = controller.playbook("--limit", host.name, "-e", f"offset_relay_deb_file={deb_package}")

    assert run_.returncode == 0, run_.tail()
    assert (host.name, "Install the copied package (dependencies from the host's apt sources)") in (
        run_.changed
    )
    ticket = json.loads(controller.ticket(host).read_text())
    assert ticket["publicKey"] == public_key_on_host(host) != old_key
    assert_probe_passes(controller.ticket(host))


REFRESH = "Refresh apt's package lists for the new repository or key"


def failed_tasks(run_: PlaybookRun, host: str) -> list[str]:
    """The tasks that failed on ``host`` in a run, in order."""
    failed, task = [], ""
    for line in run_.output.splitlines():
        if match := _TASK.match(line):
            task = match.group(1)
        elif line.startswith(f"fatal: [{host}]"):
            failed.append(task)
    return failed


@dataclass(frozen=True)
class SignedRepository:
    """The signed apt repository of the package (tools/make-apt-repo), served by the rig."""

    url: str
    served: Path
    original: Path
    key: str
    other_key: str

    @property
    def line(self) -> str:
        return f"deb {self.url} bookworm main"

    def tamper_with_the_index(self) -> None:
        """Change the package's checksum in the amd64 Packages index (and its .gz) after
        signing, as a mirror that swapped the .deb would."""
        index = self.served / "dists" / "bookworm" / "main" / "binary-amd64"
        text = (index / "Packages").read_text()
        forged = re.sub(r"^SHA256: \S+$", "SHA256: " + "0" * 64, text, flags=re.MULTILINE)
        assert forged != text
        (index / "Packages").write_text(forged)
        with gzip.open(index / "Packages.gz", "wt") as handle:
            handle.write(forged)

    def restore(self) -> None:
        shutil.rmtree(self.served)
        shutil.copytree(self.original, self.served)


@pytest.fixture(scope="module")
def signed_repository(
    deployment: Deployment, deb_package: Path, tmp_path_factory: pytest.TempPathFactory
) -> SignedRepository:
    work = tmp_path_factory.mktemp("signed")
    repo = make_signed_repo(work / "repo", work / "gnupg", deb_package)
    # The same package signed by another key: the "wrong key" of the tests below.
    other = make_signed_repo(work / "other", work / "other-gnupg", deb_package)
    url = deployment.controller.rig.serve_tree(repo, "offset-relay")
    return SignedRepository(
        url=url,
        served=deployment.controller.rig.repo_dir / "offset-relay",
        original=repo,
        key=(repo / "offset-relay.asc").read_text(),
        other_key=(other / "offset-relay.asc").read_text(),
    )


def test_install_from_an_added_signed_apt_repository(
    deployment: Deployment, signed_repository: SignedRepository
) -> None:
    """A host without the package in its apt sources gets it from offset_relay_apt_repository,
    trusting the key from offset_relay_apt_key_url for that repository only."""
    controller = deployment.controller
    host = deployment.hosts[1]
    host.ssh(
        "DEBIAN_FRONTEND=noninteractive apt-get -q -y purge offset-relay && "
        "mv /etc/apt/sources.list /etc/apt/sources.list.orig && apt-get -q update"
    )
    repo = signed_repository
    # The one-line file earlier versions of the role wrote, left on the host.
    host.ssh(
        f"echo {shlex.quote(f'deb [signed-by={APT_KEYRING}] {repo.url} bookworm main')} "
        f"> {OLD_APT_SOURCES}"
    )
    extra = json.dumps(
        {
            "offset_relay_apt_repository": repo.line,
            "offset_relay_apt_key_url": f"{repo.url}offset-relay.asc",
        }
    )

    run_ = controller.playbook("--limit", host.name, "-e", extra)

    assert run_.returncode == 0, run_.tail()
    for task in (
        "Download the repository's signing key",
        "Add the apt repository of offset-relay",
        "Refresh apt's package lists for the new repository or key",
        "Install offset-relay from the apt sources",
    ):
        assert (host.name, task) in run_.changed, run_.tail()
    assert host.read(APT_KEYRING) == repo.key
    # The README's deb822 file (without deb-src), and no .list beside it.
    sources = host.read(APT_SOURCES)
    assert sources.splitlines()[1:] == [
        "Types: deb",
        f"URIs: {repo.url}",
        "Suites: bookworm",
        "Components: main",
        f"Signed-By: {APT_KEYRING}",
    ], sources
    assert host.ssh(f"test -e {OLD_APT_SOURCES}", check=False).returncode == 1
    assert (host.name, "Remove the one-line sources file of earlier versions of the role") in (
        run_.changed
    )
    update = host.ssh("apt-get update 2>&1").stdout
    assert "configured multiple times" not in update, update
    # Nothing on the host trusts the repository otherwise.
    assert "trusted=yes" not in host.ssh("cat /etc/apt/sources.list.d/*").stdout
    policy = host.ssh("apt-cache policy offset-relay").stdout
    # Installed from the signed repository.
    installed_from = policy.split("*** ", 1)[1].splitlines()[1].split()
    assert installed_from[1:3] == [repo.url.rstrip("/"), "bookworm/main"], policy
    assert_probe_passes(controller.ticket(host))
    again = controller.playbook("--limit", host.name, "-e", extra)
    again.assert_clean([host.name])


def test_a_wrong_signing_key_fails_the_play_with_apts_error(
    deployment: Deployment, signed_repository: SignedRepository
) -> None:
    controller = deployment.controller
    host = deployment.hosts[1]
    repo = signed_repository
    unit = unit_state(host)
    extra = {"offset_relay_apt_repository": repo.line, "offset_relay_apt_key": repo.other_key}

    run_ = controller.playbook("--limit", host.name, "-e", json.dumps(extra))

    assert run_.returncode != 0
    assert run_.recap[host.name]["failed"] == 1, run_.tail()
    assert failed_tasks(run_, host.name) == [REFRESH], run_.tail()
    # apt's own words: the index is signed by a key the host does not trust for it.
    assert "NO_PUBKEY" in run_.output, run_.tail()
    assert "signatures couldn't be verified" in run_.output, run_.tail()
    assert (host.name, "Install offset-relay from the apt sources") not in run_.changed
    assert unit_state(host) == unit


def test_a_tampered_index_fails_the_play_with_apts_error(
    deployment: Deployment, signed_repository: SignedRepository
) -> None:
    controller = deployment.controller
    host = deployment.hosts[1]
    repo = signed_repository
    extra = json.dumps({"offset_relay_apt_repository": repo.line, "offset_relay_apt_key": repo.key})
    # As on a host that adds the repository: apt has no copy of its index yet (a copy whose
    # checksum matches the signed Release would be used without downloading it again).
    host.ssh("rm -f /var/lib/apt/lists/*_offset-relay_dists_*")
    repo.tamper_with_the_index()
    try:
        run_ = controller.playbook("--limit", host.name, "-e", extra)
    finally:
        repo.restore()

    assert run_.returncode != 0
    assert run_.recap[host.name]["failed"] == 1, run_.tail()
    assert failed_tasks(run_, host.name) == [REFRESH], run_.tail()
    assert "Hash Sum mismatch" in run_.output, run_.tail()

    # The index as signed again: the right key (given as text this time) works.
    run_ = controller.playbook("--limit", host.name, "-e", extra)
    assert run_.returncode == 0, run_.tail()
    assert host.read(APT_KEYRING) == repo.key
    update = host.ssh("apt-get -q update 2>&1").stdout
    assert not re.search(r"^(W|E|Err):", update, re.MULTILINE), update
    assert_probe_passes(controller.ticket(host))


def test_play_fails_for_a_relay_that_does_not_answer(deployment: Deployment) -> None:
    """A ticket whose address reaches no relay fails the play, naming the relay."""
    controller = deployment.controller
    silent = deployment.hosts[1]
    nowhere = f"{silent.address.rsplit('.', 1)[0]}.201:{PORT}"
    controller.host_vars[silent.name] = {"offset_relay_public_address": nowhere}

    run_ = controller.playbook("-e", "offset_relay_verify_timeout=3")

    assert run_.returncode != 0
    assert run_.recap[silent.name]["failed"] == 1, run_.tail()
    assert run_.recap[deployment.hosts[0].name]["failed"] == 0, run_.tail()
    assert f"the relay at {nowhere} did not pass stmgr probe" in run_.output, run_.tail()
    assert "could not be reached" in run_.output, run_.tail()


def test_debians_ansible_core_deploys_a_bare_host_and_reruns_clean(deployment: Deployment) -> None:
    """The play from Debian bookworm's own ansible-core package (2.14, the role's minimum):
    a host without the relay gets it, a second run changes nothing, and so does a run of the
    newer ansible-core after it (both write the same files)."""
    if not DEBIAN_ANSIBLE_PLAYBOOK.exists():
        pytest.skip("no Debian ansible-core package (tools/install-deps installs it)")
    version = subprocess.run(
        [DEBIAN_ANSIBLE_PLAYBOOK, "--version"], capture_output=True, text=True, check=True
    ).stdout.splitlines()[0]
    assert "[core 2.14." in version, version
    controller = deployment.controller
    host = deployment.hosts[0]
    controller.host_vars[host.name] = {}
    host.ssh(
        "DEBIAN_FRONTEND=noninteractive apt-get -q -y purge offset-relay && "
        "rm -rf /etc/offset-relay /var/lib/offset-relay"
    )
    controller.ticket(host).unlink(missing_ok=True)

    run_ = controller.playbook("--limit", host.name, ansible_playbook=DEBIAN_ANSIBLE_PLAYBOOK)

    assert run_.returncode == 0, run_.tail() + relay_journals([host])
    assert run_.recap[host.name]["failed"] == 0, run_.tail()
    for task in (
        "Install offset-relay from the apt sources",
        "Write the relay's settings drop-in",
        "Write the ticket on the controller",
    ):
        assert (host.name, task) in run_.changed, run_.tail()
    # The ticket as stmgr wrote it on the host, byte for byte.
    assert controller.ticket(host).read_text() == host.read(TICKET_ON_HOST)
    assert_probe_passes(controller.ticket(host))
    again = controller.playbook("--limit", host.name, ansible_playbook=DEBIAN_ANSIBLE_PLAYBOOK)
    again.assert_clean([host.name])
    controller.playbook("--limit", host.name).assert_clean([host.name])
