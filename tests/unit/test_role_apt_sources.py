"""The role's apt repository is written as the README's deb822 offset-relay.sources, never
as a one-line .list beside it (apt warns of a repository "configured multiple times")."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from ..helpers import run_local_play

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "ansible" / "roles" / "offset_relay"
BIN = Path(sys.executable).parent
KEYRING = "/etc/apt/keyrings/offset-relay.asc"


def render(tmp_path: Path, variables: dict[str, str]) -> str:
    """templates/offset-relay.sources.j2, rendered by ansible-playbook with VARIABLES."""
    playbook_bin = BIN / "ansible-playbook"
    if not playbook_bin.exists():
        pytest.skip("ansible-core is not installed")
    out = tmp_path / "offset-relay.sources"
    play = [
        {
            "hosts": "localhost",
            "gather_facts": False,
            "vars_files": [str(ROLE / "defaults" / "main.yml"), str(ROLE / "vars" / "main.yml")],
            "tasks": [
                {
                    "name": "render",
                    "ansible.builtin.template": {
                        "src": str(ROLE / "templates" / "offset-relay.sources.j2"),
                        "dest": str(out),
                        "mode": "0644",
                    },
                }
            ],
        }
    ]
    result = run_local_play(playbook_bin, tmp_path, play, variables=variables)
    assert result.returncode == 0, result.stdout + result.stderr
    return out.read_text()


def fields(text: str) -> dict[str, str]:
    return dict(
        line.split(": ", 1) for line in text.splitlines() if line and not line.startswith("#")
    )


def test_the_role_writes_the_readmes_sources_file_and_no_list(tmp_path):
    readme = (ROOT / "README.md").read_text()
    match = re.search(
        r"```\n# (/etc/apt/sources\.list\.d/offset-relay\.sources)\n(.*?)```", readme, re.DOTALL
    )
    assert match, "README.md: no offset-relay.sources example"
    readme_path, readme_fields = match.group(1), fields(match.group(2))
    variables = yaml.safe_load((ROLE / "vars" / "main.yml").read_text())
    assert variables["__offset_relay_apt_sources"] == readme_path
    url = "https://apt.example.org/offset-relay/"
    text = render(
        tmp_path,
        {
            "offset_relay_apt_repository": f"deb {url} bookworm main",
            "offset_relay_apt_key_url": "https://apt.example.org/offset-relay/offset-relay.asc",
        },
    )
    # The README's file, but for deb-src, which the role does not need.
    assert fields(text) == {**readme_fields, "Types": "deb"}
    assert not any(
        ".list" in line for line in (ROLE / "tasks" / "package.yml").open() if "dest:" in line
    )


@pytest.mark.parametrize(
    ("line", "key", "expected"),
    [
        (
            "deb http://r/ bookworm main contrib",
            "",
            {
                "Types": "deb",
                "URIs": "http://r/",
                "Suites": "bookworm",
                "Components": "main contrib",
            },
        ),
        (
            "deb-src [arch=amd64,arm64 signed-by=/k.gpg] http://r/ stable/",
            "KEY",
            {
                "Types": "deb-src",
                "URIs": "http://r/",
                "Suites": "stable/",
                "Architectures": "amd64 arm64",
                "Signed-By": "/k.gpg",
            },
        ),
        (
            "  deb [arch=amd64] http://r/ bookworm main  ",
            "KEY",
            {
                "Types": "deb",
                "URIs": "http://r/",
                "Suites": "bookworm",
                "Components": "main",
                "Architectures": "amd64",
                "Signed-By": KEYRING,
            },
        ),
    ],
)
def test_a_sources_line_becomes_its_deb822_fields(tmp_path, line, key, expected):
    text = render(tmp_path, {"offset_relay_apt_repository": line, "offset_relay_apt_key": key})
    assert fields(text) == expected
