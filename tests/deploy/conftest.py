"""Fixtures for deployment tests: the built .deb, and booted bookworm hosts (rig.py).

``make_rig(count, name=..., repo_debs=[deb_package])`` boots ``count`` hosts on one bridge
with a local apt repository and returns the Rig; every rig a module made is torn down when
the module ends, also when a test fails. Hosts are reached as ``rig.hosts[i].ssh(...)``, or
by Ansible and testinfra through ``rig.ssh_config`` and ``rig.write_ansible_inventory()``.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from offset_appliance import __version__

from .rig import Rig, missing_prerequisites

ROOT = Path(__file__).resolve().parents[2]
BUILD_TOOLS = ("make", "dpkg-buildpackage", "dh", "dpkg-deb")


@pytest.fixture(scope="session")
def deb_package() -> Path:
    """dist/offset-relay_<version>_all.deb, freshly built with ``make deb``."""
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building the package needs {', '.join(missing)} (run tools/install-deps)")
    deb = ROOT / "dist" / f"offset-relay_{__version__}_all.deb"
    lock = ROOT / "build" / ".deb.lock"
    lock.parent.mkdir(exist_ok=True)
    # Two test runs in one checkout would otherwise build in the same build/deb at once.
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        deb.unlink(missing_ok=True)
        result = subprocess.run(
            ["make", "-s", "deb"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=600,
        )
        if result.returncode != 0:
            pytest.fail(f"make deb failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        assert deb.is_file(), f"make deb did not write {deb}"
    return deb


def run_make(target: str, timeout: float = 900, **variables: str) -> None:
    """``make -s TARGET`` in the project, failing the test with its output if it fails."""
    result = subprocess.run(
        ["make", "-s", target, *(f"{k}={v}" for k, v in variables.items())],
        cwd=ROOT,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=timeout,
    )
    if result.returncode != 0:
        pytest.fail(f"make {target} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")


def make_signed_repo(out: Path, key_dir: Path, *packages: Path) -> Path:
    """A signed apt repository of ``packages`` in ``out`` (tools/make-apt-repo), signed by
    the key in the GnuPG home ``key_dir`` (made there on first use)."""
    result = subprocess.run(
        [ROOT / "tools" / "make-apt-repo", out, *packages],
        env={**os.environ, "APT_KEY_DIR": str(key_dir)},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="session")
def previous_deb() -> Path:
    """The previous release's package (``make previous-deb``), to upgrade from."""
    missing = [tool for tool in BUILD_TOOLS if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"building the package needs {', '.join(missing)} (run tools/install-deps)")
    with open(_build_lock(), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        run_make("previous-deb", timeout=600)
    (deb,) = (ROOT / "dist" / "previous").glob("offset-relay_*_all.deb")
    return deb


@pytest.fixture(scope="session")
def source_package() -> Path:
    """dist/offset-relay_<version>.dsc (``make source``)."""
    if shutil.which("dpkg-source") is None:
        pytest.skip("building the source package needs dpkg-source (run tools/install-deps)")
    with open(_build_lock(), "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        run_make("source", timeout=300)
    return ROOT / "dist" / f"offset-relay_{__version__}.dsc"


def _build_lock() -> Path:
    lock = ROOT / "build" / ".deb.lock"
    lock.parent.mkdir(exist_ok=True)
    return lock


@pytest.fixture(scope="module")
def make_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Rig]]:
    """A factory of booted rigs (see Rig's arguments), all torn down at the module's end."""
    reason = missing_prerequisites()
    if reason:
        pytest.skip(reason)
    rigs: list[Rig] = []

    def make(count: int = 1, *, name: str = "host", **kwargs: Any) -> Rig:
        rig = Rig(tmp_path_factory.mktemp(f"rig-{name}"), count, name=name, **kwargs)
        rigs.append(rig)
        rig.start()
        return rig

    try:
        yield make
    finally:
        for rig in reversed(rigs):
            rig.close()
