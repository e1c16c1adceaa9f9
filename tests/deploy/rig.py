"""Real Debian bookworm hosts for deployment tests (DESIGN.md section 5).

Each host is a bookworm root file system made by mmdebstrap (cached between runs), booted
by systemd-nspawn with systemd as PID 1 inside its own network namespace, and reached over
SSH with a key made for the run, the way an operator (or Ansible, or testinfra) reaches a
server. The hosts of one rig share a bridge on the controller: the controller is
198.18.N.1, the hosts 198.18.N.2, 198.18.N.3, ... The hosts have no route to the Debian
archive; a local apt repository served over HTTP from 198.18.N.1 plays its part, holding
the packages under test and whatever of their dependencies the base system lacks, so that
``apt install`` on a host resolves dependencies the way it does for a user. With
``ipv6=True`` the bridge also carries two IPv6 /64s of unique local addresses (see
``Rig.ipv6_subnets``): the controller is ``::1`` in each, the hosts ``::2``, ``::3``, ... in
the first, which reach the second on-link.

Usage::

    with Rig(workdir, count=2, name="ansible", repo_debs=[deb]) as rig:
        for host in rig.hosts:
            host.ssh("apt-get install -y offset-relay")
        # rig.ssh_config, rig.known_hosts and rig.key serve Ansible and testinfra;
        # rig.write_ansible_inventory(path) writes an inventory for them.

Every resource a rig makes (network namespaces, links, processes, directories) is recorded
in a state file under /run/offset-relay-rig, so that a later rig cleans up after one whose
process died before it could tear down. Needs root, mmdebstrap, systemd-container,
iproute2, openssh-client, dpkg-dev and zstd.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

log = logging.getLogger("rig")

SUITE = "bookworm"
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "openssh-server", "python3")
CACHE_DIR = Path("/var/cache/offset-relay-tests")
STATE_DIR = Path("/run/offset-relay-rig")
# RFC 2544's benchmarking range: never routed, so a test cannot reach anything real.
NET_PREFIX = "198.18"
# One unique local /48 (RFC 4193, picked at random once) for every rig's IPv6: rig N takes
# the /64s with subnet ids N and 0x100 + N (N < 256), so concurrent rigs never share one.
ULA_PREFIX = ipaddress.IPv6Network("fd5e:7a1c:93b4::/48")
REPO_PORT = 8080
REQUIRED_TOOLS = ("mmdebstrap", "systemd-nspawn", "ip", "ssh", "ssh-keygen", "dpkg-scanpackages")

# A base system older than this is made again: its packages must stay close enough to the
# archive's that the dependencies served beside it fit.
ROOTFS_MAX_AGE = 7 * 24 * 3600.0
BOOT_TIMEOUT = 90.0
POWEROFF_TIMEOUT = 15.0


class RigError(Exception):
    """The rig could not build, boot, reach or tear down a host."""


def missing_prerequisites() -> str | None:
    """Why this machine cannot run a rig (not root, a tool missing), or None if it can."""
    if os.geteuid() != 0:
        return "the real-host rig needs root (network namespaces, systemd-nspawn)"
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"the real-host rig needs {', '.join(missing)} (run tools/install-deps)"
    return None


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    check: bool = True,
    timeout: float = 300.0,
    input: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command on the controller, capturing its output; raise RigError if it fails."""
    args = [str(a) for a in argv]
    try:
        result = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            cwd=cwd,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        raise RigError(f"{' '.join(args)}: no answer within {timeout:.0f} s") from exc
    if check and result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
        raise RigError(f"{' '.join(args)}: exit {result.returncode}: {' | '.join(tail)}")
    return result


# --- the base system -------------------------------------------------------------------


