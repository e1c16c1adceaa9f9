"""Test-run settings for the whole suite.

`make test` runs the suite on two workers (pytest-xdist, ``-n 2 --dist loadscope``): each
test module is one unit of work, except that the deployment tests (tests/deploy, booted
bookworm hosts, mostly waiting on them) are ONE unit: they run on one worker, in their
order, one booted rig at a time and the package built once, while the other worker runs
the rest of the suite beside them.
"""

from __future__ import annotations

from typing import Any

DEPLOY = "tests/deploy/"


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
