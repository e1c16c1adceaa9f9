"""A ``strelay`` process under test, and what /proc says about it (CPU time, resident memory)."""

from __future__ import annotations

import ctypes
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from offset_appliance.files import generate_identity

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_LISTENING = re.compile(r"listening on 127\.0\.0\.1:(\d+)")

ROOT = Path(__file__).resolve().parent.parent

# The interpreter that runs the relay: by default the one running the benchmarks; ``python -m
# bench --relay-python /usr/bin/python3`` measures Debian's, which the packaged relay uses.
relay_python = sys.executable

# Loopback load comes from one address, so the per-IP and total connection limits are raised;
# everything else (handshake limit, buffers, timeouts) stays at the shipped defaults.
BENCH_LIMITS = {
    "max_connections": 100_000,
    "max_connections_per_ip": 100_000,
    # Every tunnel of a listener connects from 127.0.0.1: the per-source share of a
    # listener's pending connects is raised to the whole of it.
    "max_half_tunnels_per_listener_per_ip": 128,
    # The bench measures how many handshakes the relay can do: no per-source rate.
    "new_connections_per_ip_per_second": 1 << 20,
    "new_connections_per_ip_burst": 1 << 20,
}


class BenchError(Exception):
    """A benchmark could not run (the relay failed, a client process failed, a set-up stalled)."""


@dataclass(frozen=True)
class Usage:
    """One reading of a process's CPU time (seconds) and resident memory (KiB)."""

    user: float
    system: float
    rss_kib: int
    at: float  # time.monotonic() of the reading
    # The kernel's nanosecond count of the process's time on a CPU (/proc/<pid>/schedstat),
    # or None where the kernel does not keep it. user and system come in clock ticks (10 ms):
    # a short window of little work can read 0 in ticks though the process ran.
    exact: float | None = None

    @property
    def cpu(self) -> float:
        """CPU seconds: the exact count where there is one, else user plus system."""
        return self.exact if self.exact is not None else self.user + self.system


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, from /proc/<pid>/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    # The command name may contain spaces and parentheses; the fields after its last ")"
    # start with field 3 (state), so utime (field 14) and stime (field 15) are at 11 and 12.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def exact_cpu(pid: int) -> float | None:
    """Seconds a single-threaded process has run on a CPU, to the nanosecond, from
    /proc/<pid>/schedstat; None for a process with more threads (the file counts its main
    thread only: the original strelay's work is in its runtime's worker threads, which
    /proc/<pid>/stat's ticks include)."""
    try:
        if len(os.listdir(f"/proc/{pid}/task")) != 1:
            return None
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for process {pid}")


