"""The relay host checks run only against hosts named with ``--hosts``.

Without ``--hosts`` pytest-testinfra would check the machine running pytest, which is not a
relay: in a plain ``pytest`` run these checks are deselected. ``tests/deploy/test_ansible.py``
runs them against the hosts it deploys.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect this directory's checks when no hosts were given."""
    if config.getoption("hosts", default=None):
        return
    ours = [item for item in items if HERE in Path(str(item.path)).resolve().parents]
    if ours:
        config.hook.pytest_deselected(items=ours)
        items[:] = [item for item in items if item not in ours]
