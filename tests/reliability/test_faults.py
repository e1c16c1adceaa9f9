"""Faults an operator meets: a bad identity file, a port in use, a broken configuration.

The relay refuses to start with one line on stderr and a sysexits code (78 for anything in
its configuration, the identity included, so systemd's RestartPreventExitStatus stops a
restart loop; 69 when it cannot listen), and never with a traceback. A configuration broken
while the relay runs is refused on reload and the running one is kept.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from offset_appliance.files import generate_identity

from .relaylib import assert_probe_passes

BIN = Path(sys.executable).parent
EX_UNAVAILABLE = 69
EX_CONFIG = 78
# Root reads any file whatever its mode; without these two capabilities it obeys the mode
# like anyone else, which is how an unreadable identity is made to fail here.
DROP_FILE_CAPABILITIES = ("setpriv", "--bounding-set=-dac_override,-dac_read_search", "--")


def strelay(*args, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run strelay to completion (it must refuse to start, so it returns at once)."""
    return subprocess.run(
        [*prefix, str(BIN / "strelay"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line(result: subprocess.CompletedProcess) -> str:
    """The single line the relay printed; it must be exactly one, and no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "listening on" not in result.stderr
    return lines[0]


def _identity(tmp_path: Path) -> Path:
    path = tmp_path / "relay.ident"
    generate_identity(path)
    return path


def _write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# ---- the identity file -------------------------------------------------------------------


def _missing(path: Path) -> Path:
    return path


def _directory(path: Path) -> Path:
    path.mkdir(mode=0o700)
    return path


def _unreadable(path: Path) -> Path:
    generate_identity(path)
    path.chmod(0o000)
    return path


def _group_readable(path: Path) -> Path:
    generate_identity(path)
    path.chmod(0o640)
    return path


def _other_readable(path: Path) -> Path:
    generate_identity(path)
    path.chmod(0o604)
    return path


def _group_writable(path: Path) -> Path:
    generate_identity(path)
    path.chmod(0o620)
    return path


IDENTITY_FAULTS = [
    (_missing, "does not exist"),
    (_directory, "is a directory"),
    (_unreadable, "Permission denied"),
    (_group_readable, "chmod 600"),
    (_other_readable, "chmod 600"),
    (_group_writable, "chmod 600"),
    (lambda p: _write(p, ""), "not valid JSON"),
    (lambda p: _write(p, "not json"), "not valid JSON"),
    (lambda p: _write(p, "[]"), "not a JSON object"),
    (lambda p: _write(p, '{"publicKey": "AAAA"}'), '"privateKey"'),
    (lambda p: _write(p, '{"privateKey": "!!!"}'), "base64url"),
    (lambda p: _write(p, '{"privateKey": "AAAA"}'), "32 bytes"),
    (lambda p: _write(p, '{"privateKey": 7}'), "base64url"),
]


@pytest.mark.parametrize(
    "make, needle", IDENTITY_FAULTS, ids=[f"{n:02d}" for n in range(len(IDENTITY_FAULTS))]
)
@pytest.mark.parametrize("how", ["idfile", "config"])
def test_unusable_identity_refuses_to_start(tmp_path, make, needle, how):
    ident = make(tmp_path / "relay.ident")
    prefix = DROP_FILE_CAPABILITIES if os.geteuid() == 0 and make is _unreadable else ()
    if how == "idfile":
        result = strelay("--idfile", ident, "--laddr", "127.0.0.1:0", prefix=prefix)
    else:
        config = tmp_path / "relay.toml"
        config.write_text(f'identity_file = "{ident}"\nlisten = ["127.0.0.1:0"]\n')
        result = strelay("--config", config, prefix=prefix)
    assert result.returncode == EX_CONFIG, result.stderr
    line = one_line(result)
    assert line.startswith("strelay: ") and needle in line and str(ident) in line


def test_a_good_identity_under_the_same_conditions_starts(tmp_path):
    # The same command, capabilities dropped, starts with a readable identity: the failures
    # above are the identity's, not the harness's.
    ident = _identity(tmp_path)
    prefix = DROP_FILE_CAPABILITIES if os.geteuid() == 0 else ()
    proc = subprocess.Popen(
        [*prefix, str(BIN / "strelay"), "--idfile", str(ident), "--laddr", "127.0.0.1:0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            if "relay public key" in line:
                break
        else:
            raise AssertionError("strelay did not start: " + "".join(lines))
    finally:
        proc.kill()
        proc.wait(10)
    assert any("listening on 127.0.0.1:" in line for line in lines)


# ---- listening ---------------------------------------------------------------------------


def test_port_in_use_exits_69(tmp_path):
    ident = _identity(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = strelay("--idfile", ident, "--laddr", f"127.0.0.1:{port}")
        assert result.returncode == EX_UNAVAILABLE
        line = one_line(result)
        assert f"127.0.0.1:{port}" in line and "in use" in line
        # The metrics endpoint's address is checked the same way.
        config = tmp_path / "relay.toml"
        config.write_text(
            f'identity_file = "{ident}"\nlisten = ["127.0.0.1:0"]\n'
            f'[metrics]\nenabled = true\nlisten = "127.0.0.1:{port}"\n'
        )
        result = strelay("--config", config)
        assert result.returncode == EX_UNAVAILABLE
        assert f"127.0.0.1:{port}" in one_line(result)


def test_address_not_on_this_host_exits_69(tmp_path):
    # 192.0.2.0/24 is TEST-NET-1: never assigned to a host, so binding fails.
    result = strelay("--idfile", _identity(tmp_path), "--laddr", "192.0.2.1:4567")
    assert result.returncode == EX_UNAVAILABLE
    assert "192.0.2.1:4567" in one_line(result)


# ---- the configuration -------------------------------------------------------------------

CONFIG_FAULTS = [
    ("listen = [", "not valid TOML"),
    ("bogus = 1", "unknown key 'bogus'"),
    ("[limits]\nbogus = 1", "limits.bogus"),
    ('[limits]\nmax_connections = "many"', "limits.max_connections: expected a number"),
    ("[limits]\nmax_connections = 1.5", "expected an integer"),
    ("[limits]\nmax_frame_length = 10", "limits.max_frame_length: must be between"),
    ("[limits]\nbuffer_low_water = 2000000", "must be below buffer_high_water"),
    ("[limits]\nmax_handshakes = 30000", "must not exceed max_connections"),
    ("[timeouts]\nkeepalive = 1", "timeouts.keepalive: must be between"),
    ("[timeouts]\nconn_timeout = inf", "finite"),
    ('[metrics]\nenabled = "yes"', "metrics.enabled: expected true or false"),
    ("limits = 3", "limits: expected a table"),
    ('log_level = "loud"', "log_level: expected one of"),
]


def _config(tmp_path: Path, extra: str, listen: str = '["127.0.0.1:0"]') -> Path:
    ident = _identity(tmp_path)
    config = tmp_path / "relay.toml"
    config.write_text(f'identity_file = "{ident}"\nlisten = {listen}\n{extra}\n')
    return config


@pytest.mark.parametrize(
    "extra, needle", CONFIG_FAULTS, ids=[f"{n:02d}" for n in range(len(CONFIG_FAULTS))]
)
def test_config_error_exits_78_naming_the_key(tmp_path, extra, needle):
    result = strelay("--config", _config(tmp_path, extra))
    assert result.returncode == EX_CONFIG, result.stderr
    assert needle in one_line(result)


@pytest.mark.parametrize(
    "listen, needle",
    [
        ('["relay.example:4567"]', "must be an IP address"),
        ("[]", "expected a list of addresses"),
        ('["127.0.0.1:4567", "127.0.0.1:4567"]', "given twice"),
        ('["127.0.0.1:99999"]', "invalid port"),
    ],
)
def test_bad_listen_address_exits_78(tmp_path, listen, needle):
    result = strelay("--config", _config(tmp_path, "", listen=listen))
    assert result.returncode == EX_CONFIG, result.stderr
    assert needle in one_line(result)


def test_missing_config_and_bad_drop_in_exit_78(tmp_path):
    result = strelay("--config", tmp_path / "absent.toml")
    assert result.returncode == EX_CONFIG
    assert "does not exist" in one_line(result)
    config = _config(tmp_path, "")
    drop_ins = tmp_path / "relay.d"
    drop_ins.mkdir()
    (drop_ins / "50-local.toml").write_text("[limits]\nmax_connections = 0\n")
    result = strelay("--config", config)
    assert result.returncode == EX_CONFIG
    line = one_line(result)
    assert "50-local.toml" in line and "limits.max_connections" in line


def test_a_broken_config_on_reload_keeps_the_running_one(relay_factory):
    relay = relay_factory()
    good = relay.config.read_text()
    relay.config.write_text(good + "[limits]\nmax_connections = 0\n")
    relay.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while "reload failed" not in relay.log_text():
        assert time.monotonic() < deadline, relay.log_text()
        time.sleep(0.05)
    assert_probe_passes(relay)
    relay.config.write_text(good)
    relay.proc.send_signal(signal.SIGHUP)
    while "configuration reloaded" not in relay.log_text():
        assert time.monotonic() < deadline + 15, relay.log_text()
        time.sleep(0.05)
    assert_probe_passes(relay)
    failures = [line for line in relay.lines if "reload failed" in line]
    assert len(failures) == 1 and "limits.max_connections" in failures[0]
    assert relay.proc.poll() is None
