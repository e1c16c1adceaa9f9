"""The Ansible role's variables for the controls of who uses the relay ([access],
[bandwidth], [budgets], [bans] and the per-prefix and memory keys of [limits]): declared
with their types, written by the role's own templates as the types the relay reads, and
accepted by ``strelay --check-config`` as the role validates its drop-in."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from offset_appliance.config import Config, Limits, Timeouts

from ..helpers import run_local_play

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "ansible" / "roles" / "offset_relay"
BIN = Path(sys.executable).parent
SECTIONS = ("access", "bandwidth", "budgets", "bans")
NEW_LIMITS = {"ipv4_prefix", "ipv6_prefix", "max_memory", "memory_low_mark"}
# The relay reads these tables only once the controls themselves are in its configuration.
CONTROLS_IN_CONFIG = set(SECTIONS) <= {f.name for f in dataclasses.fields(Config)} and (
    NEW_LIMITS <= {f.name for f in dataclasses.fields(Limits)}
)
needs_controls = pytest.mark.skipif(
    not CONTROLS_IN_CONFIG,
    reason="the relay's configuration has no [access], [bandwidth], [budgets], [bans] yet",
)
SPEC_TYPES = {"list": "list", "int": "int", "float": "float", "bool": "bool", "str": "str"}

# Every key of every control, set to a value that is not its default.
KEY = "9s1Yw3Y3nBL0hHN3lTxsVr2O8TmTjmBkS5oDq8yRcnA"
CONTROLS = {
    "offset_relay_access": {
        "listen_allow": [KEY],
        "listen_deny": [],
        "connect_allow": [],
        "connect_deny": [KEY[::-1][:42] + "A"],
        "ip_allow": ["198.18.0.0/15", "2001:db8::/32"],
        "ip_deny": ["198.18.0.7"],
    },
    "offset_relay_bandwidth": {
        "connection_rate": 1000000,
        "connection_burst": 2000000,
        "key_rate": "3000000",  # as a string from an inventory: written as the integer
        "key_burst": 0,
        "prefix_rate": 4000000,
        "prefix_burst": 0,
        "total_rate": 100000000,
        "total_burst": 0,
    },
    "offset_relay_budgets": {
        "key_daily": 5000000,
        "key_monthly": 50000000,
        "prefix_daily": 0,
        "prefix_monthly": 0,
        "total_monthly": 10**12,
        "action": "refuse",
        "floor_rate": 65536,
        "state_file": "/tmp/offset-relay-usage.json",
        "save_interval": 30,
    },
    "offset_relay_bans": {
        "enabled": "yes",
        "threshold": 20,
        "window": 30,
        "ban_time": 120,
        "multiplier": 2,
        "max_ban_time": 86400,
        "forget_after": 86400,
        "table_size": 4096,
    },
    "offset_relay_limits": {
        "ipv4_prefix": 24,
        "ipv6_prefix": 56,
        "max_memory": 1 << 30,
        "memory_low_mark": 900 << 20,
    },
}


def _spec() -> dict:
    return yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())["argument_specs"][
        "offset_relay"
    ]["options"]


def _types() -> dict:
    return yaml.safe_load((ROLE / "vars" / "main.yml").read_text())["__offset_relay_control_types"]


def test_each_control_is_one_dict_variable_declared_with_every_key_and_its_type():
    spec, types = _spec(), _types()
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    assert set(types) == set(SECTIONS)
    for section in SECTIONS:
        variable = spec[f"offset_relay_{section}"]
        assert (variable["type"], variable["default"]) == ("dict", {})
        assert defaults[f"offset_relay_{section}"] == {}
        options = variable["options"]
        assert set(options) == set(types[section]), section
        for key, option in options.items():
            assert SPEC_TYPES[types[section][key]] == option["type"], (section, key)
            assert option["description"], (section, key)
            if option["type"] == "list":
                assert option["elements"] == "str"
    assert spec["offset_relay_budgets"]["options"]["action"]["choices"] == ["throttle", "refuse"]


def test_limits_and_timeouts_declare_every_key_of_the_relay():
    spec = _spec()
    limits = {f.name for f in dataclasses.fields(Limits)}
    assert set(spec["offset_relay_limits"]["options"]) == limits | NEW_LIMITS
    assert set(spec["offset_relay_timeouts"]["options"]) == {
        f.name for f in dataclasses.fields(Timeouts)
    }


@needs_controls
def test_the_controls_variables_are_the_relays_keys():
    from offset_appliance.config import config_values, load_config

    types = _types()
    config = Path(os.environ.get("TMPDIR", "/tmp")) / f"controls-{os.getpid()}.toml"
    config.write_text('identity_file = "id"\nlisten = ["127.0.0.1:0"]\n')
    try:
        keys = config_values(load_config(config))
    finally:
        config.unlink()
    for section in SECTIONS:
        assert {k.split(".", 1)[1] for k in keys if k.startswith(section + ".")} == set(
            types[section]
        ), section


def _render(
    tmp_path: Path, *extra: str, playbook_bin: Path = BIN / "ansible-playbook"
) -> dict[str, str]:
    """The role's two settings templates, rendered by ansible-playbook with every control set
    (and ``extra`` arguments)."""
    access = CONTROLS["offset_relay_access"]
    return _render_accesses(tmp_path, {"all": access}, *extra, playbook_bin=playbook_bin)["all"]


def _render_accesses(
    tmp_path: Path,
    accesses: dict[str, object],
    *extra: str,
    playbook_bin: Path = BIN / "ansible-playbook",
) -> dict[str, dict[str, str]]:
    """``_render`` once for each of ``accesses`` (a case's name: its ``offset_relay_access``),
    in one ansible-playbook run: one play per case."""
    if not playbook_bin.exists():
        pytest.skip("ansible-core is not installed")
    out = {
        case: {name: tmp_path / f"{case}-{name}.toml" for name in ("50-ansible", "instance")}
        for case in accesses
    }
    play = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "vars_files": [str(ROLE / "defaults" / "main.yml"), str(ROLE / "vars" / "main.yml")],
            "vars": {
                **CONTROLS,
                "__offset_relay_instance": 2,
                "__offset_relay_instance_port": 4568,
            },
            "tasks": [
                {
                    "name": f"render {name} ({case})",
                    # Task variables: above the role's defaults file the play reads.
                    "vars": {"offset_relay_access": access},
                    "ansible.builtin.template": {
                        "src": str(ROLE / "templates" / f"{name}.toml.j2"),
                        "dest": str(path),
                        "mode": "0644",
                    },
                }
                for name, path in out[case].items()
            ],
        }
        for case, access in accesses.items()
    ]
    # As an inventory's or a playbook's variables would: above the role's defaults (the
    # access list as each task's own variable, so that the plays may differ in it).
    variables = {key: value for key, value in CONTROLS.items() if key != "offset_relay_access"}
    result = run_local_play(playbook_bin, tmp_path, play, *extra, variables=variables)
    assert result.returncode == 0, result.stdout + result.stderr
    return {
        case: {name: path.read_text() for name, path in paths.items()}
        for case, paths in out.items()
    }


def test_the_templates_write_each_control_as_the_type_the_relay_reads(tmp_path):
    for name, text in _render(tmp_path).items():
        doc = tomllib.loads(text)
        assert doc["access"] == CONTROLS["offset_relay_access"], name
        assert doc["bandwidth"]["key_rate"] == 3000000 and doc["bandwidth"]["key_burst"] == 0
        assert all(type(v) is int for v in doc["bandwidth"].values()), doc["bandwidth"]
        budgets = doc["budgets"]
        assert budgets["action"] == "refuse" and budgets["total_monthly"] == 10**12
        assert budgets["save_interval"] == 30.0 and type(budgets["save_interval"]) is float
        assert budgets["state_file"] == "/tmp/offset-relay-usage.json"
        bans = doc["bans"]
        assert bans["enabled"] is True and bans["threshold"] == 20
        for key in ("window", "ban_time", "multiplier", "max_ban_time", "forget_after"):
            assert type(bans[key]) is float, key
        assert doc["limits"] == CONTROLS["offset_relay_limits"]


PROBE_KEY = "pRoBeKeyAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
DEBIAN_ANSIBLE_PLAYBOOK = Path("/usr/bin/ansible-playbook")


@pytest.mark.parametrize(
    "playbook_bin",
    [BIN / "ansible-playbook", DEBIAN_ANSIBLE_PLAYBOOK],
    ids=["ansible-core", "debian-ansible-core"],
)
def test_the_probe_identitys_key_is_added_to_the_allow_lists_that_are_set(tmp_path, playbook_bin):
    """With offset_relay_probe_identity, its key (read by the role into
    __offset_relay_probe_key) joins listen_allow and connect_allow when they are set, once;
    an unset or empty allow list, which admits everyone, is left as it is."""
    if not playbook_bin.exists():
        pytest.skip(f"no {playbook_bin}")
    access = CONTROLS["offset_relay_access"]
    rendered = _render_accesses(
        tmp_path,
        {
            "as set": access,
            "both set": {**access, "connect_allow": ["/etc/offset-relay/peers.keys"]},
            # Already listed: not twice (and the unset lists stay unset).
            "listed": {"listen_allow": [PROBE_KEY]},
        },
        "-e",
        f"__offset_relay_probe_key={PROBE_KEY}",
        playbook_bin=playbook_bin,
    )
    for name, text in rendered["as set"].items():
        written = tomllib.loads(text)["access"]
        assert written["listen_allow"] == [*access["listen_allow"], PROBE_KEY], name
        assert written["connect_allow"] == [], name
        assert {k: v for k, v in written.items() if k != "listen_allow"} == {
            k: v for k, v in access.items() if k != "listen_allow"
        }, name
    for name, text in rendered["both set"].items():
        written = tomllib.loads(text)["access"]
        assert written["listen_allow"] == [*access["listen_allow"], PROBE_KEY], name
        assert written["connect_allow"] == ["/etc/offset-relay/peers.keys", PROBE_KEY], name
    for name, text in rendered["listed"].items():
        assert tomllib.loads(text)["access"] == {"listen_allow": [PROBE_KEY]}, name


def test_unset_controls_write_nothing(tmp_path):
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    template = (ROLE / "templates" / "_controls.toml.j2").read_text()
    assert all(defaults[f"offset_relay_{s}"] == {} for s in SECTIONS)
    assert "{% if settings %}" in template  # an empty dict writes no table at all


@needs_controls
def test_the_rendered_drop_in_passes_the_roles_validation(tmp_path):
    rendered = _render(tmp_path)["50-ansible"]
    subprocess.run([BIN / "stmgr", "gen-ident", "--output", tmp_path / "id"], check=True)
    (tmp_path / "relay.toml").write_text(f'identity_file = "{tmp_path / "id"}"\n')
    candidate = tmp_path / "candidate.toml"
    candidate.write_text(rendered)
    variables = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    argv = variables["__offset_relay_validate_command"].split()
    argv = [
        str(BIN / "strelay")
        if a == "/usr/bin/strelay"
        else a.replace("/etc/offset-relay", str(tmp_path))
        for a in argv
    ]
    argv = [a.replace("%s", str(candidate)) for a in argv]
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    printed = subprocess.run(
        [
            BIN / "strelay",
            "--config",
            tmp_path / "relay.toml",
            "--print-config",
            "--drop-in",
            f"50-ansible.toml={candidate}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    doc = tomllib.loads(printed)
    assert doc["budgets"]["action"] == "refuse"
    assert doc["limits"]["ipv6_prefix"] == 56
    assert doc["bans"]["enabled"] is True


def test_the_role_readme_names_every_variable_the_role_declares():
    """roles/offset_relay/README.md lists every variable of defaults/main.yml and of
    meta/argument_specs.yml, and names no variable the role does not have."""
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    specs = yaml.safe_load((ROLE / "meta" / "argument_specs.yml").read_text())
    declared = set(defaults) | set(specs["argument_specs"]["offset_relay"]["options"])
    readme = (ROLE / "README.md").read_text()

    tags = set(re.findall(r"\boffset_relay_[a-z_]+", (ROLE / "tasks" / "main.yml").read_text()))
    named = set(re.findall(r"`(offset_relay_[a-z_]+)`", readme))
    assert declared - named == set()
    assert named - declared - tags == set()
