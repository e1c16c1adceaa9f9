"""Who may use the relay: access lists, per-prefix sources, automatic bans and the memory
ceiling, each under the injected clock (and the loop's rig where the loop takes part)."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import tomllib
from pathlib import Path

import pytest
from nacl.signing import SigningKey

from offset_appliance.config import (
    Access,
    Bans,
    Config,
    KeyList,
    Limits,
    dump_config,
    load_config,
)
from offset_appliance.errors import CloseReason, ConfigError
from offset_appliance.files import b64url_encode
from offset_appliance.relay.access import AccessControl
from offset_appliance.relay.bans import BanTable
from offset_appliance.relay.clients import PAUSED_BY_MEMORY
from offset_appliance.relay.memory import SAMPLE_INTERVAL, MemoryGuard
from offset_appliance.relay.ratelimit import Prefixes
from offset_appliance.wire.messages import Accept, Connect, Listen, encode_init_connection

from .server_rig import Node


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def key_text(identity: SigningKey) -> str:
    return b64url_encode(bytes(identity.verify_key))


def keys(*identities: SigningKey) -> KeyList:
    texts = tuple(key_text(i) for i in identities)
    return KeyList(texts, frozenset(bytes(i.verify_key) for i in identities))


BASE = 'identity_file = "id"\nlisten = ["127.0.0.1:4567"]\n'


# ---- the configuration ---------------------------------------------------------------------


def test_access_lists_read_inline_keys_key_files_and_networks(tmp_path):
    a, b, c = (SigningKey.generate() for _ in range(3))
    listed = write(
        tmp_path / "keys" / "friends",
        f"# our nodes\n{key_text(b)}\n\n  {key_text(c)}  # the second one\n",
    )
    main = write(
        tmp_path / "relay.toml",
        BASE
        + f'[access]\nlisten_allow = ["{key_text(a)}", "{listed}"]\n'
        + f'connect_deny = ["{key_text(c)}"]\n'
        + 'ip_allow = ["198.18.0.0/15", "2001:db8::1"]\nip_deny = ["198.18.7.9/16"]\n',
    )
    access = load_config(main).access
    assert access.listen_allow.keys == {bytes(k.verify_key) for k in (a, b, c)}
    assert access.listen_allow.entries == (key_text(a), str(listed))
    assert access.connect_deny.keys == {bytes(c.verify_key)}
    assert access.listen_deny == KeyList()
    assert access.ip_allow == ("198.18.0.0/15", "2001:db8::1/128")
    assert access.ip_deny == ("198.18.0.0/16",)


@pytest.mark.parametrize(
    "text, needle",
    [
        ('[access]\nlisten_allow = ["abc"]\n', "access.listen_allow: 'abc' is not a public key"),
        ('[access]\nconnect_deny = "x"\n', "access.connect_deny: expected a list of strings"),
        ("[access]\nip_deny = [1]\n", "access.ip_deny: expected a list of strings"),
        ('[access]\nip_allow = ["10.0.0.0/33"]\n', "access.ip_allow: '10.0.0.0/33' is not"),
        ('[access]\nip_deny = ["example.org"]\n', "access.ip_deny"),
        ('[access]\nlisten_deny = ["/nonexistent/keys"]\n', "cannot read key file"),
        ("[access]\nbogus = []\n", "access.bogus: unknown key"),
        ("[limits]\nipv4_prefix = 7\n", "limits.ipv4_prefix: must be between 8 and 32"),
        ("[limits]\nipv6_prefix = 129\n", "limits.ipv6_prefix: must be between 16 and 128"),
        ("[limits]\nmax_memory = -1\n", "limits.max_memory"),
        (
            "[limits]\nmax_memory = 1000000\nmemory_low_mark = 1000000\n",
            "memory_low_mark (1000000) must be below max_memory",
        ),
        ('[bans]\nenabled = "yes"\n', "bans.enabled: expected true or false"),
        ("[bans]\nthreshold = 0\n", "bans.threshold: must be between"),
        ("[bans]\nthreshold = 2.5\n", "bans.threshold: expected an integer"),
        ("[bans]\nwindow = 0\n", "bans.window: must be between"),
        ("[bans]\nmultiplier = 0.5\n", "bans.multiplier: must be between"),
        ("[bans]\nban_time = 100\nmax_ban_time = 10\n", "must not be below ban_time"),
        ("[bans]\ntable_size = 1\n", "bans.table_size: must be between"),
        ("[bans]\nforget_after = inf\n", "bans.forget_after"),
        ("[bans]\nbogus = 1\n", "bans.bogus: unknown key"),
        ("access = 1\n", "access: expected a table"),
    ],
)
def test_bad_access_bans_and_memory_values_name_the_file_and_key(tmp_path, text, needle):
    main = write(tmp_path / "relay.toml", BASE)
    write(tmp_path / "relay.d" / "10-x.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(main)
    message = str(info.value)
    assert needle in message
    assert "10-x.toml" in message and "\n" not in message


def test_a_bad_line_in_a_key_file_names_the_file_and_line(tmp_path):
    good = key_text(SigningKey.generate())
    listed = write(tmp_path / "keys", f"{good}\n# fine\n{good[:-1]}\n")
    main = write(tmp_path / "relay.toml", BASE + f'[access]\nlisten_deny = ["{listed}"]\n')
    with pytest.raises(ConfigError, match=rf"access\.listen_deny: {listed} line 3: "):
        load_config(main)


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda path: path.chmod(0o666), "writable by group or others"),
        (_fifo, "not a regular file"),
        (_directory, "not a regular file"),
    ],
)
def test_a_key_file_others_could_change_is_refused(tmp_path, make, needle):
    listed = write(tmp_path / "keys", key_text(SigningKey.generate()) + "\n")
    listed.chmod(0o644)
    main = write(tmp_path / "relay.toml", BASE + f'[access]\nlisten_allow = ["{listed}"]\n')
    assert len(load_config(main).access.listen_allow.keys) == 1
    make(listed)
    with pytest.raises(ConfigError, match=needle):
        load_config(main)


def test_the_printed_config_with_every_control_reads_back_the_same(tmp_path):
    listed = write(tmp_path / "keys", key_text(SigningKey.generate()) + "\n")
    main = write(
        tmp_path / "relay.toml",
        BASE
        + "[limits]\nipv4_prefix = 24\nipv6_prefix = 48\nmax_memory = 500000000\n"
        + f'[access]\nlisten_allow = ["{listed}"]\nip_deny = ["10.0.0.0/8", "fd00::/8"]\n'
        + "[bans]\nenabled = true\nthreshold = 5\nban_time = 2.5\n",
    )
    config = load_config(main)
    text = dump_config(config)
    again = write(tmp_path / "elsewhere" / "printed.toml", text)
    assert load_config(again) == config
    doc = tomllib.loads(text)
    assert doc["access"]["listen_allow"] == [str(listed)]
    assert doc["access"]["connect_deny"] == []
    assert doc["bans"]["table_size"] == Bans().table_size
    assert doc["limits"]["memory_low_mark"] == 0


def test_everything_is_off_by_default_but_the_memory_ceiling(tmp_path):
    config = load_config(write(tmp_path / "relay.toml", BASE))
    assert config.access == Access()
    assert not config.bans.enabled
    assert config.limits.max_memory == "auto"
    assert (config.limits.ipv4_prefix, config.limits.ipv6_prefix) == (32, 64)


# ---- sources -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "v4, v6, ip, source",
    [
        (32, 64, "198.18.0.7", "198.18.0.7"),
        (24, 64, "198.18.0.7", "198.18.0.0/24"),
        (32, 64, "2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        (32, 48, "2001:db8:1:2:aaaa::1", "2001:db8:1::/48"),
        (32, 128, "2001:db8::1", "2001:db8::1"),
        (32, 64, "::ffff:198.18.0.7", "198.18.0.7"),
        (16, 64, "::ffff:198.18.0.7", "198.18.0.0/16"),
        (32, 64, "fe80::1%eth0", "fe80::/64"),
    ],
)
def test_a_source_is_the_prefix_of_its_address(v4, v6, ip, source):
    assert Prefixes(v4, v6)(ip) == source


# ---- access lists --------------------------------------------------------------------------


def test_deny_wins_and_a_non_empty_allow_list_admits_only_what_it_lists():
    a, b, c = (SigningKey.generate() for _ in range(3))
    control = AccessControl()
    for kind in ("listen", "accept", "connect"):
        assert control.refuse_request(kind, bytes(a.verify_key)) is None
    assert control.ip_allowed("198.18.0.7")
    control.apply_config(
        Access(
            listen_allow=keys(a, b),
            listen_deny=keys(b),
            connect_deny=keys(c),
            ip_allow=("198.18.0.0/15", "2001:db8::/32"),
            ip_deny=("198.18.7.0/24",),
        )
    )
    key = {name: bytes(i.verify_key) for name, i in (("a", a), ("b", b), ("c", c))}
    assert control.refuse_request("listen", key["a"]) is None
    assert control.refuse_request("accept", key["a"]) is None
    assert control.refuse_request("listen", key["b"]) is CloseReason.LISTEN_DENIED
    assert control.refuse_request("accept", key["c"]) is CloseReason.LISTEN_DENIED
    assert control.refuse_request("connect", key["b"]) is None  # connect lists are separate
    assert control.refuse_request("connect", key["c"]) is CloseReason.CONNECT_DENIED
    assert control.ip_allowed("198.19.255.1")
    assert control.ip_allowed("::ffff:198.18.0.1")  # IPv4-mapped counts as IPv4
    assert not control.ip_allowed("198.18.7.200")
    assert not control.ip_allowed("10.0.0.1")
    assert control.ip_allowed("2001:db8:ffff::1")
    assert not control.ip_allowed("2001:db9::1")


def test_a_denied_address_is_closed_at_accept(rigs):
    rig = rigs(access=Access(ip_deny=("127.0.0.0/8",)))
    node = Node(rig)
    rig.settle()
    assert node.eof and not node.is_open
    assert rig.server.stats.refused["ip_denied"] == 1
    assert rig.server.stats.accepted == 0


def test_a_denied_key_cannot_listen_or_accept_and_an_allowed_one_can(rigs):
    allowed, denied = SigningKey.generate(), SigningKey.generate()
    rig = rigs(access=Access(listen_allow=keys(allowed)))
    stats = rig.server.stats
    refused = rig.node(denied)
    refused.send(encode_init_connection(Listen()))
    rig.settle()
    assert refused.eof
    assert stats.refused["listen_denied"] == 1 and stats.closed["listen_denied"] == 1
    assert rig.server.core.listener_count == 0
    stranger = rig.listener()  # a fresh key: not on the allow list
    assert stranger.eof and stats.refused["listen_denied"] == 2
    # The allowed key listens, and the connector's tunnel to it works.
    listener = rig.listener(allowed)
    assert listener.is_open and rig.server.core.listener_count == 1
    connector = rig.node()
    connector.send(encode_init_connection(Connect(listener.public_key)))
    rig.settle()
    assert listener.inbox
    # Accepting for a key carries that key: a denied one cannot take a connect to it.
    thief = rig.node(denied)
    thief.send(encode_init_connection(Accept(connector.public_key)))
    rig.settle()
    assert thief.eof and stats.refused["listen_denied"] == 3
    acceptor = rig.node(allowed)
    acceptor.send(encode_init_connection(Accept(connector.public_key)))
    rig.settle()
    connector.send(b"through")
    rig.settle()
    assert acceptor.inbox == [b"through"]


def test_a_denied_key_cannot_connect(rigs):
    bad = SigningKey.generate()
    rig = rigs(access=Access(connect_deny=keys(bad)))
    listener = rig.listener()
    node = rig.node(bad)
    node.send(encode_init_connection(Connect(listener.public_key)))
    rig.settle()
    assert node.eof and not listener.inbox
    assert rig.server.stats.refused["connect_denied"] == 1
    assert rig.server.stats.closed["connect_denied"] == 1


def reloading(rigs, **sections):
    """A rig whose reload reads ``configs[0]`` (the running config with other sections)."""
    configs: list[Config] = []
    rig = rigs(reload_config=lambda: configs[0], **sections)

    def reload(**changed) -> None:
        configs[:] = [dataclasses.replace(rig.server.config, **changed)]
        rig.server.request_reload()
        rig.settle()

    return rig, reload


def carries(rig, sender: Node, receiver: Node, data: bytes) -> bool:
    sender.send(data)
    rig.settle()
    return receiver.inbox[-1:] == [data]


def test_a_reload_closes_the_connections_its_lists_newly_refuse_and_keeps_the_rest(rigs, caplog):
    rig, reload = reloading(rigs)
    stats = rig.server.stats
    # A tunnel whose listener's key is denied, one whose connector's address is, one
    # neither; and a handshake in progress from the denied address.
    listener, connector, acceptor = rig.tunnel()
    other_listener, from_denied, other_acceptor = rig.tunnel(connect_from="127.0.0.2")
    kept_listener, kept_connector, kept_acceptor = rig.tunnel()
    handshake = socket.create_connection(rig.address, source_address=("127.0.0.2", 0))
    rig.settle()
    assert len(rig.server.policy.handshaking) == 1
    with caplog.at_level(logging.INFO, logger="strelay"):
        reload(access=Access(listen_deny=keys(listener.identity), ip_deny=("127.0.0.2/32",)))
    # Closed: the denied key's listener and its accepting side (the tunnel's connecting
    # side with them, as the protocol closes a tunnel), the denied address's connector
    # (its accepting side with it) and its handshake.
    assert listener.eof and acceptor.eof and connector.eof
    assert from_denied.eof and other_acceptor.eof
    handshake.settimeout(5)
    while handshake.recv(4096):  # the relay's hello, then its close
        pass
    handshake.close()
    assert stats.closed["denied"] == 4 and stats.closed["tunnel_peer_closed"] == 2
    assert stats.handshakes_failed_total == 0
    assert sum(stats.refused.values()) == 0  # not refusals, and not strikes towards a ban
    assert not rig.server.policy.bans.active(rig.clock())
    assert (
        "reload: closed 4 connections the new access lists refuse (1 listener, 2 tunnel ends, "
        "1 handshake or waiting connection; the other ends of 2 tunnels close after their "
        "output)"
    ) in caplog.messages
    # Untouched, and still carrying: the other listener and the third tunnel.
    assert other_listener.is_open and kept_listener.is_open
    assert carries(rig, kept_connector, kept_acceptor, b"still")
    assert carries(rig, kept_acceptor, kept_connector, b"both ways")
    assert rig.server.core.listener_count == 2 and rig.server.core.tunnels == 1
    # The denied key cannot listen again; a reload that does not change the lists closes
    # nothing more.
    again = rig.node(listener.identity)
    again.send(encode_init_connection(Listen()))
    rig.settle()
    assert again.eof and stats.refused["listen_denied"] == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="strelay"):
        reload(limits=Limits(max_connections=1000))
    assert stats.closed["denied"] == 4
    assert not [m for m in caplog.messages if "access lists refuse" in m]
    assert carries(rig, kept_connector, kept_acceptor, b"after")


def test_a_reload_closes_newly_refused_connectors_and_their_tunnels(rigs, caplog):
    rig, reload = reloading(rigs)
    stats = rig.server.stats
    listener, connector, acceptor = rig.tunnel()
    waiting = rig.node()  # a connect not yet accepted
    waiting.send(encode_init_connection(Connect(listener.public_key)))
    rig.settle()
    kept_listener, kept_connector, kept_acceptor = rig.tunnel()
    with caplog.at_level(logging.INFO, logger="strelay"):
        reload(
            access=Access(
                connect_allow=keys(kept_connector.identity),
                listen_allow=keys(listener.identity, kept_listener.identity),
            )
        )
    assert connector.eof and acceptor.eof and waiting.eof
    assert listener.is_open and kept_listener.is_open  # the listen lists admit them
    assert stats.closed["denied"] == 2 and stats.closed["tunnel_peer_closed"] == 1
    assert rig.server.core.half_tunnel_count == 0 and rig.server.core.tunnels == 1
    # The denied connect's half-tunnel went with it: a late accept gets nothing.
    late = rig.node(listener.identity)
    late.send(encode_init_connection(Accept(waiting.public_key)))
    rig.settle()
    assert late.eof and not late.inbox and stats.closed["relay_refused"] == 1
    assert (
        "reload: closed 2 connections the new access lists refuse (1 tunnel end, 1 connector; "
        "the other end of 1 tunnel closes after its output)"
    ) in caplog.messages
    assert carries(rig, kept_connector, kept_acceptor, b"still")


def test_a_changed_key_file_is_said_per_file_and_applies_to_open_connections(
    rigs, tmp_path, caplog
):
    a, b = SigningKey.generate(), SigningKey.generate()
    keyfile = write(tmp_path / "my-nodes.keys", key_text(a) + "\n")
    text = BASE + f'[access]\nlisten_allow = ["{keyfile}"]\n'
    path = write(tmp_path / "relay.toml", text)
    rig, reload = reloading(rigs, access=load_config(path).access)
    first = rig.listener(a)
    assert first.is_open
    # The file now names b instead of a: the entries did not change, the keys did.
    keyfile.write_text(f"# mine\n{key_text(b)}\n")
    with caplog.at_level(logging.INFO, logger="strelay"):
        reload(access=load_config(path).access)
    assert (
        f"reload: access.listen_allow: {keyfile}: 1 -> 1 keys (1 added, 1 removed)"
        in caplog.messages
    )
    assert "configuration reloaded: 1 setting changed" in caplog.messages
    assert first.eof and rig.server.stats.closed["denied"] == 1
    second = rig.listener(b)
    assert second.is_open
    keyfile.write_text(f"{key_text(b)}\n{key_text(a)}\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="strelay"):
        reload(access=load_config(path).access)
    assert f"reload: access.listen_allow: {keyfile}: 1 -> 2 keys" in caplog.messages
    assert "configuration reloaded: 1 setting changed" in caplog.messages
    assert not [m for m in caplog.messages if "access lists refuse" in m]
    assert second.is_open and rig.listener(a).is_open
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="strelay"):
        reload(access=load_config(path).access)  # read again, the same keys
    assert caplog.messages[-1] == "configuration reloaded: nothing changed"


# ---- per-prefix counts ---------------------------------------------------------------------


def test_an_ipv6_slash_64_is_one_source_for_max_connections_per_ip(rigs):
    rig = rigs(limits={"max_connections_per_ip": 3})
    server = rig.server
    pairs = []

    def arrive(ip: str):
        ours, theirs = socket.socketpair()
        pairs.append(theirs)
        return server.relay.add_connection(ours, (ip, 40000), rig.clock())

    admitted = [arrive(f"2001:db8:1:2::{n:x}") for n in range(1, 5)]
    assert all(admitted[:3]) and admitted[3] is None
    assert server.stats.refused["max_connections_per_ip"] == 1
    assert admitted[0].source == "2001:db8:1:2::/64"
    assert arrive("2001:db8:1:3::1") is not None  # the next /64 is another source
    server.relay.close(admitted[0], CloseReason.PEER_CLOSED, now=rig.clock())
    assert arrive("2001:db8:1:2::99") is not None  # a slot of that /64 was freed
    for sock in pairs:
        sock.close()


def test_ipv4_prefix_makes_a_whole_network_one_source(rigs):
    rig = rigs(limits={"max_connections_per_ip": 2, "ipv4_prefix": 24})
    server = rig.server
    pairs = []

    def arrive(ip: str):
        ours, theirs = socket.socketpair()
        pairs.append(theirs)
        return server.relay.add_connection(ours, (ip, 40000), rig.clock())

    assert arrive("198.18.0.1") and arrive("198.18.0.200")
    assert arrive("198.18.0.7") is None
    assert arrive("198.18.1.7") is not None
    for sock in pairs:
        sock.close()


# ---- bans ----------------------------------------------------------------------------------


def test_a_ban_starts_past_the_threshold_grows_on_repeat_and_is_forgotten(caplog):
    table = BanTable(
        Bans(enabled=True, threshold=3, window=10.0, ban_time=5.0, multiplier=2.0,
             max_ban_time=15.0, forget_after=100.0)
    )  # fmt: skip
    now = 0.0
    with caplog.at_level(logging.INFO, logger="strelay"):
        assert [table.strike("s", now) for _ in range(4)] == [False, False, False, True]
        assert table.is_banned("s", now + 4.9) and not table.is_banned("other", now)
        assert not table.strike("s", now + 1)  # a banned source's refusals are not strikes
        assert not table.is_banned("s", now + 5.0)
        # Again within forget_after: twice as long; then three times: capped at 15 s.
        now = 6.0
        assert [table.strike("s", now) for _ in range(4)][-1]
        assert table.is_banned("s", now + 9.9) and not table.is_banned("s", now + 10.0)
        now = 20.0
        assert [table.strike("s", now) for _ in range(4)][-1]
        assert table.is_banned("s", now + 14.9) and not table.is_banned("s", now + 15.0)
        # After forget_after without a ban: the first length again.
        now = 200.0
        assert [table.strike("s", now) for _ in range(4)][-1]
        assert table.is_banned("s", now + 4.9) and not table.is_banned("s", now + 5.0)
    bans = [r.getMessage() for r in caplog.records if "banning" in r.getMessage()]
    assert bans == [
        "banning s for 5 s: 4 refusals in 10 s (ban 1)",
        "banning s for 10 s: 4 refusals in 10 s (ban 2)",
        "banning s for 15 s: 4 refusals in 10 s (ban 3)",
        "banning s for 5 s: 4 refusals in 10 s (ban 1)",
    ]
    lifts = [r.getMessage() for r in caplog.records if "lifted" in r.getMessage()]
    assert len(lifts) == 4
    assert table.total == 4 and table.active(now + 10) == 0


def test_strikes_in_separate_windows_do_not_add_up():
    table = BanTable(Bans(enabled=True, threshold=3, window=10.0))
    for second in range(0, 60, 4):  # one every 4 s: at most 3 in a 10 s window
        assert not table.strike("s", float(second))


def test_the_table_is_bounded_and_drops_the_least_recently_used():
    table = BanTable(Bans(enabled=True, threshold=1, table_size=16))
    for n in range(16):
        table.strike(f"s{n}", 0.0)
        table.strike(f"s{n}", 0.0)  # banned
    assert table.active(0.0) == 16
    assert table.is_banned("s0", 1.0)  # used: now the most recent
    table.strike("new", 1.0)
    assert len(table) == 16
    assert not table.is_banned("s1", 1.0) and table.is_banned("s0", 1.0)
    assert table.active(1.0) == 15


def test_disabled_bans_track_nothing_and_disabling_lifts_them():
    table = BanTable()
    assert not any(table.strike("s", 0.0) for _ in range(1000))
    assert len(table) == 0
    table.apply_config(Bans(enabled=True, threshold=1))
    table.strike("s", 0.0)
    table.strike("s", 0.0)
    assert table.is_banned("s", 1.0)
    table.apply_config(Bans(enabled=False))
    assert not table.is_banned("s", 1.0) and table.active(1.0) == 0


def test_denied_requests_ban_their_source_until_the_ban_lifts(rigs, caplog):
    bad = SigningKey.generate()
    rig = rigs(
        access=Access(listen_deny=keys(bad)),
        bans=Bans(enabled=True, threshold=2, window=60.0, ban_time=30.0),
    )
    stats = rig.server.stats
    with caplog.at_level(logging.INFO, logger="strelay"):
        for _ in range(3):
            node = rig.node(bad)
            node.send(encode_init_connection(Listen()))
            rig.settle()
            assert node.eof
        assert rig.server.policy.bans.active(rig.clock()) == 1
        turned = Node(rig)
        rig.settle()
        assert turned.eof and stats.refused["banned"] == 1
        accepted = stats.accepted
        rig.clock.advance(30.0)
        welcome = rig.node()  # the ban has run out
        assert welcome.is_open and stats.accepted == accepted + 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum("banning 127.0.0.1 for 30 s" in m for m in messages) == 1
    assert not any("refusing 127.0.0.1: banned" in m for m in messages)
    assert "offset_relay_bans_total 1" in rig.server.metrics_text()


def test_failed_handshakes_are_strikes(rigs):
    rig = rigs(bans=Bans(enabled=True, threshold=2))
    for _ in range(3):
        sock = socket.create_connection(rig.address)
        sock.sendall(b"\x00\x00\x00\x04\xff\xff\xff\xff")  # a frame with a wrong version
        rig.settle()
        sock.close()
    rig.settle()
    assert rig.server.stats.handshakes_failed_total == 3
    assert rig.server.policy.bans.is_banned("127.0.0.1", rig.clock())


# ---- the memory ceiling --------------------------------------------------------------------


def test_memory_guard_has_a_low_mark():
    rss = [100]
    trims: list[float] = []
    clock = [0.0]
    guard = MemoryGuard(
        Limits(max_memory=1000), rss=lambda: rss[0], trim=lambda: trims.append(clock[0])
    )
    assert guard.low_mark == 900
    assert guard.sample(0.0) is None and not guard.active
    rss[0] = 1001
    assert guard.sample(0.1) is None  # not due yet
    assert guard.sample(SAMPLE_INTERVAL) is True and guard.active
    rss[0] = 950
    for clock[0] in (0.5, 0.75, 1.0, 1.25, 1.5):
        assert guard.sample(clock[0]) is None and guard.active  # between the marks: over
    assert trims == [0.5, 1.5]  # freed memory handed back, at most once a second
    rss[0] = 899
    assert guard.sample(2.0) is False and not guard.active
    assert guard.seconds(3.0) == pytest.approx(2.0 - SAMPLE_INTERVAL)
    guard.apply_config(Limits(max_memory=1000, memory_low_mark=500))
    assert guard.low_mark == 500


def test_over_the_ceiling_new_connections_are_refused_and_big_feeders_paused(rigs):
    rss = [10 << 20]
    # A high water mark out of the way: only the ceiling pauses the feeder here.
    rig = rigs(limits={"max_memory": 100 << 20, "buffer_high_water": 64 << 20})
    server = rig.server
    server.policy.memory.rss = lambda: rss[0]
    listener = rig.listener()
    connector = rig.node()
    connector.send(encode_init_connection(Connect(listener.public_key)))
    rig.settle()
    acceptor = rig.node(listener.identity, rcvbuf=4096)
    acceptor.send(encode_init_connection(Accept(connector.public_key)))
    rig.settle()
    acceptor.reading = False  # its queue at the relay grows
    for _ in range(200):
        connector.send(b"x" * 60_000)
    rig.settle()
    feeder, queue = rig.client_of(connector), rig.client_of(acceptor)
    assert queue.out_size > 1 << 20 and not feeder.paused
    rss[0] = 101 << 20
    rig.clock.advance(1.0)
    rig.settle()
    assert server.policy.memory.active and server.policy.memory_full
    assert feeder.paused & PAUSED_BY_MEMORY
    late = Node(rig)
    rig.settle()
    assert late.eof and server.stats.refused["memory"] == 1
    text = server.metrics_text()
    assert "offset_relay_memory_ceiling_active 1" in text
    assert 'offset_relay_connections_refused_total{limit="memory"} 1' in text
    # Below the low mark (90 MiB): accepted again, and the feeder reads again.
    rss[0] = 89 << 20
    rig.clock.advance(1.0)
    rig.settle()
    assert not server.policy.memory.active and not feeder.paused
    assert rig.node().is_open
    assert "offset_relay_memory_ceiling_active 0" in server.metrics_text()


def test_raising_the_ceiling_by_reload_accepts_again(rigs):
    new_config: list[Config] = []
    rig = rigs(limits={"max_memory": 1 << 20}, reload_config=lambda: new_config[0])
    rig.server.policy.memory.rss = lambda: 50 << 20
    rig.clock.advance(1.0)
    rig.settle()
    refused = Node(rig)
    rig.settle()
    assert refused.eof
    running = rig.server.config
    new_config.append(
        Config(
            identity_file=running.identity_file,
            listen=running.listen,
            limits=Limits(max_memory=1 << 30),
        )
    )
    rig.server.request_reload()
    rig.clock.advance(1.0)
    rig.settle()
    assert rig.node().is_open
    assert rig.server.stats.refused["memory"] == 1
