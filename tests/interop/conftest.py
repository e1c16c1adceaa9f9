"""Fixtures shared with the integration tests: real strelay processes on loopback."""

from ..integration.conftest import RelayProcess, relay_factory  # noqa: F401 - fixtures