def machine_cpu() -> tuple[int, int]:
    """(steal, total) clock ticks of all CPUs since boot, from /proc/stat's ``cpu`` line.

    On a virtual machine "steal" is time the hypervisor gave the virtual CPUs' host cores to
    someone else: a process that ran then is charged for time in which it did no work, so a
    window with steal reads slower than the same work on a machine of its own.
    """
    try:
        with open("/proc/stat") as stat:
            fields = [int(field) for field in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return 0, 0
    # user nice system idle iowait irq softirq steal guest guest_nice; guest time is already
    # in user and nice.
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of all CPUs' time the hypervisor took between two ``machine_cpu`` readings."""
    ticks = after[1] - before[1]
    return (after[0] - before[0]) / ticks if ticks > 0 else 0.0


def usage(pid: int) -> Usage:
    """CPU time and RSS of a process now."""
    user, system = cpu_times(pid)
    return Usage(user, system, rss_kib(pid), time.monotonic(), exact_cpu(pid))


def _die_with_parent() -> None:
    """In the relay's child process: get SIGTERM if the benchmark driver dies first."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the relay is stopped by ``stop`` as usual


def free_port() -> int:
    """A port free on 127.0.0.1 now (for a process that must be told its port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def raise_fd_limit(needed: int = 0) -> int:
    """Raise RLIMIT_NOFILE to the hard limit (inherited by the relay and the clients), and
    the hard limit to ``needed`` where that is higher and allowed (root may, up to
    fs.nr_open)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if hard < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, needed))
            return needed
        except (ValueError, OSError):
            pass  # not privileged: the caller says what is missing
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


# The folder of the original Offset binaries while a load runs against the original strelay
# (``python -m bench --original DIR``); None for ours.
original_bin: Path | None = None


class BenchRelay:
    """Starts ``strelay`` on 127.0.0.1 with a fresh identity; stops it on ``stop``.

    The relay's sd_notify STATUS= lines are collected through a private NOTIFY_SOCKET, so the
    benchmarks can read the relay's own connection counts. With ``profile`` set, the relay
    runs under cProfile and writes its statistics there when it stops. While ``original_bin``
    is set, ``BenchRelay(...)`` starts the original's strelay instead (``OriginalRelay``), so
    every load runs unchanged against either.
    """

    def __new__(cls, *args, **kwargs):
        if cls is BenchRelay and original_bin is not None:
            cls = OriginalRelay
        return super().__new__(cls)

    def __init__(
        self, workdir: Path, *, profile: Path | None = None, settings: dict | None = None
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.identity = generate_identity(workdir / "relay.ident")
        self.public_key = bytes(self.identity.verify_key)
        config = workdir / "relay.toml"
        # ``settings``: more tables of the relay's config ({"bandwidth": {...}, ...}); its
        # "limits", if any, are added to BENCH_LIMITS.
        tables = {key: dict(value) for key, value in (settings or {}).items()}
        tables["limits"] = {**BENCH_LIMITS, **tables.get("limits", {})}
        config.write_text(
            tomli_w.dumps(
                {
                    "identity_file": str(workdir / "relay.ident"),
                    "listen": ["127.0.0.1:0"],
                    "log_level": "info",
                    **tables,
                }
            )
        )
        self.lines: list[str] = []
        self.status = ""
        self._notify_path = workdir / "notify.sock"
        self._notify_path.unlink(missing_ok=True)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(str(self._notify_path))
        self._notify.settimeout(0.5)
        command = [relay_python]
        if profile is not None:
            command += ["-m", "cProfile", "-o", str(profile)]
        command += ["-m", "offset_appliance.cli.strelay", "--config", str(config)]
        env = dict(os.environ, NOTIFY_SOCKET=str(self._notify_path))
        # Another interpreter may not have the package installed: run it from this tree.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.pop("WATCHDOG_USEC", None)
        env.pop("JOURNAL_STREAM", None)
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=_die_with_parent,
        )
        self.pid = self.proc.pid
        self._running = True
        self._threads = [
            threading.Thread(target=self._read_log, daemon=True),
            threading.Thread(target=self._read_notify, daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        self.port = self._wait_port()
        self.address = ("127.0.0.1", self.port)
        self.ticket_address = f"127.0.0.1:{self.port}"

    def _read_log(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def _read_notify(self) -> None:
        while self._running:
            try:
                data = self._notify.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            for line in data.decode(errors="replace").splitlines():
                if line.startswith("STATUS="):
                    self.status = line[len("STATUS=") :]

    def _wait_port(self) -> int:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = _LISTENING.search(line)
                if match:
                    return int(match.group(1))
            if self.proc.poll() is not None:
                self._threads[0].join(2)
                raise BenchError("strelay exited at start: " + " | ".join(self.lines[-5:]))
            time.sleep(0.02)
        raise BenchError("strelay did not report its listening address within 20 s")

    def usage(self) -> Usage:
        """The relay's CPU time and RSS now."""
        self.check_alive()
        return usage(self.pid)

    def status_count(self, what: str) -> int | None:
        """A count from the relay's latest STATUS= line, e.g. ``status_count("listening")``."""
        match = re.search(r"(\d+) " + re.escape(what), self.status)
        return int(match.group(1)) if match else None

    def wait_status(self, what: str, value: int, timeout: float) -> int | None:
        """Wait until the relay reports ``value`` for ``what`` (STATUS= comes every 2 s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            current = self.status_count(what)
            if current == value:
                return current
            time.sleep(0.1)
        return self.status_count(what)

    def check_alive(self) -> None:
        """Raise BenchError if the relay has exited."""
        if self.proc.poll() is not None:
            raise BenchError(
                f"strelay exited with status {self.proc.returncode}: " + " | ".join(self.lines[-5:])
            )

    def problems(self) -> list[str]:
        """Log lines that show the relay misbehaving (tracebacks, errors)."""
        return [line for line in self.lines if "Traceback" in line or " ERROR " in line]

    def stop(self) -> int:
        """SIGTERM the relay and wait for it (a profile is written as it exits)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._running = False
        for thread in self._threads:
            thread.join(2)
        self._notify.close()
        self._notify_path.unlink(missing_ok=True)
        return self.proc.returncode

    def __enter__(self) -> BenchRelay:
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


class OriginalRelay(BenchRelay):
    """The original Offset ``strelay`` (from ``original_bin``) on 127.0.0.1, fresh identity.

    It has no STATUS= lines (``status_count`` gives None) and cannot be profiled; its CPU time
    and memory are read from /proc like ours (all its threads count).
    """

    def __init__(
        self, workdir: Path, *, profile: Path | None = None, settings: dict | None = None
    ) -> None:
        if profile is not None:
            raise BenchError("the original strelay cannot run under cProfile")
        if settings:
            raise BenchError("the original strelay has no settings of ours")
        assert original_bin is not None
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.identity = generate_identity(workdir / "relay.ident")
        self.public_key = bytes(self.identity.verify_key)
        self.port = free_port()
        self.lines = []
        self.status = ""
        self.proc = subprocess.Popen(
            [
                str(original_bin / "strelay"),
                "--idfile",
                str(workdir / "relay.ident"),
                "--laddr",
                f"127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_die_with_parent,
        )
        self.pid = self.proc.pid
        self._running = True
        self._threads = [threading.Thread(target=self._read_log, daemon=True)]
        self._threads[0].start()
        deadline = time.monotonic() + 20
        while True:
            self.check_alive()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise BenchError("the original strelay did not listen within 20 s") from None
                time.sleep(0.05)
        self.address = ("127.0.0.1", self.port)
        self.ticket_address = f"127.0.0.1:{self.port}"

    def problems(self) -> list[str]:
        return [line for line in self.lines if "panicked" in line]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._running = False
        self._threads[0].join(2)
        return self.proc.returncode
