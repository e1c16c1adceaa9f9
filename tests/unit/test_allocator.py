"""The relay's allocator settings (offset_appliance/allocator.py): set through glibc's
mallopt, and left alone when the operator's environment sets them."""

from __future__ import annotations

import ctypes

import pytest

from offset_appliance import allocator


def test_the_thresholds_are_set_with_glibc(monkeypatch):
    for name in allocator._OPERATOR_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    # This runs where the relay runs: on glibc (Debian).
    assert hasattr(ctypes.CDLL(None), "mallopt")
    assert allocator.tune() is True


@pytest.mark.parametrize("name", ["GLIBC_TUNABLES", "MALLOC_TRIM_THRESHOLD_"])
def test_an_operators_settings_are_left_alone(monkeypatch, name):
    monkeypatch.setenv(name, "glibc.malloc.trim_threshold=1" if name == "GLIBC_TUNABLES" else "1")
    assert allocator.tune() is False
