"""The relay's "no ticket yet" hint gives a command the operator can paste: under the package
(the service user, or the package's state directory) that command runs as the service user."""

from __future__ import annotations

import logging
from pathlib import Path

from nacl.signing import SigningKey

from offset_appliance.cli import strelay
from offset_appliance.config import load_config


def test_hint_for_a_relay_of_ones_own():
    ident = Path("relay/relay.ident")
    hint = strelay.no_ticket_hint(ident, ident.with_suffix(".relay"), "alice")
    assert hint == (
        "no ticket at relay/relay.relay yet; make it: stmgr relay-ticket --address HOST:PORT "
        "--idfile relay/relay.ident --output relay/relay.relay"
    )


def test_hint_under_the_package_runs_as_the_service_user():
    ident = Path("/var/lib/offset-relay/relay.ident")
    expected = (
        "no ticket at /var/lib/offset-relay/relay.relay yet; make it: "
        "runuser -u offset-relay -- stmgr relay-ticket --address HOST:PORT "
        "--idfile /var/lib/offset-relay/relay.ident --output /var/lib/offset-relay/relay.relay"
    )
    # The unit's user, whatever the identity's path; and the package's state directory (an
    # instance of offset-relay@.service included), whoever reads the log.
    assert strelay.no_ticket_hint(ident, ident.with_suffix(".relay"), "offset-relay") == expected
    assert strelay.no_ticket_hint(ident, ident.with_suffix(".relay"), "root") == expected
    other = Path("/srv/relay/relay.ident")
    assert strelay.no_ticket_hint(other, other.with_suffix(".relay"), "offset-relay").startswith(
        "no ticket at /srv/relay/relay.relay yet; make it: runuser -u offset-relay -- stmgr "
    )
    instance = Path("/var/lib/offset-relay/r2/relay.ident")
    assert "runuser -u offset-relay -- stmgr" in strelay.no_ticket_hint(
        instance, instance.with_suffix(".relay"), None
    )


def test_the_relay_logs_the_hint_for_its_own_user(tmp_path, monkeypatch, caplog):
    ident = tmp_path / "relay.ident"
    config = load_config(None, identity_file=ident, listen=["127.0.0.1:0"])
    key = bytes(SigningKey.generate().verify_key)
    caplog.set_level(logging.INFO, logger="strelay")
    monkeypatch.setattr(strelay, "_process_user", lambda: "offset-relay")
    strelay._announce_ticket(config, key)
    monkeypatch.setattr(strelay, "_process_user", lambda: "alice")
    strelay._announce_ticket(config, key)
    hints = [r.getMessage() for r in caplog.records if "no ticket at" in r.getMessage()]
    assert hints == [
        strelay.no_ticket_hint(ident, tmp_path / "relay.relay", "offset-relay"),
        strelay.no_ticket_hint(ident, tmp_path / "relay.relay", "alice"),
    ]
    assert hints[0].split("make it: ")[1].startswith("runuser -u offset-relay -- stmgr ")
    assert hints[1].split("make it: ")[1].startswith("stmgr relay-ticket ")
