"""tools/build-in-chroot reports and leaves in its output folder this run's packages only:
run with stand-ins for mmdebstrap, zstd and systemd-nspawn (the chroot's base is a plain tar,
the "build" writes the files dpkg-buildpackage would)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "build-in-chroot"

# The build: the files dpkg-buildpackage writes beside the source, or a failure.
NSPAWN = """#!/bin/sh
for arg; do case $arg in --directory=*) dir=${arg#--directory=} ;; esac; done
echo "build-in-chroot: building as builder"
[ -z "${FAKE_BUILD_FAILS:-}" ] || exit 2
for f in offset-relay_9.9.9_all.deb offset-relay_9.9.9_amd64.buildinfo \\
    offset-relay_9.9.9_amd64.changes; do
    echo new >"$dir/build/$f"
done
"""

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the script insists on root")


@pytest.fixture
def rig(tmp_path: Path) -> dict[str, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in {
        "systemd-nspawn": NSPAWN,
        "zstd": "#!/bin/sh\nexec cat\n",  # the base below is a plain tar
        "mmdebstrap": "#!/bin/sh\necho mmdebstrap must not run: the base is fresh >&2\nexit 1\n",
    }.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    cache = tmp_path / "cache"
    (tmp_path / "base").mkdir()
    cache.mkdir()
    subprocess.run(
        ["tar", "-cf", cache / "buildd-bookworm.tar.zst", "-C", tmp_path / "base", "."],
        check=True,
    )
    src = tmp_path / "src"
    src.mkdir()
    (src / "offset-relay_9.9.9.tar.xz").write_text("source")
    (src / "offset-relay_9.9.9.dsc").write_text(
        "Source: offset-relay\nVersion: 9.9.9\nFiles:\n 0123 6 offset-relay_9.9.9.tar.xz\n"
    )
    out = tmp_path / "out"
    out.mkdir()
    # An earlier run's results.
    for stale in ("offset-relay_0.0.1_all.deb", "offset-relay_0.0.1_amd64.changes", "build.log"):
        (out / stale).write_text("old")
    (out / "notes.txt").write_text("mine")
    return {"bin": bin_dir, "cache": cache, "dsc": src / "offset-relay_9.9.9.dsc", "out": out}


def build(rig: dict[str, Path], out: Path | None = None, **env: str):
    return subprocess.run(
        [SCRIPT, rig["dsc"], out or rig["out"]],
        env={
            **os.environ,
            "PATH": f"{rig['bin']}:/usr/sbin:/usr/bin:/sbin:/bin",
            "OFFSET_CACHE_DIR": str(rig["cache"]),
            **env,
        },
        capture_output=True,
        text=True,
    )


def test_reports_and_keeps_only_this_runs_packages(rig):
    result = build(rig)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "build-in-chroot: built offset-relay_9.9.9_all.deb in a clean bookworm chroot"
    ]
    assert sorted(p.name for p in rig["out"].iterdir()) == [
        "build.log",
        "notes.txt",
        "offset-relay_9.9.9_all.deb",
        "offset-relay_9.9.9_amd64.buildinfo",
        "offset-relay_9.9.9_amd64.changes",
    ]
    assert (rig["out"] / "build.log").read_text() == "build-in-chroot: building as builder\n"


def test_a_failed_build_leaves_no_older_package(rig):
    result = build(rig, FAKE_BUILD_FAILS="1")
    assert result.returncode == 1
    assert "the build failed (exit 2)" in result.stderr
    assert sorted(p.name for p in rig["out"].iterdir()) == ["build.log", "notes.txt"]


def test_refuses_the_folder_of_the_dsc(rig):
    (rig["dsc"].parent / "offset-relay_9.9.8_all.deb").write_text("make deb's")
    result = build(rig, out=rig["dsc"].parent)
    assert result.returncode == 2
    assert result.stderr == "build-in-chroot: OUTDIR must not be the folder of the .dsc\n"
    assert (rig["dsc"].parent / "offset-relay_9.9.8_all.deb").read_text() == "make deb's"
