"""Test-run settings for the whole suite.

`make test` runs the suite on two workers (pytest-xdist, ``-n 2 --dist loadscope``): each
test module is one unit of work, except that the deployment tests (tests/deploy, booted
bookworm hosts, mostly waiting on them) are ONE unit: they run on one worker, in their
order, one booted rig at a time and the package built once, while the other worker runs
the rest of the suite beside them.
"""

from __future__ import annotations

from typing import Any

import pytest

DEPLOY = "tests/deploy/"


# Optional: a run without xdist (``-p no:xdist``, or a single test) has no such hook.
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: Any, log: Any) -> Any:
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class DeployTestsTogether(LoadScopeScheduling):
        """loadscope (a module a unit), with every deployment module in one unit."""

        def _split_scope(self, nodeid: str) -> str:
            if nodeid.startswith(DEPLOY):
                return DEPLOY
            return super()._split_scope(nodeid)

    return DeployTestsTogether(config, log)