def rootfs_tarball(include: Iterable[str] = ()) -> Path:
    """The cached bookworm root file system with BASE_PACKAGES and ``include``; made once."""
    packages = sorted(set(BASE_PACKAGES) | set(include))
    key = hashlib.sha256(json.dumps([SUITE, "apt", packages]).encode()).hexdigest()[:16]
    tarball = CACHE_DIR / f"rootfs-{SUITE}-{key}.tar.zst"

    def fresh() -> bool:
        return tarball.is_file() and time.time() - tarball.stat().st_mtime < ROOTFS_MAX_AGE

    if fresh():
        return tarball
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with _locked(CACHE_DIR / ".rootfs.lock"):
        if fresh():  # made by another run while this one waited for the lock
            return tarball
        # mmdebstrap picks the output format from the name: keep the .tar.zst ending.
        partial = tarball.with_name(f".partial-{os.getpid()}-{tarball.name}")
        log.info("mmdebstrap %s with %s", SUITE, ",".join(packages))
        try:
            run(
                [
                    "mmdebstrap",
                    "--quiet",
                    "--variant=apt",
                    f"--include={','.join(packages)}",
                    SUITE,
                    partial,
                ],
                timeout=900,
            )
            if not partial.is_file():
                raise RigError(f"mmdebstrap did not write {partial}")
            os.replace(partial, tarball)
        finally:
            if partial.is_dir():
                shutil.rmtree(partial, ignore_errors=True)
            partial.unlink(missing_ok=True)
    return tarball


def installed_packages(tarball: Path) -> set[str]:
    """Names of the packages installed in a root file system tarball."""
    status = run(["tar", "--zstd", "-xOf", tarball, "./var/lib/dpkg/status"]).stdout
    names: set[str] = set()
    for stanza in status.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", stanza, re.MULTILINE))
        if fields.get("Status") == "install ok installed":
            names.add(fields["Package"])
    return names


def deb_dependencies(deb: Path) -> set[str]:
    """Every package name a .deb's Depends and Pre-Depends mention (all alternatives)."""
    names: set[str] = set()
    for name in ("Depends", "Pre-Depends"):
        value = run(["dpkg-deb", "-f", deb, name]).stdout
        for alternative in re.split(r"[,|]", value):
            word = alternative.strip().split(" ")[0].split("(")[0]
            if word:
                names.add(word.split(":")[0])
    return names


def dependency_closure(names: Iterable[str]) -> set[str]:
    """``names`` and everything they depend on, recursively, as the controller's apt sees it."""
    wanted = sorted(set(names))
    if not wanted:
        return set()
    argv = [
        "apt-cache",
        "depends",
        "--recurse",
        "--no-recommends",
        "--no-suggests",
        "--no-conflicts",
        "--no-breaks",
        "--no-replaces",
        "--no-enhances",
        *wanted,
    ]
    result = run(argv, check=False)
    if result.returncode != 0:
        # A controller that never ran `apt-get update` knows no packages yet.
        run(["apt-get", "update", "-qq"], timeout=600)
        result = run(argv)
    # Lines starting with a space are the dependency lists; <name> marks a virtual package.
    return {
        line.strip()
        for line in result.stdout.splitlines()
        if line and not line.startswith((" ", "<"))
    }


def download_packages(names: Iterable[str], into: Path) -> list[Path]:
    """The .debs of ``names`` (candidate versions) from the Debian archive, cached in ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    wanted = sorted(set(names))
    if not wanted:
        return []
    # --print-uris names the exact files without downloading: only new versions are fetched.
    uris = run(["apt-get", "download", "--print-uris", *wanted], timeout=120).stdout
    files = [into / m.group(1) for m in re.finditer(r"^'[^']+' (\S+\.deb) ", uris, re.MULTILINE)]
    if len(files) != len(wanted):
        raise RigError(f"apt-get download --print-uris did not name a file for each of {wanted}")
    # apt lists the files in its own order: take the package name from each file name.
    missing = sorted({path.name.split("_", 1)[0] for path in files if not path.exists()})
    if missing:
        run(
            ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *missing],
            cwd=into,
            timeout=600,
        )
    absent = [path.name for path in files if not path.exists()]
    if absent:
        raise RigError(f"apt-get download did not write {', '.join(absent)}")
    return files


# --- bookkeeping of what a rig made, for clean-up after a crash --------------------------


def _process_start(pid: int) -> str | None:
    """The start time of a process (to tell a live owner from a reused pid), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    kids: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                kids += [int(c) for c in (task / "children").read_text().split()]
    return kids


