"""pytest-testinfra checks of a host deployed by ``ansible/deploy-relay.yml``.

Against your own relays, from the top of a checkout::

    pytest tests/deploy/testinfra --hosts='ansible://relays' \\
        --ansible-inventory=ansible/inventory/relays.yml
    pytest tests/deploy/testinfra --hosts=ssh://root@relay1.example.org

The relay port is 4567 unless ``OFFSET_RELAY_PORT`` says otherwise.
"""

from __future__ import annotations

import json
import os
import shlex

import pytest

PORT = int(os.environ.get("OFFSET_RELAY_PORT", "4567"))
SERVICE = "offset-relay.service"
STATE_DIR = "/var/lib/offset-relay"
IDENTITY = f"{STATE_DIR}/relay.ident"
TICKET = f"{STATE_DIR}/relay.relay"
DROP_IN = "/etc/offset-relay/relay.d/50-ansible.toml"
USER = "offset-relay"
TCP_LISTEN = "0A"  # the kernel's TCP_LISTEN state in /proc/net/tcp*


def listening_sockets(host) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket, read from /proc/net/tcp and tcp6.

    A minimal Debian host has neither ``ss`` nor ``netstat``, which testinfra's socket
    module needs.
    """
    found: set[tuple[str, int]] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in host.file(table).content_string.splitlines()[1:]:
            fields = line.split()
            address, port = fields[1].split(":")
            if fields[3] == TCP_LISTEN:
                wildcard = set(address) == {"0"}
                name = ("::" if len(address) == 32 else "0.0.0.0") if wildcard else address
                found.add((name, int(port, 16)))
    return found


def unit_properties(host, *names: str) -> dict[str, str]:
    """``systemctl show`` of the relay's unit, as a dict."""
    argv = ["systemctl", "show", SERVICE, *(f"--property={name}" for name in names)]
    output = host.check_output(shlex.join(argv))
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def test_package_is_installed(host) -> None:
    assert host.package("offset-relay").is_installed


def test_service_is_enabled_and_running(host) -> None:
    service = host.service("offset-relay")
    assert service.is_enabled
    assert service.is_running


def test_relay_runs_as_its_own_user(host) -> None:
    pid = unit_properties(host, "MainPID")["MainPID"]
    assert pid != "0"
    assert host.check_output(f"stat -c %U /proc/{int(pid)}") == USER


@pytest.mark.parametrize("address", ["0.0.0.0", "::"])
def test_listening_on_the_relay_port(host, address: str) -> None:
    assert (address, PORT) in listening_sockets(host)


def test_settings_drop_in_is_installed(host) -> None:
    drop_in = host.file(DROP_IN)
    assert drop_in.is_file
    assert (drop_in.user, drop_in.group, drop_in.mode) == ("root", "root", 0o644)
    assert f'"0.0.0.0:{PORT}"' in drop_in.content_string


def test_identity_is_private_to_the_relay(host) -> None:
    state = host.file(STATE_DIR)
    assert (state.user, state.mode) == (USER, 0o700)
    identity = host.file(IDENTITY)
    assert identity.is_file
    assert (identity.user, identity.group, identity.mode) == (USER, USER, 0o600)


def test_ticket_matches_the_identity(host) -> None:
    # Root's, in a directory the relay's user owns: that user cannot have written it.
    ticket_file = host.file(TICKET)
    assert ticket_file.is_file and not ticket_file.is_symlink
    assert (ticket_file.user, ticket_file.mode) == ("root", 0o644)
    ticket = json.loads(ticket_file.content_string)
    assert set(ticket) == {"publicKey", "address"}
    # The public key as the relay's own tool derives it from the identity, into a
    # throwaway ticket (stmgr never overwrites a file, hence a fresh directory).
    script = (
        "set -eu; d=$(mktemp -d); trap 'rm -rf \"$d\"' EXIT; "
        f"PYTHONDONTWRITEBYTECODE=1 stmgr relay-ticket --address 127.0.0.1:1 "
        f'--idfile {IDENTITY} --output "$d/t"; cat "$d/t"'
    )
    derived = json.loads(host.check_output("sh -c %s", script))
    assert ticket["publicKey"] == derived["publicKey"]
    assert ticket["address"].rsplit(":", 1)[1].isdigit()


def test_unit_is_hardened(host) -> None:
    expected = {
        "Type": "notify",
        "User": USER,
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
        "LimitCORE": "0",
        "MemoryMax": str(2 << 30),
    }
    properties = unit_properties(
        host, *expected, "RestrictAddressFamilies", "SystemCallFilter", "WatchdogUSec"
    )
    assert {key: properties.get(key) for key in expected} == expected
    assert set(properties["RestrictAddressFamilies"].split()) == {
        "AF_INET",
        "AF_INET6",
        "AF_UNIX",
    }
    assert properties["SystemCallFilter"]
    assert properties["WatchdogUSec"] not in ("", "0", "infinity")
