"""Fixtures of the reliability scenarios: the integration suite's real relays, more file
descriptors for the test process, and the soak figures written at the end of a soak run."""

from __future__ import annotations

import resource

import pytest

from ..integration.conftest import relay_factory  # noqa: F401 - re-exported fixture
from .scale import FIGURES, RESULTS, SOAK

# Thousands of client sockets live in this process at once.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft < _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))


@pytest.fixture
def figures():
    """The soak figures, for scenarios to add their counts to."""
    return FIGURES


def pytest_sessionfinish(session, exitstatus):
    if SOAK:
        FIGURES.write(RESULTS, "passed" if exitstatus == 0 else f"failed (exit {exitstatus})")
