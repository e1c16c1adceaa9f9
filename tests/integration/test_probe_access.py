"""``stmgr probe`` of a relay with access lists: it listens (and connects) with identities the
lists admit, and when the relay refuses its listen or connect, its line names the list."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=60)


def one_line(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def new_identity(path: Path) -> str:
    """A new identity file and its public key, printed as the README says."""
    assert run(BIN / "stmgr", "gen-ident", "--output", path).returncode == 0
    shown = run(
        BIN / "stmgr", "relay-ticket", "--address", "relay.example.org:4567",
        "--idfile", path, "--output", "-",
    )  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    return json.loads(shown.stdout)["publicKey"]


def probe(relay, *extra) -> subprocess.CompletedProcess:
    address = f"127.0.0.1:{relay.port}"
    return run(BIN / "stmgr", "probe", "--address", address, "--idfile", relay.ident, *extra)


def test_a_private_relay_is_probed_with_an_admitted_listener(relay_factory, tmp_path):
    key = new_identity(tmp_path / "probe.ident")
    relay = relay_factory(f'[access]\nlisten_allow = ["{key}"]\n')

    refused = probe(relay)
    assert refused.returncode == 1
    line = one_line(refused)
    assert line.startswith(f"FAILED relay 127.0.0.1:{relay.port}: the relay refused the listen")
    assert "listen_allow" in line and "--listener-idfile" in line
    assert "connect_allow" not in line

    prom = probe(relay, "--format", "prometheus")
    assert prom.returncode == 1
    assert f'offset_relay_probe_success{{address="127.0.0.1:{relay.port}"}} 0' in prom.stdout

    admitted = probe(relay, "--listener-idfile", tmp_path / "probe.ident")
    assert admitted.returncode == 0, admitted.stderr
    assert admitted.stdout.startswith(f"OK relay 127.0.0.1:{relay.port}")


def test_a_listener_the_list_does_not_admit_is_named(relay_factory, tmp_path):
    allowed = new_identity(tmp_path / "allowed.ident")
    other = new_identity(tmp_path / "other.ident")
    relay = relay_factory(f'[access]\nlisten_allow = ["{allowed}"]\n')
    result = probe(relay, "--listener-idfile", tmp_path / "other.ident")
    assert result.returncode == 1
    line = one_line(result)
    assert f"refused the listen of the --listener-idfile key {other}" in line
    assert "listen_allow" in line


def test_a_denied_listener_is_named_too(relay_factory, tmp_path):
    denied = new_identity(tmp_path / "denied.ident")
    relay = relay_factory(f'[access]\nlisten_deny = ["{denied}"]\n')
    assert probe(relay).returncode == 0  # a throwaway key is not on the list
    result = probe(relay, "--listener-idfile", tmp_path / "denied.ident")
    assert result.returncode == 1
    assert "listen_deny" in one_line(result)


def test_connect_allow_needs_an_admitted_connector(relay_factory, tmp_path):
    key = new_identity(tmp_path / "connector.ident")
    relay = relay_factory(f'[access]\nconnect_allow = ["{key}"]\n')

    refused = probe(relay)
    assert refused.returncode == 1
    line = one_line(refused)
    assert "the relay refused the connect" in line
    assert "connect_allow" in line and "--connector-idfile" in line
    assert "listen_allow" not in line

    admitted = probe(relay, "--connector-idfile", tmp_path / "connector.ident")
    assert admitted.returncode == 0, admitted.stderr
    assert admitted.stdout.startswith("OK relay")


def test_both_lists_set_both_identities(relay_factory, tmp_path):
    listener = new_identity(tmp_path / "listener.ident")
    connector = new_identity(tmp_path / "connector.ident")
    relay = relay_factory(
        f'[access]\nlisten_allow = ["{listener}"]\nconnect_allow = ["{connector}"]\n'
    )
    only_listener = probe(relay, "--listener-idfile", tmp_path / "listener.ident")
    assert only_listener.returncode == 1
    assert "connect_allow" in one_line(only_listener)
    both = probe(
        relay,
        "--listener-idfile", tmp_path / "listener.ident",
        "--connector-idfile", tmp_path / "connector.ident",
    )  # fmt: skip
    assert both.returncode == 0, both.stderr


def _missing(path: Path) -> None:
    pass


def _not_json(path: Path) -> None:
    path.write_text("not an identity")
    path.chmod(0o600)


def _a_ticket(path: Path) -> None:
    path.write_text(json.dumps({"publicKey": "A" * 43, "address": "relay.example.org:4567"}))
    path.chmod(0o600)


def _readable_by_others(path: Path) -> None:
    assert run(BIN / "stmgr", "gen-ident", "--output", path).returncode == 0
    path.chmod(0o644)


@pytest.mark.parametrize("option", ["--listener-idfile", "--connector-idfile"])
@pytest.mark.parametrize(
    "make, code, says",
    [
        (_missing, os.EX_NOINPUT, "does not exist"),
        (_not_json, os.EX_DATAERR, "not valid JSON"),
        (_a_ticket, os.EX_DATAERR, "is a relay ticket"),
        (_readable_by_others, os.EX_DATAERR, "chmod 600"),
    ],
)
def test_a_bad_identity_file_is_one_line(relay, tmp_path, option, make, code, says):
    path = tmp_path / "bad.ident"
    make(path)
    result = probe(relay, option, path)
    assert result.returncode == code
    line = one_line(result)
    assert line.startswith(f"stmgr: {option}: ") and says in line, line
