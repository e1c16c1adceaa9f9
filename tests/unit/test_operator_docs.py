"""What an operator reads and installs agrees with what the code does: README sections, man
pages, the package, the example inventory, the Makefile, the Ansible role, bash completion."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ..helpers import run_local_play

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
ROLE = ROOT / "ansible" / "roles" / "offset_relay"
COMPLETION = ROOT / "packaging" / "bash-completion"
BASH_COMPLETION = Path("/usr/share/bash-completion/bash_completion")


@pytest.mark.parametrize(
    "heading",
    [
        "## Moving a relay from the original `strelay`",
        "### Is it reachable from outside?",
        "## Firewall",
        "### Getting the package",
        "### Upgrades and downgrades",
        "## Restarts and upgrades",
        "### Backing up and restoring the identity",
        "### Sizing",
        "### Installing just `stmgr` on a monitoring host",
        "## Controlling who uses the relay",
        "## Making a release",
        "### Monitoring a private relay",
    ],
)
def test_readme_has_the_operator_sections(heading):
    assert re.search(rf"^{re.escape(heading)}$", README, re.M)


def test_making_a_release_names_the_three_places_and_make_release():
    section = README.split("## Making a release\n", 1)[1].split("\n## ", 1)[0]
    for place in ("offset_appliance/__init__.py", "pyproject.toml", "packaging/debian/changelog"):
        assert f"`{place}`" in section
    assert "make release VERSION=" in section
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^release:$", makefile, re.M)
    assert "tools/release" in makefile


def test_host_commands_install_curl_and_gpg_before_using_them():
    # A minimal bookworm has neither: a block that runs them installs them first.
    for block in re.findall(r"```sh\n(.*?)```", README, re.S):
        lines = [line.split("#")[0].split() for line in block.splitlines()]
        for tool in ("curl", "gpg"):
            uses = [i for i, words in enumerate(lines) if words[:1] == [tool]]
            if uses:
                installs = [
                    i
                    for i, words in enumerate(lines)
                    if words[:2] == ["apt", "install"] and tool in words
                ]
                assert installs and installs[0] < uses[0], block


def test_readme_has_an_example_of_each_control():
    section = README.split("## Controlling who uses the relay\n", 1)[1].split("\n## ", 1)[0]
    examples = "\n".join(re.findall(r"```(?:toml|sh|text)\n(.*?)```", section, re.S))
    for needle in (
        "[access]\nlisten_allow = ",  # a private relay: one setting
        "ipv6_prefix = ",
        "[bandwidth]\nkey_rate = ",
        "[budgets]\n",
        "stmgr usage ",
        "[bans]\nenabled = true",
        "max_memory = ",
        "reload: limits.max_connections 20000 -> 100",
        "reload failed, keeping the running configuration: ",
    ):
        assert needle in examples, needle


def test_readme_says_how_a_private_relay_is_probed():
    section = README.split("### Monitoring a private relay\n", 1)[1].split("\n## ", 1)[0]
    examples = "\n".join(re.findall(r"```sh\n(.*?)```", section, re.S))
    for needle in (
        "stmgr gen-ident --output probe.ident",
        '["publicKey"]',
        "stmgr probe relay.relay --listener-idfile probe.ident",
    ):
        assert needle in examples, needle
    assert "--connector-idfile" in section and "connect_allow" in section


def test_readme_says_exactly_where_drop_ins_are():
    assert "`<stem>.d/`" in README
    assert "`relay.d/` beside it" not in README


def test_sizing_names_memory_max_and_bench_figures():
    section = README.split("### Sizing", 1)[1].split("\n## ", 1)[0]
    assert "MemoryMax=" in section and "one core" in section.lower()


def test_bench_duration_agrees():
    makefile = (ROOT / "Makefile").read_text()
    in_make = re.search(r"about (\d+) minutes", makefile.split(".PHONY: bench")[0]).group(1)
    in_readme = re.search(r"`make bench` \(about (\d+) minutes", README).group(1)
    assert in_make == in_readme


def test_package_needs_python_3_11():
    control = (ROOT / "packaging" / "debian" / "control").read_text()
    assert re.search(r"^Depends: python3 \(>= 3\.11\),", control, re.M)


def test_example_inventory_and_readme_use_the_same_ports():
    example = yaml.safe_load((ROOT / "ansible" / "inventory" / "relays.example.yml").read_text())
    block = re.search(r"# ansible/inventory/relays.yml\n(.*?)```", README, re.S).group(1)
    shown = yaml.safe_load(block)
    port = example["relays"]["vars"]["offset_relay_port"]
    for inventory in (example, shown):
        for name, host in inventory["relays"]["hosts"].items():
            host = host or {}
            assert host.get("offset_relay_port", port) == port, name
            address = host.get("offset_relay_public_address", f"x:{port}")
            assert address.endswith(f":{port}"), (name, address)
    assert example["relays"]["hosts"]["relay3"] == shown["relays"]["hosts"]["relay3"]


def test_strelay_man_page_documents_metrics():
    page = (ROOT / "man" / "strelay.1").read_text()
    assert ".B [metrics]" in page and "/healthz" in page and "\\-l" in page


def test_stmgr_man_page_makes_the_ticket_as_the_readme_does():
    page = (ROOT / "man" / "stmgr.1").read_text()
    assert "runuser \\-u offset\\-relay \\-\\- stmgr relay\\-ticket" in page
    assert "\\-\\-output /var/lib/offset\\-relay/relay.relay" in page
    assert "runuser -u offset-relay -- stmgr relay-ticket" in README


def test_make_run_installs_only_the_runtime():
    result = subprocess.run(
        ["make", "-n", "-B", "run"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert "pip install -q -e ." in result.stdout
    assert "[test]" not in result.stdout


def test_package_installs_bash_completion():
    install = (ROOT / "packaging" / "debian" / "offset-relay.install").read_text()
    for command in ("stmgr", "strelay"):
        assert f"packaging/bash-completion/{command} usr/share/bash-completion/completions/" in (
            install
        )


@pytest.mark.skipif(not BASH_COMPLETION.exists(), reason="bash-completion not installed")
@pytest.mark.parametrize(
    "line, expected",
    [
        ("stmgr ", {"gen-ident", "relay-ticket", "probe", "usage", "--help", "--version"}),
        ("stmgr usage --by ", {"key", "prefix"}),
        ("stmgr relay-ticket --a", {"--address", "--allow-private"}),
        ("stmgr probe --format ", {"text", "prometheus"}),
        ("stmgr probe --l", {"--listener-idfile"}),
        ("strelay --log-level ", {"debug", "info", "warning", "error"}),
        ("strelay -", {"--config", "--idfile", "--laddr", "--log-level", "--help", "--version"}),
    ],
)
def test_bash_completion(line, expected):
    command = line.split()[0]
    words = line.split() + ([""] if line.endswith(" ") else [])
    script = (
        f"source {BASH_COMPLETION}; source {COMPLETION / command}; "
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}; "
        f"COMP_LINE={line!r}; COMP_POINT={len(line)}; _{command}; "
        'printf "%s\\n" "${COMPREPLY[@]}"'
    )
    out = subprocess.run(
        [shutil.which("bash") or "bash", "-c", script], capture_output=True, text=True, check=True
    )
    assert set(out.stdout.split()) == expected


# -- the Ansible role ----------------------------------------------------------------------


def _tasks(name: str) -> list[dict]:
    return yaml.safe_load((ROLE / "tasks" / name).read_text())


def test_playbook_rolls_out_one_relay_at_a_time():
    play = yaml.safe_load((ROOT / "ansible" / "deploy-relay.yml").read_text())[0]
    assert play["serial"] == "{{ offset_relay_serial | default(1) }}"
    assert play["max_fail_percentage"] == 0


def test_settings_reload_and_only_listen_metrics_identity_restart():
    handlers = {h["name"]: h for h in yaml.safe_load((ROLE / "handlers/main.yml").read_text())}
    assert handlers["Reload offset-relay"]["ansible.builtin.systemd_service"]["state"] == "reloaded"
    configure = {t["name"]: t for t in _tasks("configure.yml")}
    assert configure["Write the relay's settings drop-in"]["notify"] == "Reload offset-relay"
    restart = configure["Restart instead of reload when the listen addresses or metrics change"]
    assert restart["notify"] == "Restart offset-relay"


OLD_DROP_IN = """log_level = "debug"
listen = ["0.0.0.0:4567", "[::]:4567"]

