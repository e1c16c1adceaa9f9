"""From one release to the next on a booted bookworm host, the way an operator does it
(issue 13): the previous release installed, the signed repository added as README.md says,
``apt install offset-relay`` to upgrade, a downgrade back, an upgrade over an edited
conffile; then autopkgtest runs the package's own tests (debian/tests) on the host.

One host serves the whole module and the tests run in the order written. The hosts cannot
reach the Debian archive: the rig's local repository holds the previous release and the
dependencies, and the signed repository (tools/make-apt-repo) is served beside it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from offset_appliance import __version__

from .conftest import ROOT, make_signed_repo
from .rig import Host, Rig
from .test_package import assert_probe_ok, identity_digest, journal_cursor, unit, wait_active

pytestmark = pytest.mark.deploy

APT = "DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0"
IDENTITY = "/var/lib/offset-relay/relay.ident"
CONFIG = "/etc/offset-relay/relay.toml"
DROP_IN = "/etc/offset-relay/relay.d/50-local.toml"
README_URL = "https://apt.example.org/offset-relay/"
# Unattended upgrades keep an edited conffile this way (README.md, "Upgrades and downgrades").
KEEP_CONFFILES = '-o Dpkg::Options::="--force-confdef" -o Dpkg::Options::="--force-confold"'


@dataclass(frozen=True)
class Release:
    """The host with the previous release installed, and that release's ticket."""

    host: Host
    version: str
    ticket: Path
    identity: str


@pytest.fixture(scope="module")
def rig(make_rig: Callable[..., Rig], previous_deb: Path) -> Rig:
    # autopkgtest and dpkg-dev (to unpack the .dsc) for the last test, from the local
    # repository like every other package the host installs.
    return make_rig(
        1, name="upgrade", repo_debs=[previous_deb], repo_packages=["autopkgtest", "dpkg-dev"]
    )


