"""``offset_relay_instances``: the role deploys one relay per instance of
offset-relay@.service on a freshly booted bookworm host, each with its own port, identity
and ticket, and goes back to the single offset-relay.service at 1."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

import pytest

from .rig import Host, Rig
from .test_ansible import (
    Controller,
    assert_probe_passes,
    copy_ansible_dir,
    identity_key,
    probe,
)

pytestmark = pytest.mark.deploy


def _state(host: Host, unit: str) -> tuple[str, str]:
    active = host.ssh(f"systemctl is-active {unit}", check=False).stdout.strip()
    enabled = host.ssh(f"systemctl is-enabled {unit}", check=False).stdout.strip()
    return active, enabled


@pytest.fixture(scope="module")
def controller(
    make_rig: Callable[..., Rig], deb_package: Path, tmp_path_factory: pytest.TempPathFactory
) -> Controller:
    rig = make_rig(1, name="ansinst", repo_debs=[deb_package], repo_packages=["python3-apt"])
    directory = copy_ansible_dir(tmp_path_factory.mktemp("controller") / "ansible")
    host = rig.hosts[0]
    return Controller(rig, directory, {host.name: {"offset_relay_instances": 2}})


def test_two_instances_each_with_its_own_port_identity_and_ticket(controller: Controller) -> None:
    host = controller.rig.hosts[0]
    run_ = controller.playbook()
    assert run_.returncode == 0, run_.tail()
    keys = set()
    for index, port in ((1, 4567), (2, 4568)):
        ticket = controller.directory / "tickets" / f"{host.name}-{index}.relay"
        content = json.loads(ticket.read_text())
        assert content["address"] == f"{host.address}:{port}"
        keys.add(content["publicKey"])
        assert_probe_passes(ticket)
        assert _state(host, f"offset-relay@{index}.service") == ("active", "enabled")
        mode = host.ssh(f"stat -c '%U %a' /var/lib/offset-relay/{index}/relay.ident").stdout
        assert mode.split() == ["offset-relay", "600"]
    assert len(keys) == 2
    assert _state(host, "offset-relay.service") == ("inactive", "disabled")
    assert not (controller.directory / "tickets" / f"{host.name}.relay").exists()


def test_a_second_run_with_instances_changes_nothing(controller: Controller) -> None:
    controller.playbook().assert_clean(controller.names)


def test_an_instance_identity_that_is_a_link_fails_the_play_and_is_never_followed(
    controller: Controller,
) -> None:
    """Every instance's identity is handled as the single relay's: a symbolic link left in
    the state directory (which the relay's user owns) fails the play, and what it points
    to is neither read, chowned nor chmodded."""
    host = controller.rig.hosts[0]
    identity = "/var/lib/offset-relay/2/relay.ident"
    host.ssh("install -m 0644 /dev/null /root/target && echo untouched > /root/target")
    host.ssh(f"mv {identity} /root/relay-2.ident.saved")
    try:
        host.ssh(
            "setpriv --reuid=offset-relay --regid=offset-relay --clear-groups -- "
            f"ln -s /root/target {identity}"
        )
        run_ = controller.playbook()
        assert run_.returncode != 0
        assert "is not a regular file" in run_.output, run_.tail()
        assert host.ssh("stat -c '%U %G %a' /root/target").stdout.strip() == "root root 644"
        assert host.read("/root/target").strip() == "untouched"
    finally:
        host.ssh(f"rm -f {identity} && mv /root/relay-2.ident.saved {identity}")
    controller.playbook().assert_clean(controller.names)


def test_a_lost_instance_identity_is_made_again_by_the_relays_user(controller: Controller) -> None:
    host = controller.rig.hosts[0]
    identity = "/var/lib/offset-relay/2/relay.ident"
    host.ssh(f"rm {identity}")
    run_ = controller.playbook()
    assert run_.returncode == 0, run_.tail()
    assert host.ssh(f"stat -c '%U %a' {identity}").stdout.strip() == "offset-relay 600"
    # The new key is in force: the instance was restarted and its new ticket probes.
    ticket = controller.directory / "tickets" / f"{host.name}-2.relay"
    assert_probe_passes(ticket)
    controller.playbook().assert_clean(controller.names)


def test_private_instances_are_verified_with_the_probe_identity(controller: Controller) -> None:
    """With listen_allow and connect_allow set, each instance's probe is refused and the play
    fails naming the list and offset_relay_probe_identity; with that variable, each
    instance's lists admit its key and the probe listens and connects as it, from the
    controller and from the host."""
    host = controller.rig.hosts[0]
    settings = controller.host_vars[host.name]
    nodes_key = "9s1Yw3Y3nBL0hHN3lTxsVr2O8TmTjmBkS5oDq8yRcnA"
    access = {"listen_allow": [nodes_key], "connect_allow": [nodes_key]}
    controller.host_vars[host.name] = {**settings, "offset_relay_access": access}
    try:
        refused = controller.playbook("-e", "offset_relay_verify_timeout=3")
        assert refused.returncode != 0
        # A loop's failure is "failed: [host] (item=N)", reported by the fail task only.
        assert refused.recap[host.name]["failed"] == 1, refused.tail()
        assert f"failed: [{host.name}] (item=1)" in refused.output, refused.tail()
        assert "Fail for an instance that does not pass the probe" in refused.output
        assert "offset_relay_access.listen_allow" in refused.output, refused.tail()
        assert "Set offset_relay_probe_identity" in refused.output, refused.tail()

        controller.host_vars[host.name] = {
            **settings,
            "offset_relay_access": access,
            "offset_relay_probe_identity": "probe.ident",
        }
        run_ = controller.playbook()
        assert run_.returncode == 0, run_.tail()
        identity = controller.directory / "probe.ident"
        key = identity_key(identity)
        for index in (1, 2):
            written = tomllib.loads(host.read(f"/etc/offset-relay/{index}.toml"))["access"]
            assert written == {"listen_allow": [nodes_key, key], "connect_allow": [nodes_key, key]}
            ticket = controller.directory / "tickets" / f"{host.name}-{index}.relay"
            assert probe(ticket).returncode == 1
            admitted = subprocess.run(
                [Path(sys.executable).parent / "stmgr", "probe", ticket,
                 "--listener-idfile", identity, "--connector-idfile", identity],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert admitted.returncode == 0, admitted.stderr
        controller.playbook().assert_clean(controller.names)
        from_host = controller.playbook("-e", "offset_relay_verify_from_controller=false")
        from_host.assert_clean(controller.names)
        left = host.ssh("find /tmp /root -name '*.ident'", check=False).stdout.strip()
        assert left == "", left
    finally:
        controller.host_vars[host.name] = settings
        controller.playbook()


def test_back_to_one_relay_stops_the_instances(controller: Controller) -> None:
    host = controller.rig.hosts[0]
    one = Controller(
        controller.rig, controller.directory, {host.name: {"offset_relay_instances": 1}}
    )
    run_ = one.playbook()
    assert run_.returncode == 0, run_.tail()
    for index in (1, 2):
        assert _state(host, f"offset-relay@{index}.service")[0] == "inactive"
    assert _state(host, "offset-relay.service") == ("active", "enabled")
    assert_probe_passes(one.ticket(host))
