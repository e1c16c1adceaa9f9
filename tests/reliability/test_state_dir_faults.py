"""A state directory that cannot be written, on a live relay: the budgets' state file lives on
a small tmpfs that this test fills up (``No space left on device``) and remounts read-only.
The relay keeps serving and counting, says so once per spell, writes again when it can, and
never leaves a partial file in place of the good one (nor a temporary file beside it).

Needs root (to mount); skipped otherwise.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..integration.conftest import tunnel
from .relaylib import METRICS

DEADLINE = 15.0
BATCH = 64 * 1024  # relay/bandwidth.py BUDGET_BATCH


@contextlib.contextmanager
def small_tmpfs(where: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "offset-relay-test", str(where)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {result.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def remount(where: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(where)], check=True)


def fill(where: Path) -> Path:
    """Fill the file system to the last byte (and a few inodes' worth of blocks)."""
    filler = where / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 4096)
    finally:
        os.close(fd)
    return filler


def wait_line(relay, text: str, after: int) -> int:
    """Wait for a log line containing ``text`` among lines from index ``after``; its index."""
    deadline = time.monotonic() + DEADLINE
    while True:
        for index, line in enumerate(relay.lines[after:], after):
            if text in line:
                return index
        assert time.monotonic() < deadline, f"no {text!r}:\n" + "\n".join(relay.lines[-20:])
        time.sleep(0.05)


def saved_total(path: Path) -> int:
    return int(json.loads(path.read_text())["total"][1])


def carry(ends, data: bytes) -> None:
    _, connector, acceptor = ends
    chunks = [data[i : i + 50_000] for i in range(0, len(data), 50_000)]
    connector.send_many(chunks)
    for chunk in chunks:
        assert acceptor.receive(timeout=10) == chunk


def leftovers(where: Path) -> list[str]:
    return sorted(p.name for p in where.iterdir() if p.name not in ("usage.json", "filler"))


def test_a_full_or_read_only_state_directory_is_survived_said_once_and_written_again(
    relay_factory, tmp_path
):
    with small_tmpfs(tmp_path / "state") as state:
        path = state / "usage.json"
        relay = relay_factory(
            METRICS + f'[budgets]\ntotal_monthly = {10**12}\nstate_file = "{path}"\n'
            "save_interval = 1\n"
        )
        ends = tunnel(relay)
        try:
            carry(ends, b"a" * 200_000)  # past the batch the budgets count by
            deadline = time.monotonic() + DEADLINE
            while not (path.exists() and saved_total(path) >= 100_000):
                assert time.monotonic() < deadline, (
                    path.exists() and path.read_text(),
                    [line for line in relay.lines if "budget" in line],
                )
                time.sleep(0.1)
            for fault, make, undo, error in (
                ("full", lambda: fill(state), lambda f: f.unlink(), "No space left on device"),
                (
                    "read-only",
                    lambda: remount(state, "ro"),
                    lambda _: remount(state, "rw"),
                    "Read-only file system",
                ),
            ):
                good = path.read_bytes()
                mark = len(relay.lines)
                undo_with = make()
                # Traffic goes on; each save fails; the good file stays as it was.
                for n in range(4):
                    carry(ends, bytes([n]) * 100_000)
                    time.sleep(0.6)
                first = wait_line(relay, "budgets: cannot write", mark)
                assert error in relay.lines[first], (fault, relay.lines[first])
                time.sleep(2.5)  # two more save intervals: still said only once
                assert sum("cannot write" in line for line in relay.lines[mark:]) == 1, fault
                assert path.read_bytes() == good, fault
                assert leftovers(state) == [], (fault, leftovers(state))
                assert relay.proc.poll() is None
                undo(undo_with)
                wait_line(relay, "written again", mark)
                # Counted all along: what was read meanwhile is in the file (but for the
                # batch each connection's bytes are added to the budgets in).
                assert saved_total(path) >= json.loads(good)["total"][1] + 400_000 - 2 * BATCH
                assert leftovers(state) == [], fault
        finally:
            for end in ends:
                end.close()
        # A stop with the directory read-only: the last save fails, said, and the relay
        # still exits cleanly with the good file in place.
        good = path.read_bytes()
        remount(state, "ro")
        try:
            assert relay.stop() == 0
        finally:
            remount(state, "rw")
        assert path.read_bytes() == good
        assert leftovers(state) == []
        assert "Traceback" not in relay.log_text()