@pytest.fixture(scope="module")
def signed_url(
    rig: Rig,
    previous_deb: Path,
    deb_package: Path,
    source_package: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> str:
    """The signed repository as publishing release after release makes it: the previous
    release published first, then this one (source and binary) added; served to the host."""
    work = tmp_path_factory.mktemp("signed")
    make_signed_repo(work / "repo", work / "gnupg", previous_deb)
    repo = make_signed_repo(work / "repo", work / "gnupg", source_package, deb_package)
    return rig.serve_tree(repo, "offset-relay")


@pytest.fixture(scope="module")
def previous(rig: Rig, previous_deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Release:
    host = rig.hosts[0]
    version = previous_deb.name.split("_")[1]
    host.ssh(f"{APT} update")
    host.ssh(f"{APT} install offset-relay", timeout=600)
    assert installed_version(host) == version
    wait_active(host)
    made = host.ssh(
        f"stmgr relay-ticket --address {host.address}:4567 --idfile {IDENTITY} "
        "--output /root/relay.relay && cat /root/relay.relay"
    ).stdout
    ticket = tmp_path_factory.mktemp("ticket") / "relay.relay"
    ticket.write_text(made)
    assert json.loads(made)["address"] == f"{host.address}:4567"
    assert_probe_ok(ticket)
    return Release(host, version, ticket, identity_digest(host))


def installed_version(host: Host) -> str:
    return host.ssh("dpkg-query -W -f '${Status} ${Version}' offset-relay").stdout.replace(
        "install ok installed ", ""
    )


def readme_sources_file() -> str:
    """The deb822 sources file README.md tells a host to write."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Publishing the package", 1)[1].split("\n## ", 1)[0]
    match = re.search(
        r"```\n# /etc/apt/sources\.list\.d/offset-relay\.sources\n(.*?)```", section, re.DOTALL
    )
    assert match, "README.md: no offset-relay.sources example under Publishing the package"
    return match.group(1)


def relay_starts_and_stops(host: Host, cursor: str) -> tuple[int, int]:
    """How often systemd started and stopped offset-relay.service since ``cursor``."""
    out = host.ssh(
        f"journalctl --no-pager -o json _PID=1 UNIT=offset-relay.service --after-cursor='{cursor}'"
    ).stdout
    messages = [json.loads(line).get("MESSAGE", "") for line in out.splitlines()]
    starts = sum(1 for m in messages if m.startswith("Started offset-relay.service"))
    stops = sum(1 for m in messages if m.startswith("Stopped offset-relay.service"))
    return starts, stops


def test_host_adds_the_signed_repository_as_the_readme_says(
    previous: Release, signed_url: str, rig: Rig
) -> None:
    host = previous.host
    key = rig.repo_dir / "offset-relay" / "offset-relay.asc"
    host.ssh("install -d -m 0755 /etc/apt/keyrings")
    host.write("/etc/apt/keyrings/offset-relay.asc", key.read_text(), mode="0644")
    sources = readme_sources_file()
    assert README_URL in sources
    host.write(
        "/etc/apt/sources.list.d/offset-relay.sources", sources.replace(README_URL, signed_url)
    )
    update = host.ssh(f"{APT} update 2>&1")
    # Signed, and by the key it names: no warning about the repository at all.
    assert not re.search(r"^(W|E|Err):", update.stdout, re.MULTILINE), update.stdout
    policy = host.ssh("apt-cache policy offset-relay").stdout
    assert f"Candidate: {__version__}" in policy, policy
    assert f"500 {signed_url.rstrip('/')} bookworm/main amd64 Packages" in policy, policy
    # deb-src: the source package comes from it too.
    showsrc = host.ssh("apt-cache showsrc offset-relay").stdout
    assert f"Version: {__version__}" in showsrc, showsrc


def test_upgrade_keeps_identity_and_configuration_and_restarts_once(
    previous: Release, signed_url: str, deb_package: Path
) -> None:
    host = previous.host
    host.write(DROP_IN, 'log_level = "warning"\n')
    host.ssh("systemctl restart offset-relay")
    wait_active(host)
    pid = unit(host, "MainPID")["MainPID"]
    cursor = journal_cursor(host)

    # No --force-conf* and no terminal: a conffile question would fail the upgrade.
    result = host.ssh(f"{APT} install offset-relay </dev/null 2>&1", check=False, timeout=600)

    assert result.returncode == 0, result.stdout[-4000:]
    assert f"Unpacking offset-relay ({__version__}) over ({previous.version})" in result.stdout
    assert "Configuration file" not in result.stdout
    assert installed_version(host) == __version__
    wait_active(host)
    assert identity_digest(host) == previous.identity
    # Untouched conffile: this release's; the operator's drop-in: as it was.
    shipped = (ROOT / "packaging" / "debian" / "relay.toml").read_text()
    assert host.read(CONFIG) == shipped
    assert host.read(DROP_IN) == 'log_level = "warning"\n'
    assert host.ssh(f"ls {CONFIG}.dpkg-new {CONFIG}.dpkg-old 2>/dev/null; true").stdout == ""
    assert unit(host, "MainPID")["MainPID"] != pid
    assert relay_starts_and_stops(host, cursor) == (1, 1)
    assert host.ssh("systemctl show -p NRestarts --value offset-relay").stdout.strip() == "0"
    assert_probe_ok(previous.ticket)  # the ticket handed out before still names the relay


def test_downgrade_from_the_published_repository_keeps_the_identity(
    previous: Release, signed_url: str, rig: Rig, previous_deb: Path
) -> None:
    """README.md's downgrade command, with the previous release from the signed repository
    only: the rig's local repository, which installed it first, no longer has it, and
    apt's cache is emptied."""
    host = previous.host
    (rig.repo_dir / previous_deb.name).unlink()
    rig.publish()
    # Nor apt's cache: the package is fetched from the signed repository.
    host.ssh(f"{APT} clean && {APT} update")
    madison = host.ssh("apt-cache madison offset-relay").stdout
    binaries = [
        [field.strip() for field in line.split("|")]
        for line in madison.splitlines()
        if line.rstrip().endswith(" Packages")
    ]
    assert sorted(version for _, version, _ in binaries) == sorted(
        [previous.version, __version__]
    ), madison
    assert all(where.startswith(signed_url.rstrip("/")) for _, _, where in binaries), madison
    cursor = journal_cursor(host)

    result = host.ssh(
        f"{APT} install --allow-downgrades offset-relay={previous.version} </dev/null 2>&1",
        check=False,
        timeout=600,
    )

    assert result.returncode == 0, result.stdout[-4000:]
    assert f"Unpacking offset-relay ({previous.version}) over ({__version__})" in result.stdout
    assert re.search(
        rf"^Get:\d+ {re.escape(signed_url.rstrip('/'))} bookworm/main amd64 offset-relay all "
        rf"{re.escape(previous.version)} ",
        result.stdout,
        re.MULTILINE,
    ), result.stdout[-4000:]
    assert installed_version(host) == previous.version
    wait_active(host)
    assert identity_digest(host) == previous.identity
    assert host.read(DROP_IN) == 'log_level = "warning"\n'
    assert relay_starts_and_stops(host, cursor) == (1, 1)
    assert_probe_ok(previous.ticket)


def test_upgrade_keeps_an_edited_conffile(previous: Release) -> None:
    host = previous.host
    assert installed_version(host) == previous.version
    edited = host.read(CONFIG).replace('#log_level = "info"', 'log_level = "info"  # operator')
    assert edited != host.read(CONFIG)
    host.write(CONFIG, edited)
    cursor = journal_cursor(host)

    result = host.ssh(
        f"{APT} {KEEP_CONFFILES} install offset-relay </dev/null 2>&1", check=False, timeout=600
    )

    assert result.returncode == 0, result.stdout[-4000:]
    assert installed_version(host) == __version__
    wait_active(host)
    assert host.read(CONFIG) == edited
    assert identity_digest(host) == previous.identity
    assert relay_starts_and_stops(host, cursor) == (1, 1)
    assert_probe_ok(previous.ticket)


def test_autopkgtest_passes_on_the_host(
    previous: Release, source_package: Path, deb_package: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """autopkgtest (the null runner: the booted host is the testbed) runs debian/tests of
    the source package against the package under test."""
    host = previous.host
    host.ssh("rm -rf /root/adt && mkdir -p /root/adt")
    tarball = source_package.with_name(f"offset-relay_{__version__}.tar.xz")
    for path in (source_package, tarball, deb_package):
        host.put(path, f"/root/adt/{path.name}")
    host.ssh(f"{APT} install --no-install-recommends autopkgtest dpkg-dev", timeout=600)

    result = host.ssh(
        "cd /root/adt && autopkgtest --output-dir /root/adt/out "
        f"{source_package.name} {deb_package.name} -- null 2>&1",
        check=False,
        timeout=900,
    )

    summary = host.ssh("cat /root/adt/out/summary", check=False).stdout
    with capsys.disabled():  # the verdict, in every run's output
        print(f"\nautopkgtest (null runner on {host.name}): {summary.strip()}")
    assert result.returncode == 0, result.stdout[-6000:]
    assert re.search(r"^smoke\s+PASS", summary, re.MULTILINE), summary
    log = host.read("/root/adt/out/log")
    assert "stmgr probe passes through the relay's own ticket" in log
    assert re.search(r"^OK relay ", log, re.MULTILINE), log[-3000:]
    assert installed_version(host) == __version__
