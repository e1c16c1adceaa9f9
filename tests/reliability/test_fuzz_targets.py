"""The fuzz targets of ``fuzz/targets.py`` driven by Hypothesis (always) and by atheris
(when it is installed; ``make soak`` installs it): hostile bytes at every layer yield our
``ProtocolError`` or nothing, never another exception."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.targets import SEEDS, TARGETS
from offset_appliance.errors import ProtocolError

from .scale import SOAK, budget

ROOT = Path(__file__).resolve().parents[2]
# A soak gives each target half of its share of the fuzzing time under Hypothesis (about
# 500 examples a second for the slowest target) and half under atheris.
SOAK_SECONDS_PER_TARGET = budget("fuzz_targets") / 2 / len(TARGETS)
EXAMPLES = max(1000, int(SOAK_SECONDS_PER_TARGET * 500)) if SOAK else 1000


def _mutate(seed: bytes, edits: list[tuple[int, int, int]], cut: int | None) -> bytes:
    """Apply (kind, position, value) edits: flip bits, overwrite, insert or delete a byte."""
    data = bytearray(seed)
    for kind, position, value in edits:
        if kind == 0 and data:
            data[position % len(data)] ^= 1 << (value % 8)
        elif kind == 1 and data:
            data[position % len(data)] = value
        elif kind == 2:
            data.insert(position % (len(data) + 1), value)
        elif kind == 3 and data:
            del data[position % len(data)]
    return bytes(data[:cut] if cut is not None else data)


def hostile(name: str) -> st.SearchStrategy[bytes]:
    """Random bytes, and valid inputs of the target with a few edits (which get far deeper
    into a decoder than random bytes do)."""
    edit = st.tuples(st.integers(0, 3), st.integers(0, 1 << 16), st.integers(0, 255))
    mutated = st.builds(
        _mutate,
        st.sampled_from(SEEDS[name]),
        st.lists(edit, max_size=6),
        st.none() | st.integers(0, 4096),
    )
    return st.binary(max_size=4096) | mutated


def _refuses_only_with_protocol_error(name: str, data: bytes) -> None:
    try:
        TARGETS[name](data)
    except ProtocolError:
        pass


def _hypothesis_test(name: str):
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        database=None,
    )
    @given(data=hostile(name))
    def run(data: bytes) -> None:
        _refuses_only_with_protocol_error(name, data)

    return run


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_hostile_input_yields_only_protocol_errors(name, figures):
    _hypothesis_test(name)()
    figures.add("fuzz_target_examples", EXAMPLES)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_seed_is_accepted_by_its_target(name):
    # The seeds are valid inputs: if a target refused them, the fuzzing would start from
    # inputs that never reach the deep end of the layer.
    for seed in SEEDS[name]:
        TARGETS[name](seed)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TARGETS))
def test_atheris_coverage_guided(name, tmp_path, figures):
    pytest.importorskip("atheris", reason="atheris is not installed (make soak installs it)")
    seconds = max(5, int(SOAK_SECONDS_PER_TARGET)) if SOAK else 5
    result = subprocess.run(
        [sys.executable, "-m", "fuzz.run", name, f"-max_total_time={seconds}", "-seed=1"],
        cwd=tmp_path,  # libFuzzer writes crash-* files into the working directory
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=seconds + 120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "Done" in output and "Traceback" not in output, output[-4000:]
    runs = [line for line in output.splitlines() if line.startswith("Done ")]
    figures.add("atheris_runs", int(runs[-1].split()[1]))
