"""``python -m bench``: run the benchmarks, write results.json and RESULTS.md, print the table."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

from . import relay, report, scenarios
from .relay import BenchError, raise_fd_limit

HERE = Path(__file__).resolve().parent
# A one-minute load average from this up, before the run, means the machine is not idle.
BUSY_LOAD = 0.7
TESTS = (
    "wire", "latency", "bulk", "handshakes", "small", "idle", "instances", "controls", "scale"
)  # fmt: skip


def _relay_python_version() -> str:
    if relay.relay_python == sys.executable:
        return platform.python_version()
    proc = subprocess.run(
        [relay.relay_python, "-c", "import platform; print(platform.python_version())"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise BenchError(f"cannot run {relay.relay_python}")
    return proc.stdout.strip()


def machine() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = 0.0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) / (1 << 20)
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "pynacl": version("PyNaCl"),
        "relay_python": relay.relay_python,
        "relay_python_version": _relay_python_version(),
    }


def _say(text: str) -> None:
    print(f"bench: {text}", file=sys.stderr, flush=True)


def run(
    sizes: scenarios.Sizes, only: tuple[str, ...], workdir: Path, original: Path | None = None
) -> dict:
    """Run the chosen benchmarks in order; returns the results document."""
    started = time.monotonic()
    needed = max(sizes.idle_connections, max(sizes.small_connections)) + 1000
    # Test 10 asks for one relay's worth; under a lower limit it spreads over instances.
    scale_needed = sizes.scale_connections + scenarios.SCALE_SPARE_DESCRIPTORS
    fd_limit = raise_fd_limit(max(needed, scale_needed) if "scale" in only else needed)
    if fd_limit < needed and any(name in only for name in ("idle", "small", "controls")):
        raise BenchError(
            f"RLIMIT_NOFILE hard limit {fd_limit} is below the {needed} needed (as root the"
            " bench raises it; otherwise raise it with ulimit -Hn)"
        )
    results: dict = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "sizes": scenarios.sizes_dict(sizes),
        # The machine may be shared: the load average shows how much else was running.
        "load_average_before": round(os.getloadavg()[0], 2),
    }
    cpu_before = relay.machine_cpu()
    if results["load_average_before"] >= BUSY_LOAD:
        _say(f"warning: one-minute load average {results['load_average_before']:.1f} before the"
             " run: other work shares the cores, so every figure reads high")  # fmt: skip
    if "wire" in only:
        _say("7 wire overhead")
        results["wire"] = scenarios.wire(sizes)
    wire_bytes = (results.get("wire") or scenarios.wire(sizes))["ours"]
    needs_floors = any(name in only for name in ("bulk", "small", "handshakes", "instances"))
    if needs_floors:
        _say("floors, first reading")
        first = scenarios.measure_floors(sizes, wire_bytes)
    if "latency" in only:
        _say(f"5 latency: {sizes.latency_samples} round trips, direct and through the relay")
        results["latency"] = scenarios.latency(workdir, sizes)
    if "bulk" in only:
        _say(f"1 bulk: {sizes.bulk_bytes / (1 << 20):g} MiB through one tunnel")
        results["bulk"] = scenarios.bulk(workdir, sizes)
    if "handshakes" in only:
        _say(f"3 handshakes for {sizes.handshake_seconds:g} s")
        results["handshakes"] = scenarios.handshakes(workdir, sizes)
    if "small" in only:
        runs = []
        for connections in sizes.small_connections:
            _say(f"2/6 small messages over {connections} connections")
            result = scenarios.small(workdir, sizes, connections, latency=True)
            result["connections_asked"] = connections
            runs.append(result)
        window_runs = []
        for window in sizes.small_windows:
            _say(f"2 small messages over {sizes.small_headline} connections, window {window}")
            window_runs.append(
                scenarios.small(workdir, sizes, sizes.small_headline, latency=False, window=window)
            )
        results["small"] = {
            "message_bytes": sizes.small_message,
            "headline": sizes.small_headline,
            "runs": runs,
            "window_runs": window_runs,
        }
    if "idle" in only:
        _say(f"4 idle: {sizes.idle_connections} connections held {sizes.idle_seconds:g} s")
        results["idle"] = scenarios.idle(workdir, sizes)
    if "instances" in only:
        runs = []
        for count in (1, 2):
            _say(f"8 instances: test 2's headline load over {count} relay(s)")
            runs.append(scenarios.instances(workdir, sizes, count))
        results["instances"] = {"runs": runs}
    if "controls" in only:
        _say(f"9 controls: test 2's headline load with every control off and on, "
             f"{sizes.controls_rounds} round(s)")  # fmt: skip
        results["controls"] = scenarios.controls(workdir, sizes)
    if "scale" in only:
        _say(
            f"10 scale: {sizes.scale_connections:,} listen connections held"
            f" {sizes.scale_seconds:g} s, rekey every {sizes.scale_rekey_interval:g} s"
        )
        instances, _ = scenarios.scale_plan(sizes.scale_connections, fd_limit)
        if instances > 1:
            _say(f"warning: a process may hold {fd_limit:,} descriptors here (RLIMIT_NOFILE,"
                 f" not raisable without CAP_SYS_RESOURCE): test 10 spreads over {instances}"
                 " relay instances")  # fmt: skip
        results["scale"] = scenarios.scale(workdir, sizes, fd_limit)
    if original is not None:
        results["original"] = _original(sizes, only, workdir, original)
    if needs_floors:
        _say("floors, second reading")
        last = scenarios.measure_floors(sizes, wire_bytes)
        results["floors"] = {"first": asdict(first), "last": asdict(last)}
        scenarios.apply_floors(results, first.cheapest(last))
    results["targets"] = [target.as_dict() for target in report.targets(results)]
    results["load_average_after"] = round(os.getloadavg()[0], 2)
    results["steal_share"] = round(relay.steal_share(cpu_before, relay.machine_cpu()), 3)
    results["duration_seconds"] = round(time.monotonic() - started, 1)
    return results


ORIGINAL_LOADS = ("bulk", "small", "handshakes", "idle")


def _original(sizes: scenarios.Sizes, only: tuple[str, ...], workdir: Path, folder: Path) -> dict:
    """The same loads against the original strelay (small: the headline run only)."""
    results: dict = {"strelay": str(folder / "strelay")}
    relay.original_bin = folder  # BenchRelay(...) now starts the original's strelay
    loads = {
        "bulk": lambda: scenarios.bulk(workdir / "original", sizes),
        "handshakes": lambda: scenarios.handshakes(workdir / "original", sizes),
        "small": lambda: scenarios.small(
            workdir / "original", sizes, sizes.small_headline, latency=False
        ),
        "idle": lambda: scenarios.idle(workdir / "original", sizes),
    }
    try:
        for name in ORIGINAL_LOADS:
            if name in only:
                _say(f"{name}, original strelay")
                try:
                    results[name] = loads[name]()
                except BenchError as exc:
                    # The original may fail a load; the table says so instead of a figure.
                    _say(f"{name}, original strelay: {exc}")
                    results[name] = {"error": str(exc)}
    finally:
        relay.original_bin = None
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark strelay on loopback; writes results.json and RESULTS.md.",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: checks that the harness works"
    )
    parser.add_argument("--output", type=Path, default=HERE / "results.json")
    parser.add_argument("--markdown", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument(
        "--relay-python",
        default=sys.executable,
        help="interpreter that runs strelay (default: this one); it must import the "
        "package's dependencies, the package itself is taken from this tree",
    )
    parser.add_argument(
        "--original",
        type=Path,
        default=os.environ.get("OFFSET_ORIGINAL_BIN") or None,
        help="folder of the original Offset binaries (default: $OFFSET_ORIGINAL_BIN): the "
        f"{', '.join(ORIGINAL_LOADS)} loads also run against its strelay",
    )
    parser.add_argument(
        "--only",
        default=",".join(TESTS),
        help=f"comma-separated subset of: {', '.join(TESTS)}",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    only = tuple(name.strip() for name in args.only.split(",") if name.strip())
    unknown = [name for name in only if name not in TESTS]
    if unknown:
        print(f"bench: error: unknown test {unknown[0]!r} (choose from {', '.join(TESTS)})",
              file=sys.stderr)  # fmt: skip
        return 64
    sizes = scenarios.SMOKE if args.smoke else scenarios.FULL
    relay.relay_python = args.relay_python
    if args.original is not None:
        if not os.access(args.original / "strelay", os.X_OK):
            print(f"bench: error: no strelay in {args.original}", file=sys.stderr)
            return 64
        original = args.original.resolve()
    else:
        original = None
    try:
        with tempfile.TemporaryDirectory(prefix="offset-bench-") as workdir:
            results = run(sizes, only, Path(workdir), original)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    text = report.markdown(results)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(text)
    print(report.markdown_table(results))
    for target in report.targets(results):
        print(f"{target.name}: {target.shown()} {target.unit}: {target.verdict()}")
    _say(f"wrote {args.output} and {args.markdown} in {results['duration_seconds']:.0f} s")
    return 0