def _descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = _children(pid)
    while stack:
        child = stack.pop()
        found.append(child)
        stack += _children(child)
    return found


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and everything below it (a container's init and its system)."""
    for victim in [*_descendants(pid), pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _process_start(pid) is None or _is_zombie(pid):
            return True
        time.sleep(0.1)
    return False


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass
class _Record:
    """What one rig made; written to STATE_DIR/net-N.json after every change."""

    path: Path
    owner: int = field(default_factory=os.getpid)
    owner_start: str | None = field(default_factory=lambda: _process_start(os.getpid()))
    links: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    dirs: list[str] = field(default_factory=list)

    def save(self) -> None:
        data = {k: v for k, v in self.__dict__.items() if k != "path"}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, path: Path) -> _Record:
        data = json.loads(path.read_text())
        return cls(path=path, **data)

    def owner_alive(self) -> bool:
        return _process_start(self.owner) == self.owner_start

    def undo(self) -> None:
        """Remove everything recorded, whatever state it is in; never raises."""
        for pid in self.pids:
            cmdline = b""
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            # A recorded pid may since have been reused by an unrelated process.
            if b"systemd-nspawn" in cmdline or b"http.server" in cmdline:
                _kill_tree(pid)
                _wait_gone(pid, 5)
        for ns in self.netns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for link in self.links:
            subprocess.run(["ip", "link", "del", link], capture_output=True)
        for directory in self.dirs:
            shutil.rmtree(directory, ignore_errors=True)
        self.path.unlink(missing_ok=True)


def clean_stale_rigs() -> None:
    """Undo what rigs whose process has died left behind (namespaces, links, containers)."""
    if not STATE_DIR.is_dir():
        return
    for path in sorted(STATE_DIR.glob("net-*.json")):
        try:
            record = _Record.load(path)
        except (OSError, ValueError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if not record.owner_alive():
            log.warning("cleaning up after a dead rig (%s)", path.name)
            record.undo()


def _claim_subnet() -> tuple[int, _Record]:
    """A free 198.18.N.0/24 for this rig, claimed by creating STATE_DIR/net-N.json."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    in_use = run(["ip", "-o", "-4", "addr", "show"]).stdout
    for n in range(10, 250):
        if f" {NET_PREFIX}.{n}." in in_use:
            continue
        path = STATE_DIR / f"net-{n}.json"
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            continue
        os.close(fd)
        record = _Record(path=path)
        record.save()
        return n, record
    raise RigError(f"no free subnet in {NET_PREFIX}.0.0/16 for another rig")


# --- hosts and the rig -------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    """One booted bookworm host, reached over SSH as root."""

    name: str
    address: str
    netns: str
    root: Path
    ssh_config: Path
    address6: str | None = None  # its address in the rig's first IPv6 /64, if it has one

    def ssh_argv(self, command: str) -> list[str]:
        """The ssh command line that runs ``command`` (a shell string) on this host."""
        return ["ssh", "-F", str(self.ssh_config), self.name, command]

    def ssh(
        self,
        command: str,
        *,
        check: bool = True,
        timeout: float = 300.0,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a shell command on the host; raise RigError if it fails and ``check``."""
        return run(self.ssh_argv(command), check=check, timeout=timeout, input=input)

    def put(self, local: Path, remote: str) -> None:
        """Copy a file from the controller to the host."""
        run(["scp", "-q", "-F", str(self.ssh_config), str(local), f"{self.name}:{remote}"])

    def read(self, path: str) -> str:
        """A text file's content on the host."""
        return self.ssh(f"cat {_quote(path)}").stdout

    def write(self, path: str, content: str, mode: str = "0644") -> None:
        """Write a text file on the host (as root)."""
        quoted = _quote(path)
        self.ssh(
            f"umask 077; cat > {quoted}.new && chmod {mode} {quoted}.new && "
            f"mv {quoted}.new {quoted}",
            input=content,
        )

    @property
    def testinfra_url(self) -> str:
        """The address testinfra's get_host() takes, used with ``ssh_config=``."""
        return f"ssh://{self.name}"


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


@dataclass(frozen=True)
class BootState:
    """What ``systemctl is-system-running`` said after boot, and the failed units if any."""

    state: str
    failed_units: tuple[str, ...]


class Rig:
    """``count`` booted bookworm hosts on one bridge, with a local apt repository."""

    def __init__(
        self,
        workdir: Path,
        count: int = 1,
        *,
        name: str = "rig",
        include: Sequence[str] = (),
        repo_debs: Sequence[Path] = (),
        repo_packages: Sequence[str] = (),
        ipv6: bool = False,
    ) -> None:
        """Hosts named ``<name>-1`` ... ``<name>-<count>``; ``include`` adds packages to the
        base system, ``repo_debs`` are served with the dependencies the base system lacks,
        and ``repo_packages`` (archive package names) are served with theirs, for hosts to
        install with apt. ``ipv6`` adds the rig's two IPv6 /64s to the bridge."""
        if not 1 <= count <= 200:
            raise ValueError("count must be between 1 and 200")
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", name):
            raise ValueError("name must be lower-case letters, digits and dashes")
        self.workdir = Path(workdir)
        self.count = count
        self.name = name
        self.include = tuple(include)
        self.repo_debs = tuple(Path(d) for d in repo_debs)
        self.repo_packages = tuple(repo_packages)
        self.ipv6 = ipv6
        self.hosts: list[Host] = []
        self.boot_states: dict[str, BootState] = {}
        self.ssh_config = self.workdir / "ssh_config"
        self.known_hosts = self.workdir / "known_hosts"
        self.key = self.workdir / "id_ed25519"
        self.repo_dir = self.workdir / "repo"
        self._record: _Record | None = None
        self._subnet = 0
        self._nspawn: dict[str, subprocess.Popen[bytes]] = {}
        self._http: subprocess.Popen[bytes] | None = None
        self._installed: set[str] = set()
        self._old_sigterm: object = None

    # addresses

    @property
    def gateway(self) -> str:
        """The controller's address on the rig's bridge."""
        return f"{NET_PREFIX}.{self._subnet}.1"

    @property
    def ipv6_subnets(self) -> tuple[ipaddress.IPv6Network, ipaddress.IPv6Network]:
        """The rig's two IPv6 /64s (whether or not ``ipv6`` is on): the hosts are in the
        first; the second is on the same bridge, as another source network."""
        base = int(ULA_PREFIX.network_address)
        first, second = (base | (sid << 64) for sid in (self._subnet, 0x100 + self._subnet))
        return ipaddress.IPv6Network((first, 64)), ipaddress.IPv6Network((second, 64))

    @property
    def gateways6(self) -> tuple[str, str]:
        """The controller's address in each of the rig's IPv6 /64s."""
        first, second = self.ipv6_subnets
        return str(first[1]), str(second[1])

    def add_addresses6(self, subnet: ipaddress.IPv6Network, count: int, start: int) -> list[str]:
        """Give the controller ``count`` more addresses of ``subnet`` (one of
        ``ipv6_subnets``), ``subnet[start]`` on, for tests to bind as sources. They go with
        the bridge; ``remove_addresses6`` takes them away sooner."""
        if not self.ipv6 or subnet not in self.ipv6_subnets:
            raise ValueError(f"{subnet} is not one of this rig's IPv6 subnets")
        if start < 0x100:
            raise ValueError("start below 256: those are the rig's own (controller, hosts)")
        bridge = f"or{self._subnet}-br"
        added: list[str] = []
        try:
            for offset in range(count):
                address = str(subnet[start + offset])
                # nodad: usable at once, never "tentative" (no one else on the bridge has it).
                run(["ip", "addr", "add", f"{address}/128", "dev", bridge, "nodad"])
                added.append(address)
        except BaseException:
            self.remove_addresses6(added)
            raise
        return added

    def remove_addresses6(self, addresses: Iterable[str]) -> None:
        """Take addresses ``add_addresses6`` gave off the bridge again; never raises."""
        bridge = f"or{self._subnet}-br"
        for address in addresses:
            subprocess.run(
                ["ip", "addr", "del", f"{address}/128", "dev", bridge], capture_output=True
            )

    @property
    def repo_url(self) -> str:
        """The local apt repository, as the hosts reach it."""
        return f"http://{self.gateway}:{REPO_PORT}/"

    @property
    def apt_source(self) -> str:
        """The sources.list line for the local repository (a flat, unsigned repository)."""
        return f"deb [trusted=yes] {self.repo_url} ./"

    # life cycle

    def __enter__(self) -> Rig:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Build (or reuse) the base system, make the network and repository, boot the hosts."""
        reason = missing_prerequisites()
        if reason:
            raise RigError(reason)
        self._trap_sigterm()
        # Also torn down when the interpreter exits without unwinding (a second Ctrl-C).
        atexit.register(self.close)
        clean_stale_rigs()
        tarball = rootfs_tarball(self.include)
        self._installed = installed_packages(tarball)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._subnet, self._record = _claim_subnet()
        self._make_keys()
        self._make_bridge()
        self.publish(self.repo_debs, self.repo_packages)
        self._start_repository()
        for index in range(1, self.count + 1):
            self.hosts.append(self._prepare_host(index, tarball))
        self._write_ssh_config()
        for host in self.hosts:
            self._boot(host)
        for host in self.hosts:
            self.boot_states[host.name] = self._wait_booted(host)
        if self.ipv6:
            for host in self.hosts:
                self._check_ipv6(host)

    def close(self) -> None:
        """Power the hosts off (SIGKILL whatever lingers), remove the network and files."""
        for host in self.hosts:
            with contextlib.suppress(Exception):
                self._power_off(host)
        if self._http is not None:
            self._http.terminate()
            try:
                self._http.wait(5)
            except subprocess.TimeoutExpired:
                self._http.kill()
                self._http.wait()
            self._http = None
        if self._record is not None:
            self._record.undo()
            self._record = None
        self.hosts = []
        self._restore_sigterm()
        atexit.unregister(self.close)

    def _trap_sigterm(self) -> None:
        # A CI runner stops a job with SIGTERM: treat it like Ctrl-C (KeyboardInterrupt), so
        # that the test run stops and the hosts are torn down instead of left running.
        if not _in_main_thread():
            return
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            self._old_sigterm = signal.signal(signal.SIGTERM, signal.default_int_handler)

    def _restore_sigterm(self) -> None:
        if self._old_sigterm is not None:
            signal.signal(signal.SIGTERM, self._old_sigterm)  # type: ignore[arg-type]
            self._old_sigterm = None

    def _remember(self, **items: object) -> None:
        assert self._record is not None
        for key, value in items.items():
            getattr(self._record, key).append(value)
        self._record.save()

    def adopt(self, *, netns: Sequence[str] = (), links: Sequence[str] = ()) -> None:
        """Record namespaces and links a test made on the rig's network: a later rig removes
        them if this process dies before the test could."""
        for name in netns:
            self._remember(netns=name)
        for name in links:
            self._remember(links=name)

    # pieces

    def _make_keys(self) -> None:
        self.key.unlink(missing_ok=True)
        self.key.with_suffix(".pub").unlink(missing_ok=True)
        run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                f"rig-{self.name}",
                "-f",
                self.key,
            ]
        )
        self.known_hosts.write_text("")

    def _make_bridge(self) -> None:
        bridge = f"or{self._subnet}-br"
        run(["ip", "link", "add", bridge, "type", "bridge"])
        self._remember(links=bridge)
        run(["ip", "addr", "add", f"{self.gateway}/24", "dev", bridge])
        if self.ipv6:
            for gateway in self.gateways6:
                run(["ip", "addr", "add", f"{gateway}/64", "dev", bridge, "nodad"])
        run(["ip", "link", "set", bridge, "up"])

    def publish(self, debs: Sequence[Path] = (), packages: Sequence[str] = ()) -> None:
        """Put .debs (with the dependencies the base system lacks) and archive packages
        (with theirs) into the local repository, and re-index it. Hosts see them after
        ``apt-get update``."""
        self.repo_dir.mkdir(parents=True, exist_ok=True)
        wanted: set[str] = set(packages)
        for deb in debs:
            shutil.copy2(deb, self.repo_dir / deb.name)
            wanted |= deb_dependencies(deb)
        needed = dependency_closure(wanted) - self._installed
        for path in download_packages(needed, CACHE_DIR / "debs"):
            shutil.copy2(path, self.repo_dir / path.name)
        index = run(
            ["dpkg-scanpackages", "--multiversion", ".", "/dev/null"], cwd=self.repo_dir
        ).stdout
        # Only the .debs at the top: the folders below are other repositories (serve_tree).
        stanzas = [
            stanza
            for stanza in index.split("\n\n")
            if re.search(r"^Filename: \./[^/\n]+$", stanza, re.MULTILINE)
        ]
        (self.repo_dir / "Packages").write_text("".join(f"{s.strip()}\n\n" for s in stanzas))

    def serve_tree(self, source: Path, under: str) -> str:
        """Serve a copy of the folder ``source`` (a signed apt repository, say) beside the
        local repository, replacing an earlier copy; returns its URL as the hosts reach it."""
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,30}", under):
            raise ValueError("under must be lower-case letters, digits and dashes")
        target = self.repo_dir / under
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target)
        return f"{self.repo_url}{under}/"

    def _start_repository(self) -> None:
        with open(self.workdir / "repo-http.log", "wb") as log_file:
            self._http = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "http.server",
                    "--bind",
                    self.gateway,
                    "--directory",
                    str(self.repo_dir),
                    str(REPO_PORT),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._remember(pids=self._http.pid)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((self.gateway, REPO_PORT), timeout=1).close()
                return
            except OSError as exc:
                if self._http.poll() is not None or time.monotonic() > deadline:
                    raise RigError(f"the local apt repository did not start: {exc}") from None
                time.sleep(0.1)

    def _prepare_host(self, index: int, tarball: Path) -> Host:
        name = f"{self.name}-{index}"
        netns = f"or{self._subnet}-{name}"
        root = self.workdir / name / "root"
        shutil.rmtree(root.parent, ignore_errors=True)
        root.mkdir(parents=True)
        self._remember(dirs=str(root.parent))
        run(["tar", "--zstd", "-xpf", tarball, "-C", root], timeout=300)
        host = Host(
            name=name,
            address=f"{NET_PREFIX}.{self._subnet}.{index + 1}",
            netns=netns,
            root=root,
            ssh_config=self.ssh_config,
            address6=str(self.ipv6_subnets[0][index + 1]) if self.ipv6 else None,
        )
        etc = root / "etc"
        (etc / "hostname").write_text(f"{name}\n")
        (etc / "hosts").write_text(
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\tlocalhost ip6-localhost\n"
        )
        # The local repository stands in for the archive, which the host cannot reach.
        (etc / "apt" / "sources.list").write_text(f"{self.apt_source}\n")
        if self.ipv6:
            # Should systemd-networkd run, it leaves host0 (and the addresses set here) alone.
            network = etc / "systemd" / "network"
            network.mkdir(parents=True, exist_ok=True)
            (network / "10-rig-host0.network").write_text(
                "[Match]\nName=host0\n\n[Link]\nUnmanaged=yes\n"
            )
        for extra in (etc / "apt" / "sources.list.d").glob("*"):
            extra.unlink()
        # A host key of its own for each host, pinned in known_hosts.
        for old in (etc / "ssh").glob("ssh_host_*"):
            old.unlink()
        host_key = etc / "ssh" / "ssh_host_ed25519_key"
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"root@{name}", "-f", host_key])
        (etc / "ssh" / "sshd_config.d" / "rig.conf").write_text(
            "HostKey /etc/ssh/ssh_host_ed25519_key\n"
        )
        public = host_key.with_suffix(".pub").read_text().split()
        with self.known_hosts.open("a") as known:
            known.write(f"{name},{host.address} {public[0]} {public[1]}\n")
        ssh_dir = root / "root" / ".ssh"
        ssh_dir.mkdir(mode=0o700, exist_ok=True)
        (ssh_dir / "authorized_keys").write_text(self.key.with_suffix(".pub").read_text())
        (ssh_dir / "authorized_keys").chmod(0o600)
        # The network: a veth pair, one end on the bridge, the other (host0) in the netns.
        veth = f"or{self._subnet}-h{index}"
        run(["ip", "netns", "add", netns])
        self._remember(netns=netns)
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "host0", "netns", netns])
        self._remember(links=veth)
        run(["ip", "link", "set", veth, "master", f"or{self._subnet}-br", "up"])
        run(["ip", "-n", netns, "addr", "add", f"{host.address}/24", "dev", "host0"])
        if host.address6 is not None:
            run(["ip", "-n", netns, "addr", "add", f"{host.address6}/64", "dev", "host0", "nodad"])
        run(["ip", "-n", netns, "link", "set", "host0", "up"])
        run(["ip", "-n", netns, "link", "set", "lo", "up"])
        if host.address6 is not None:
            # The second /64 is on the same bridge: reached on-link, not through a router.
            second = str(self.ipv6_subnets[1])
            run(["ip", "-n", netns, "-6", "route", "add", second, "dev", "host0"])
        return host

    def _check_ipv6(self, host: Host) -> None:
        """The host kept its IPv6 address (settled, not tentative) and its route to the
        second /64 through boot."""
        ip = ["ip", "-n", host.netns, "-6", "-o"]
        shown = run([*ip, "addr", "show", "dev", "host0"]).stdout
        line = next((line for line in shown.splitlines() if f" {host.address6}/64 " in line), "")
        if not line or "tentative" in line:
            raise RigError(f"{host.name}: host0 lost {host.address6} or has not settled: {shown}")
        second = str(self.ipv6_subnets[1])
        if not run([*ip, "route", "show", second, "dev", "host0"]).stdout.strip():
            raise RigError(f"{host.name}: host0 lost its route to {second}")

    def _write_ssh_config(self) -> None:
        lines = []
        for host in self.hosts:
            lines += [
                f"Host {host.name} {host.address}",
                f"    HostName {host.address}",
                "    User root",
                f"    IdentityFile {self.key}",
                "    IdentitiesOnly yes",
                f"    UserKnownHostsFile {self.known_hosts}",
                "    StrictHostKeyChecking yes",
                "    BatchMode yes",
                "    ConnectTimeout 5",
                "    ServerAliveInterval 5",
                "    LogLevel ERROR",
                "",
            ]
        self.ssh_config.write_text("\n".join(lines))

    def _boot(self, host: Host) -> None:
        log_path = host.root.parent / "console.log"
        with open(log_path, "wb") as console:
            process = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--boot",
                    "--quiet",
                    f"--directory={host.root}",
                    f"--machine={host.name}",
                    "--register=no",
                    "--keep-unit",
                    "--link-journal=no",
                    "--console=read-only",
                    f"--network-namespace-path=/run/netns/{host.netns}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._nspawn[host.name] = process
        self._remember(pids=process.pid)

    def _wait_booted(self, host: Host) -> BootState:
        deadline = time.monotonic() + BOOT_TIMEOUT
        process = self._nspawn[host.name]
        while True:
            if process.poll() is not None:
                raise RigError(
                    f"{host.name}: systemd-nspawn exited ({process.returncode}); "
                    f"see {host.root.parent / 'console.log'}"
                )
            probe = run(host.ssh_argv("true"), check=False, timeout=15)
            if probe.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RigError(
                    f"{host.name}: no SSH within {BOOT_TIMEOUT:.0f} s: {probe.stderr.strip()}"
                )
            time.sleep(0.5)
        left = max(5.0, deadline - time.monotonic())
        state = host.ssh(
            "systemctl is-system-running --wait", check=False, timeout=left
        ).stdout.strip()
        failed: tuple[str, ...] = ()
        if state != "running":
            listing = host.ssh("systemctl list-units --failed --plain --no-legend", check=False)
            failed = tuple(line.split()[0] for line in listing.stdout.splitlines() if line)
        if state not in ("running", "degraded"):
            raise RigError(f"{host.name}: system is {state!r} after boot (failed: {failed})")
        if failed:
            log.warning("%s booted degraded; failed units: %s", host.name, ", ".join(failed))
        return BootState(state, failed)

    def _power_off(self, host: Host) -> None:
        process = self._nspawn.pop(host.name, None)
        if process is None or process.poll() is not None:
            return
        run(host.ssh_argv("systemctl poweroff"), check=False, timeout=10)
        try:
            process.wait(POWEROFF_TIMEOUT)
        except subprocess.TimeoutExpired:
            # Killing only nspawn would leave the container's systemd running as an orphan.
            log.warning("%s did not power off; killing its init", host.name)
            _kill_tree(process.pid)
            process.wait(10)

    # for Ansible and testinfra

    def write_ansible_inventory(self, path: Path, group: str = "relays") -> Path:
        """An INI inventory of the hosts in ``group``, connecting through ``ssh_config``."""
        lines = [f"[{group}]"]
        for host in self.hosts:
            lines.append(f"{host.name} ansible_host={host.address}")
        lines += [
            "",
            f"[{group}:vars]",
            "ansible_user=root",
            f"ansible_ssh_private_key_file={self.key}",
            f"ansible_ssh_common_args='-F {self.ssh_config}'",
            "ansible_python_interpreter=/usr/bin/python3",
            "",
        ]
        path.write_text("\n".join(lines))
        return path


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def make_tempdir(prefix: str = "offset-relay-rig-") -> Path:
    """A fresh directory for a rig's work files (keys, repository, root file systems)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