[limits]
max_connections_per_ip = 64

[metrics]
enabled = true
listen = "127.0.0.1:9477"
"""


RESTART_CASES = [
    ({}, False),  # only limits or log level changed: reload
    ({"offset_relay_metrics_port": 9478}, True),
    ({"offset_relay_metrics_enabled": False}, True),
    ({"offset_relay_listen": ["0.0.0.0:4567"]}, True),
    ({"offset_relay_port": 4568}, True),
]


def test_restart_decision_of_the_role(tmp_path):
    """The role's own task, run by ansible-playbook on a drop-in as the role wrote it: only
    listen and metrics changes restart the relay."""
    playbook_bin = Path(sys.executable).parent / "ansible-playbook"
    if not playbook_bin.exists():
        pytest.skip("ansible-core is not installed")
    task = next(
        t for t in _tasks("configure.yml") if t["name"].startswith("Restart instead of reload")
    )
    task.pop("notify")
    old = tmp_path / "50-ansible.toml"
    old.write_text(OLD_DROP_IN)
    defaults = yaml.safe_load((ROLE / "defaults/main.yml").read_text())
    base = {
        "offset_relay_port": 4567,
        "offset_relay_listen": defaults["offset_relay_listen"],
        "offset_relay_metrics_enabled": True,
        "offset_relay_metrics_port": 9477,
    }
    tasks = [
        {"ansible.builtin.slurp": {"src": str(old)}, "register": "__offset_relay_dropin_before"},
        {"ansible.builtin.set_fact": {"__offset_relay_dropin_written": {"changed": True}}},
    ]
    for number, (settings, _restart) in enumerate(RESTART_CASES):
        case = dict(task, name=f"case {number}")
        case["vars"] = {**task["vars"], **settings}
        tasks.append(case)
    play = [{"hosts": "localhost", "gather_facts": False, "vars": base, "tasks": tasks}]
    result = run_local_play(playbook_bin, tmp_path, play)
    assert result.returncode == 0, result.stdout + result.stderr
    for number, (settings, restart) in enumerate(RESTART_CASES):
        outcome = re.search(rf"TASK \[case {number}\] \**\n(\w+):", result.stdout).group(1)
        assert outcome == ("changed" if restart else "skipping"), (settings, result.stdout)


def test_package_ships_the_probe_timer_off_and_the_monitoring_examples():
    debian = ROOT / "packaging" / "debian"
    install = (debian / "offset-relay.install").read_text().splitlines()
    for unit in ("offset-relay-probe.service", "offset-relay-probe.timer"):
        assert f"systemd/{unit} lib/systemd/system/" in install
    # Installed, never enabled or started by the package (tests/deploy/test_package.py).
    rules = (debian / "rules").read_text()
    assert re.search(
        r"^\tdh_installsystemd --no-enable --no-start offset-relay-probe\.service "
        r"offset-relay-probe\.timer$",
        rules,
        re.M,
    )
    assert (debian / "offset-relay.docs").read_text().split() == ["README.md"]
    examples = (debian / "offset-relay.examples").read_text().split()
    assert examples == [
        "examples/relay.toml",
        "packaging/prometheus/offset-relay.rules.yml",
        "packaging/grafana/offset-relay.json",
    ]
    unit = (ROOT / "systemd" / "offset-relay-probe.service").read_text()
    assert "TEXTFILE_DIR=/var/lib/prometheus/node-exporter" in unit
    # README: Debian's exporter directory, the one command, and promtool's package.
    assert "/var/lib/node_exporter" not in README
    assert "/var/lib/prometheus/node-exporter/offset_relay_probe.prom" in README
    assert "systemctl enable --now offset-relay-probe.timer" in README
    assert "promtool check rules /usr/share/doc/offset-relay/examples/offset-relay.rules.yml" in (
        README
    )
    assert "Debian's `prometheus` package" in README
