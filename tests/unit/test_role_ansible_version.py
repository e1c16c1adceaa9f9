"""The role supports the ansible-core of Debian bookworm (2.14), and says so in one voice:
meta/main.yml, the role's README, the README and the deploy tests' Debian ansible-core."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
ROLE = ROOT / "ansible" / "roles" / "offset_relay"
BOOKWORM_ANSIBLE_CORE = (2, 14)


def test_the_minimum_ansible_core_is_bookworms_and_every_document_says_so():
    meta = yaml.safe_load((ROLE / "meta" / "main.yml").read_text())
    minimum = meta["galaxy_info"]["min_ansible_version"]
    assert tuple(int(n) for n in minimum.split(".")) == BOOKWORM_ANSIBLE_CORE
    readme = (ROOT / "README.md").read_text()
    assert re.findall(r"ansible-core (\d+\.\d+) or newer", readme) == [minimum]
    assert "apt install ansible-core" in readme
    role_readme = (ROLE / "README.md").read_text()
    assert re.findall(r"`ansible-core` (\d+\.\d+) or later", role_readme) == [minimum]
    assert re.search(r"[\s\"]ansible-core[\s\"]", (ROOT / "tools" / "install-deps").read_text())
