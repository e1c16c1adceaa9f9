"""A variable of the wrong type or value fails the role with ansible's few lines naming it,
not followed by the whole argument spec (ansible's own check of a `main` entry point prints
meta/argument_specs.yml after the error)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ..helpers import run_local_play

ROOT = Path(__file__).resolve().parents[2]
ROLES = ROOT / "ansible" / "roles"
BIN = Path(sys.executable).parent


def run_role(tmp_path: Path, variables: dict[str, object]) -> subprocess.CompletedProcess[str]:
    """The role on localhost, in check mode and limited to its always-tagged tasks: the
    argument check comes first, and nothing is changed on this machine."""
    playbook_bin = BIN / "ansible-playbook"
    if not playbook_bin.exists():
        pytest.skip("ansible-core is not installed")
    play = [{"hosts": "localhost", "gather_facts": False, "roles": ["offset_relay"]}]
    return run_local_play(
        playbook_bin,
        tmp_path,
        play,
        "--check",
        "--tags",
        "no_such_tag",
        variables=variables,
        env={
            "ANSIBLE_ROLES_PATH": str(ROLES),
            "ANSIBLE_STDOUT_CALLBACK": "ansible.builtin.default",
        },
    )


@pytest.mark.parametrize(
    ("variables", "words"),
    [
        ({"offset_relay_port": "4567x"}, "offset_relay_port"),
        ({"offset_relay_log_level": "verbose"}, "offset_relay_log_level must be one of"),
        ({"offset_relay_bandwidth": {"key_rate": "fast"}}, "key_rate"),
    ],
)
def test_a_wrong_variable_fails_with_a_short_error_naming_it(tmp_path, variables, words):
    result = run_role(tmp_path, variables)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert words in output, output
    assert "failed=1" in output, output
    # Not the spec of every other variable.
    assert "offset_relay_verify_timeout" not in output, output
    assert len(output.splitlines()) < 30, output
