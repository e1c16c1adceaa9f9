"""The TOML config: defaults, drop-ins, overrides and errors that name the key."""

from __future__ import annotations

import argparse
import logging
import os
import tomllib
from pathlib import Path

import pytest

from offset_appliance.cli.strelay import _log_sources
from offset_appliance.config import (
    LIMIT_MAXIMUM,
    Bandwidth,
    Budgets,
    Limits,
    Timeouts,
    dump_config,
    load_config,
)
from offset_appliance.errors import ConfigError, UsageError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "relay.toml"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_example_config_is_valid_and_spells_out_the_defaults():
    config = load_config(EXAMPLE)
    assert config.identity_file == Path("/var/lib/offset-relay/relay.ident")
    assert config.listen == (("0.0.0.0", 4567), ("::", 4567))
    assert config.limits == Limits()
    assert config.timeouts == Timeouts()
    assert config.limits.max_handshakes == 512
    assert config.limits.max_frame_length == 1048576
    assert config.bandwidth == Bandwidth() and config.budgets == Budgets()


def test_drop_ins_override_in_name_order(tmp_path):
    main = write(
        tmp_path / "relay.toml",
        'identity_file = "id"\nlisten = ["0.0.0.0:4567"]\n[limits]\nmax_connections = 100\n',
    )
    write(tmp_path / "relay.d" / "50-a.toml", "[limits]\nmax_handshakes = 7\n")
    write(tmp_path / "relay.d" / "90-b.toml", 'log_level = "debug"\n[limits]\nmax_handshakes = 9\n')
    write(tmp_path / "relay.d" / "ignored.conf", "garbage")
    config = load_config(main)
    assert config.identity_file == tmp_path / "id"
    assert config.limits.max_connections == 100
    assert config.limits.max_handshakes == 9
    assert config.log_level == "debug"


def test_command_line_overrides(tmp_path):
    main = write(tmp_path / "relay.toml", 'identity_file = "/a"\nlisten = ["0.0.0.0:1"]\n')
    config = load_config(
        main, identity_file=Path("/b"), listen=["[::1]:5", "127.0.0.1:6"], log_level="error"
    )
    assert config.identity_file == Path("/b")
    assert config.listen == (("::1", 5), ("127.0.0.1", 6))
    assert config.log_level == "error"


def test_no_config_file_at_all():
    config = load_config(None, identity_file=Path("x"), listen=["0.0.0.0:4567"])
    assert config.listen == (("0.0.0.0", 4567),)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("bogus = 1\n", "unknown key 'bogus'"),
        ("[limits]\nmax_conections = 5\n", "limits.max_conections: unknown key"),
        ("[timeouts]\nkeepalive = 0\n", "timeouts.keepalive"),
        ("[limits]\nmax_handshakes = -1\n", "limits.max_handshakes"),
        ('[limits]\nmax_handshakes = "5"\n', "limits.max_handshakes"),
        ("[limits]\nmax_handshakes = true\n", "limits.max_handshakes"),
        ("[limits]\nmax_handshakes = 1.5\n", "limits.max_handshakes"),
        ("[limits]\nbuffer_low_water = 2000000\n", "buffer_low_water"),
        ("[timeouts]\nhalf_tunnel = nan\n", "timeouts.half_tunnel"),
        ('log_level = "loud"\n', "log_level"),
        ('listen = ["example.org:1"]\n', "listen"),
        ('listen = ["1.2.3.4"]\n', "listen"),
        ("listen = []\n", "listen"),
        ("limits = 3\n", "limits"),
        ("this is not toml", "not valid TOML"),
    ],
)
def test_bad_values_name_the_file_and_key(tmp_path, text, needle):
    main = write(tmp_path / "relay.toml", 'identity_file = "id"\nlisten = ["0.0.0.0:1"]\n')
    write(tmp_path / "relay.d" / "10-x.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(main)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message
    assert "10-x.toml" in message


def test_missing_file_and_missing_settings(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="identity"):
        load_config(None, listen=["0.0.0.0:1"])
    with pytest.raises(ConfigError, match="listen"):
        load_config(None, identity_file=Path("x"))
    with pytest.raises(UsageError, match="--laddr"):
        load_config(None, identity_file=Path("x"), listen=["nothing"])


# ---- upper bounds, and the effective config as TOML ----------------------------------------


@pytest.mark.parametrize("key", sorted(LIMIT_MAXIMUM))
def test_a_limit_above_its_upper_bound_is_an_error_naming_the_key(tmp_path, key):
    high = LIMIT_MAXIMUM[key]
    room = {
        "max_handshakes": "max_connections = 1048576\n",
        # A low mark is only set beside a ceiling in bytes.
        "memory_low_mark": f"max_memory = {LIMIT_MAXIMUM['max_memory']}\n",
    }.get(key, "")
    main = write(
        tmp_path / "relay.toml",
        f'identity_file = "id"\nlisten = ["0.0.0.0:4567"]\n[limits]\n{room}{key} = {high}\n',
    )
    if key not in ("buffer_low_water", "memory_low_mark"):  # they stay below their pairs
        assert getattr(load_config(main).limits, key) == high
    write(main, main.read_text().replace(f"{key} = {high}", f"{key} = {high + 1}"))
    with pytest.raises(ConfigError, match=rf"limits\.{key}: must be between .* and {high}"):
        load_config(main)


def test_the_printed_config_reads_back_as_the_same_config(tmp_path):
    main = write(
        tmp_path / "relay.toml",
        'identity_file = "id"\nlisten = ["0.0.0.0:4567", "[::1]:0"]\n'
        '[limits]\nmax_connections = 1000\n[metrics]\nenabled = true\nlisten = "[::1]:9"\n',
    )
    write(tmp_path / "relay.d" / "50-a.toml", "[timeouts]\nkeepalive = 20\n")
    config = load_config(main)
    text = dump_config(config)
    again = write(tmp_path / "elsewhere" / "printed.toml", text)
    assert load_config(again) == config
    doc = tomllib.loads(text)
    assert doc["limits"]["max_handshakes"] == Limits().max_handshakes  # defaults spelled out
    assert doc["timeouts"]["keepalive"] == 20.0


def test_a_candidate_drop_in_is_read_in_place_of_the_installed_one(tmp_path):
    main = write(tmp_path / "relay.toml", 'identity_file = "id"\nlisten = ["0.0.0.0:4567"]\n')
    write(tmp_path / "relay.d" / "50-ansible.toml", "[limits]\nmax_handshakes = 7\n")
    write(tmp_path / "relay.d" / "90-local.toml", "[limits]\nmax_connections = 900\n")
    candidate = write(tmp_path / "tmp" / "candidate", "[limits]\nmax_handshakes = 9\n")
    config = load_config(main, replace_drop_ins={"50-ansible.toml": candidate})
    assert config.limits.max_handshakes == 9
    assert config.limits.max_connections == 900
    added = load_config(main, replace_drop_ins={"60-new.toml": candidate})
    assert added.limits.max_handshakes == 9


@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666])
def test_a_drop_in_writable_by_others_is_refused(tmp_path, mode):
    # As sshd's StrictModes: a file anyone but its owner may write could say anything.
    main = write(tmp_path / "relay.toml", 'identity_file = "id"\nlisten = ["0.0.0.0:1"]\n')
    drop_in = write(tmp_path / "relay.d" / "50-x.toml", 'log_level = "debug"\n')
    drop_in.chmod(mode)
    with pytest.raises(ConfigError, match="50-x.toml is writable by group or others"):
        load_config(main)
    drop_in.chmod(0o644)
    assert load_config(main).log_level == "debug"


