"""Fixtures shared by the unit tests of the relay's loop."""

from __future__ import annotations

import pytest

from .server_rig import Rig


@pytest.fixture
def rigs():
    made: list[Rig] = []

    def make(**kwargs) -> Rig:
        rig = Rig(**kwargs)
        made.append(rig)
        return rig

    yield make
    for rig in made:
        rig.close()
