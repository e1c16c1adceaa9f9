"""What the unit and the Ansible role promise about checking a configuration and probing,
read from the shipped files and run against the real command."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "systemd" / "offset-relay.service"
ROLE = ROOT / "ansible" / "roles" / "offset_relay"
STRELAY = Path(sys.executable).parent / "strelay"


def test_reload_checks_the_configuration_and_signals_the_relay_in_one_step():
    reloads = [
        line.split("=", 1)[1]
        for line in UNIT.read_text().splitlines()
        if line.startswith("ExecReload=")
    ]
    # One command: a bad file fails the reload, and the relay still hears of it.
    assert reloads == ["/usr/bin/strelay --reload $MAINPID --config /etc/offset-relay/relay.toml"]
    start = next(line for line in UNIT.read_text().splitlines() if line.startswith("ExecStart="))
    assert start.endswith("--config /etc/offset-relay/relay.toml")


def test_the_role_validates_its_drop_in_with_check_config(tmp_path):
    variables = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    command = variables["__offset_relay_validate_command"]
    argv = shlex.split(command)
    assert argv[:2] == ["/usr/bin/strelay", "--check-config"]
    # The same command against a copy of the tree, with a candidate the relay refuses.
    etc = tmp_path / "etc"
    (etc / "relay.d").mkdir(parents=True)
    subprocess.run(
        [STRELAY.with_name("stmgr"), "gen-ident", "--output", tmp_path / "id"], check=True
    )
    (etc / "relay.toml").write_text(
        f'identity_file = "{tmp_path / "id"}"\nlisten = ["[::]:4567"]\n'
    )
    candidate = tmp_path / "candidate"
    candidate.write_text("[limits]\nmax_connections = 100\nmax_handshakes = 512\n")
    local = [
        str(STRELAY) if a == "/usr/bin/strelay" else a.replace("/etc/offset-relay", str(etc))
        for a in argv
    ]
    local = [a.replace("%s", str(candidate)) for a in local]
    refused = subprocess.run(local, capture_output=True, text=True)
    assert refused.returncode == 78
    assert "limits.max_handshakes (512) must not exceed max_connections (100)" in refused.stderr
    candidate.write_text("[limits]\nmax_connections = 1000\n")
    assert subprocess.run(local, capture_output=True).returncode == 0


def test_a_failing_probe_is_tried_three_times_as_the_defaults_say():
    defaults = (ROLE / "defaults" / "main.yml").read_text()
    assert re.search(r"a failing probe is tried three times", defaults)
    tasks = yaml.safe_load((ROLE / "tasks" / "verify.yml").read_text())
    tasks += yaml.safe_load((ROLE / "tasks" / "instances.yml").read_text())

    # The probe from the host, and the instances', are in blocks (with the probe identity's
    # temporary copy and its removal).
    def flat(tasks: list[dict]) -> list[dict]:
        return [
            inner for t in tasks for inner in [t, *flat(t.get("block", []) + t.get("always", []))]
        ]

    probes = [
        t
        for t in flat(tasks)
        if "ansible.builtin.command" in t and "probe" in str(t["ansible.builtin.command"])
    ]
    assert len(probes) == 3
    for task in probes:
        assert task["retries"] + 1 == 3, task["name"]
        assert task["until"] == f"{task['register']}.rc == 0", task["name"]


def test_the_store_holds_a_hand_over_of_as_many_connections_as_descriptors_allow():
    settings = dict(
        line.split("=", 1) for line in UNIT.read_text().splitlines() if re.match(r"^\w+=", line)
    )
    assert settings["NotifyAccess"] == "main"  # no other process adds to or takes from it
    assert int(settings["FileDescriptorStoreMax"]) >= int(settings["LimitNOFILE"])


TEMPLATE = ROOT / "systemd" / "offset-relay@.service"


def _directives(path: Path) -> list[tuple[str, str]]:
    return [
        tuple(line.split("=", 1))  # type: ignore[misc]
        for line in path.read_text().splitlines()
        if re.match(r"^\w+=", line)
    ]


def test_the_template_is_the_single_unit_with_per_instance_config_identity_and_state():
    single = _directives(UNIT)
    template = _directives(TEMPLATE)
    per_instance = {
        ("Description", "Offset relay server %i"),
        (
            "ExecStart",
            "/usr/bin/strelay --config /etc/offset-relay/%i.toml"
            " --idfile /var/lib/offset-relay/%i/relay.ident",
        ),
        (
            "ExecReload",
            "/usr/bin/strelay --reload $MAINPID --config /etc/offset-relay/%i.toml"
            " --idfile /var/lib/offset-relay/%i/relay.ident",
        ),
        ("StateDirectory", "offset-relay/%i"),
    }
    assert per_instance <= set(template)
    # Everything else, hardening included, is the single unit's, in the same order.
    rest = [d for d in template if d not in per_instance and d[0] != "ExecStartPre"]
    replaced = {d[0] for d in per_instance}
    assert rest == [d for d in single if d[0] not in replaced]


def test_the_template_makes_an_instance_identity_once_and_keeps_it(tmp_path):
    pre = next(v for k, v in _directives(TEMPLATE) if k == "ExecStartPre")
    argv = shlex.split(pre)
    assert argv[:2] == ["/bin/sh", "-c"]
    script = argv[2].replace("/usr/bin/stmgr", str(STRELAY.with_name("stmgr")))
    state = tmp_path / "state"
    state.mkdir()
    env = {"STATE_DIRECTORY": str(state), "PATH": "/usr/bin:/bin"}
    subprocess.run(["/bin/sh", "-c", script], env=env, check=True)
    identity = (state / "relay.ident").read_bytes()
    assert (state / "relay.ident").stat().st_mode & 0o077 == 0
    subprocess.run(["/bin/sh", "-c", script], env=env, check=True)
    assert (state / "relay.ident").read_bytes() == identity