def test_a_drop_in_owned_by_another_user_is_refused(tmp_path):
    main = write(tmp_path / "relay.toml", 'identity_file = "id"\nlisten = ["0.0.0.0:1"]\n')
    drop_in = write(tmp_path / "relay.d" / "50-x.toml", 'log_level = "debug"\n')
    drop_in.chmod(0o644)
    if os.geteuid() == 0:
        os.chown(drop_in, 65534, 65534)
        with pytest.raises(ConfigError, match="owned by uid 65534, not by root or the user"):
            load_config(main)
    else:
        # Files of the user running the relay (and of root) are accepted.
        assert load_config(main).log_level == "debug"


def test_a_config_that_is_a_fifo_is_refused_without_blocking(tmp_path):
    main = tmp_path / "relay.toml"
    os.mkfifo(main, 0o644)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_config(main)


@pytest.mark.parametrize(
    ("drop_in_listen", "warned"),
    [
        ('["0.0.0.0:4567", "[::]:4567"]', False),
        ('["0.0.0.0:4568"]', True),
    ],
)
def test_a_drop_in_listen_is_warned_about_only_when_it_differs(
    tmp_path, caplog, drop_in_listen, warned
):
    main = write(
        tmp_path / "relay.toml", 'identity_file = "id"\nlisten = ["0.0.0.0:4567", "[::]:4567"]\n'
    )
    drop_in = write(tmp_path / "relay.d" / "50-ansible.toml", f"listen = {drop_in_listen}\n")
    args = argparse.Namespace(config=main, laddr=None)
    with caplog.at_level(logging.INFO, logger="strelay"):
        _log_sources(args, "start")
    replaced = [m for m in caplog.messages if "replaces the listen" in m]
    expected = [
        f"listen of {drop_in} replaces the listen of {main} (a list is replaced, not extended)"
    ]
    assert replaced == (expected if warned else [])
    assert load_config(main).listen[0][1] == (4568 if warned else 4567)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[limits]\nmax_connections = 100\nmax_handshakes = 512\n", "limits.max_handshakes"),
        ("[limits\n", "not valid TOML"),
        ("bogus = 1\n", "unknown key 'bogus'"),
    ],
)
def test_a_candidate_drop_in_is_named_by_the_drop_in_it_will_become(tmp_path, text, message):
    main = write(tmp_path / "relay.toml", 'identity_file = "id"\nlisten = ["0.0.0.0:4567"]\n')
    candidate = write(tmp_path / "tmp" / ".source.toml", text)
    with pytest.raises(ConfigError) as caught:
        load_config(main, replace_drop_ins={"50-ansible.toml": candidate})
    error = str(caught.value)
    assert error.startswith(f"{tmp_path / 'relay.d' / '50-ansible.toml'}: "), error
    assert message in error
    # Only as the file checked, after the error itself.
    assert error.count(str(candidate)) <= 1
    assert str(candidate) not in error.split(" (checked as ")[0], error


def test_a_candidate_names_an_identity_relative_to_the_drop_in_directory(tmp_path):
    main = write(tmp_path / "relay.toml", 'listen = ["0.0.0.0:4567"]\n')
    candidate = write(tmp_path / "tmp" / ".source.toml", 'identity_file = "relay.ident"\n')
    config = load_config(main, replace_drop_ins={"50-ansible.toml": candidate})
    assert config.identity_file == tmp_path / "relay.d" / "relay.ident"
