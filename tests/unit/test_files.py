"""Identity and ticket files: exact format, modes, refusals."""

from __future__ import annotations

import json
import os
import stat

import pytest
from nacl.signing import SigningKey

from offset_appliance.errors import CantCreateError, DataError, NoInputError, UsageError
from offset_appliance.files import (
    InsecureFileError,
    Ticket,
    b64url_decode,
    b64url_encode,
    generate_identity,
    load_identity,
    load_ticket,
    split_host_port,
    write_ticket,
)


def test_identity_format_mode_and_round_trip(tmp_path):
    os.umask(0o022)
    path = tmp_path / "relay.ident"
    identity = generate_identity(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = json.loads(path.read_text())
    assert list(doc) == ["privateKey"]
    assert "=" not in doc["privateKey"] and len(doc["privateKey"]) == 43
    assert path.read_text().startswith('{\n  "privateKey": "')
    assert b64url_decode(doc["privateKey"], "key") == bytes(identity)
    assert bytes(load_identity(path).verify_key) == bytes(identity.verify_key)


def test_identity_refuses_overwrite(tmp_path):
    path = tmp_path / "relay.ident"
    generate_identity(path)
    before = path.read_bytes()
    with pytest.raises(CantCreateError, match="already exists"):
        generate_identity(path)
    assert path.read_bytes() == before


def test_identity_loose_permissions_refused(tmp_path):
    path = tmp_path / "relay.ident"
    generate_identity(path)
    path.chmod(0o640)
    with pytest.raises(InsecureFileError, match="chmod 600"):
        load_identity(path)
    assert load_identity(path, check_permissions=False)


@pytest.mark.parametrize(
    "content, error",
    [
        ("", DataError),
        ("not json", DataError),
        ("[1]", DataError),
        ('{"privateKey": 5}', DataError),
        ('{"privateKey": "!!!"}', DataError),
        ('{"privateKey": "AAAA"}', DataError),
        ('{"other": "x"}', DataError),
        (b"\xff\xfe".decode("latin-1"), DataError),
    ],
)
def test_identity_malformed(tmp_path, content, error):
    path = tmp_path / "bad.ident"
    path.write_text(content)
    path.chmod(0o600)
    with pytest.raises(error):
        load_identity(path)


def test_identity_missing(tmp_path):
    with pytest.raises(NoInputError, match="does not exist"):
        load_identity(tmp_path / "none")


def test_padded_key_accepted(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "padded.ident"
    path.write_text(json.dumps({"privateKey": b64url_encode(bytes(key)) + "="}))
    path.chmod(0o600)
    assert bytes(load_identity(path)) == bytes(key)


def test_ticket_format(tmp_path):
    key = bytes(range(32))
    path = tmp_path / "relay.relay"
    write_ticket(path, Ticket(key, "relay.example.org:4567"))
    doc = json.loads(path.read_text())
    assert doc == {"publicKey": b64url_encode(key), "address": "relay.example.org:4567"}
    assert load_ticket(path) == Ticket(key, "relay.example.org:4567")
    with pytest.raises(CantCreateError):
        write_ticket(path, Ticket(key, "x:1"))


@pytest.mark.parametrize(
    "address, expected",
    [
        ("127.0.0.1:4567", ("127.0.0.1", 4567)),
        ("www.myrelay.com:1", ("www.myrelay.com", 1)),
        ("relay:65535", ("relay", 65535)),
        ("[::1]:4567", ("::1", 4567)),
        ("[2001:db8::5]:80", ("2001:db8::5", 80)),
        # What the original node dials too: everything before the last colon is handed to
        # the resolver (Rust's ToSocketAddrs), so these are not refused.
        ("::1:4567", ("::1", 4567)),
        ("bad_host:4567", ("bad_host", 4567)),
        ("-lead.example:4567", ("-lead.example", 4567)),
        ("relais.bücher.example:4567", ("relais.bücher.example", 4567)),
        ("127.1:4567", ("127.1", 4567)),
        ("host:+4567", ("host", 4567)),
        ("a" * 252 + ":1", ("a" * 252, 1)),
    ],
)
def test_valid_addresses(address, expected):
    assert split_host_port(address) == expected


@pytest.mark.parametrize(
    "address",
    [
        "",
        "127.0.0.1",
        "127.0.0.1:0",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "256.1.1.1:4567",
        "2001:db8::zz:4567",
        "[::1:4567",
        "[nothex]:4567",
        "http://host:4567",
        "a b:4567",
        "tab\there:4567",
        ":4567",
        "host:port",
        "a" * 250 + ".com:4567",
        "é" * 128 + ":1",  # 258 bytes, though 130 characters
        "host:４５",
    ],
)
def test_invalid_addresses(address):
    with pytest.raises(UsageError):
        split_host_port(address)


def test_ticket_with_a_key_twice_is_refused(tmp_path):
    # A reader keeping the first value and one keeping the last would see two different
    # relays: such a ticket is refused, whichever order the keys come in.
    real, evil = b64url_encode(bytes(32)), b64url_encode(bytes(range(32)))
    path = tmp_path / "relay.relay"
    path.write_text(
        f'{{"publicKey": "{real}", "address": "relay.example.org:4567", '
        f'"publicKey": "{evil}", "address": "evil.example.org:443"}}'
    )
    with pytest.raises(DataError, match='key "publicKey" appears more than once'):
        load_ticket(path)


def test_identity_with_a_key_twice_is_refused(tmp_path):
    path = tmp_path / "relay.ident"
    key = b64url_encode(bytes(32))
    path.write_text(f'{{"privateKey": "{key}", "privateKey": "{key}"}}')
    path.chmod(0o600)
    with pytest.raises(DataError, match="more than once"):
        load_identity(path)


def test_identity_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "relay.ident"
    os.mkfifo(path, 0o600)
    # Opening a FIFO for reading blocks until a writer comes: the file is opened without
    # blocking and refused on its fstat.
    with pytest.raises(DataError, match="not a regular file"):
        load_identity(path)
    with pytest.raises(DataError, match="not a regular file"):
        load_identity(path, check_permissions=False)


def test_identity_reached_through_a_symlink_is_refused(tmp_path):
    target = tmp_path / "real.ident"
    generate_identity(target)
    link = tmp_path / "relay.ident"
    link.symlink_to(target)
    with pytest.raises(DataError, match="symbolic link"):
        load_identity(link)


def test_identity_permissions_are_checked_on_the_opened_file(tmp_path, monkeypatch):
    # The mode is read from the descriptor that is then read from, not from a path that
    # could be swapped in between: a stat by path must not be what decides.
    path = tmp_path / "relay.ident"
    generate_identity(path)
    path.chmod(0o644)
    real_stat = os.stat

    def lying_stat(target, *args, **kwargs):
        result = real_stat(target, *args, **kwargs)
        if str(target) == str(path):
            return os.stat_result((result.st_mode & ~0o077, *tuple(result)[1:]))
        return result

    monkeypatch.setattr(os, "stat", lying_stat)
    with pytest.raises(InsecureFileError):
        load_identity(path)
