"""One relay per core: two instances of offset-relay@.service from the package, on a
freshly booted bookworm host, beside the single offset-relay.service, each probed through
its own ticket."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from .rig import Host, Rig
from .test_package import APT, IDENTITY, PORT, assert_probe_ok, wait_for

pytestmark = pytest.mark.deploy

PORTS = {"1": 4601, "2": 4602}


@pytest.fixture(scope="module")
def host(make_rig: Callable[..., Rig], deb_package: Path) -> Host:
    host = make_rig(1, name="inst", repo_debs=[deb_package]).hosts[0]
    host.ssh(f"{APT} update")
    result = host.ssh(f"{APT} install offset-relay 2>&1", check=False, timeout=600)
    assert result.returncode == 0, f"apt install failed:\n{result.stdout[-4000:]}"
    return host


def _active(host: Host, unit: str) -> bool:
    return host.ssh(f"systemctl is-active {unit}", check=False).stdout.strip() == "active"


@pytest.fixture(scope="module")
def instances(host: Host) -> Host:
    for name, port in PORTS.items():
        host.ssh(f"printf 'listen = [\"0.0.0.0:{port}\"]\\n' > /etc/offset-relay/{name}.toml")
    host.ssh("systemctl start offset-relay@1.service offset-relay@2.service")
    for name in PORTS:
        unit = f"offset-relay@{name}"
        wait_for(f"instance {name}", functools.partial(_active, host, unit))
    return host


def _ticket(host: Host, name: str, tmp_path: Path) -> Path:
    made = host.ssh(
        "t=$(mktemp -u) && stmgr relay-ticket --address "
        f"{host.address}:{PORTS[name]} --idfile /var/lib/offset-relay/{name}/relay.ident "
        "--output $t && cat $t && rm $t"
    ).stdout
    path = tmp_path / f"{name}.relay"
    path.write_text(made)
    return path


def test_the_package_installs_the_template_without_enabling_an_instance(host: Host) -> None:
    assert (
        host.ssh("test -f /lib/systemd/system/offset-relay@.service", check=False).returncode == 0
    )
    listed = host.ssh(
        "systemctl list-units --all --plain --no-legend 'offset-relay@*'", check=False
    ).stdout
    assert listed.strip() == ""
    assert _active(host, "offset-relay.service")


def test_two_instances_run_beside_the_single_relay_each_with_its_own_identity(
    instances: Host, tmp_path: Path
) -> None:
    host = instances
    assert _active(host, "offset-relay.service")
    keys = set()
    for name in PORTS:
        stat = host.ssh(f"stat -c '%U %a' /var/lib/offset-relay/{name}/relay.ident").stdout
        assert stat.split() == ["offset-relay", "600"]
        ticket = _ticket(host, name, tmp_path)
        keys.add(json.loads(ticket.read_text())["publicKey"])
        assert_probe_ok(ticket)
    single = host.ssh(f"stmgr relay-ticket --address x:{PORT} --idfile {IDENTITY} "
                      "--output /tmp/single.relay && cat /tmp/single.relay").stdout  # fmt: skip
    keys.add(json.loads(single)["publicKey"])
    assert len(keys) == 3


def test_an_instance_keeps_its_identity_across_a_restart(instances: Host, tmp_path: Path) -> None:
    host = instances
    before = host.ssh("sha256sum /var/lib/offset-relay/2/relay.ident").stdout
    host.ssh("systemctl restart offset-relay@2.service")
    wait_for("instance 2 after its restart", lambda: _active(host, "offset-relay@2"))
    assert host.ssh("sha256sum /var/lib/offset-relay/2/relay.ident").stdout == before
    assert_probe_ok(_ticket(host, "2", tmp_path))


def test_instances_are_as_hardened_as_the_single_unit(instances: Host) -> None:
    def exposure(unit: str) -> str:
        report = instances.ssh(f"systemd-analyze security --no-pager {unit}").stdout
        return report.strip().splitlines()[-1]

    assert (
        exposure("offset-relay@1.service").split()[-2:]
        == exposure("offset-relay.service").split()[-2:]
    )
