"""What an operator meets first: the original's flags and files, addresses nodes can dial,
errors that say what to do, and the logs and tools of a running relay."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

import pytest

from offset_appliance.files import b64url_encode, identity_text, load_identity

from .conftest import RelayProcess, wait_for

BIN = Path(sys.executable).parent
ORIGINAL_BIN = os.environ.get("OFFSET_ORIGINAL_BIN")


def run(*args, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=60, env=env
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def ident(tmp_path) -> Path:
    path = tmp_path / "relay.ident"
    assert run(BIN / "stmgr", "gen-ident", "--output", path).returncode == 0
    return path


def ticket_args(ident: Path, address: str, output) -> list:
    return ["relay-ticket", "--address", address, "--idfile", ident, "--output", output]


# -- the original's flags and files ------------------------------------------------------------


def test_short_flags_as_the_original(tmp_path):
    ident, ticket = tmp_path / "r.ident", tmp_path / "r.relay"
    assert run(BIN / "stmgr", "gen-ident", "-o", ident).returncode == 0
    made = run(
        BIN / "stmgr", "relay-ticket", "-a", "relay.example.org:4567", "-i", ident, "-o", ticket
    )
    assert made.returncode == 0, made.stderr
    assert json.loads(ticket.read_text())["address"] == "relay.example.org:4567"
    relay = subprocess.Popen(
        [BIN / "strelay", "-i", ident, "-l", "127.0.0.1:0"], stderr=subprocess.PIPE, text=True
    )
    try:
        assert relay.stderr is not None
        line = wait_for(relay.stderr.readline, "strelay's first line")
        while "listening on" not in line:
            line = relay.stderr.readline()
            assert line, "strelay exited"
    finally:
        relay.terminate()
        relay.wait(10)


def test_files_have_the_original_bytes(tmp_path, ident):
    """serde_json::to_string_pretty: two-space indent, declared field order, no final newline."""
    key = load_identity(ident)
    assert ident.read_bytes() == (
        b'{\n  "privateKey": "' + b64url_encode(bytes(key)).encode() + b'"\n}'
    )
    ticket = tmp_path / "t.relay"
    assert (
        run(BIN / "stmgr", *ticket_args(ident, "relais.bücher.example:4567", ticket)).returncode
        == 0
    )
    assert ticket.read_bytes() == (
        b'{\n  "publicKey": "'
        + b64url_encode(bytes(key.verify_key)).encode()
        + b'",\n  "address": "relais.b\xc3\xbccher.example:4567"\n}'
    )
    out = run(BIN / "stmgr", *ticket_args(ident, "relais.bücher.example:4567", "-"))
    assert out.returncode == 0 and out.stdout.encode() == ticket.read_bytes()


@pytest.mark.skipif(not ORIGINAL_BIN, reason="OFFSET_ORIGINAL_BIN (the original's binaries) unset")
def test_files_byte_identical_to_the_original_stmgr(tmp_path, ident):
    original = Path(ORIGINAL_BIN) / "stmgr"
    for address in ("relay_1.example.org:4567", "[2001:db8::1]:4567", "relais.bücher.example:1"):
        ours, theirs = tmp_path / "ours.relay", tmp_path / "theirs.relay"
        assert (
            run(BIN / "stmgr", *ticket_args(ident, address, ours), "--allow-private").returncode
            == 0
        )
        assert run(original, *ticket_args(ident, address, theirs)).returncode == 0
        assert ours.read_bytes() == theirs.read_bytes()
        ours.unlink()
        theirs.unlink()
    theirs_ident = tmp_path / "theirs.ident"
    assert run(original, "gen-ident", "--output", theirs_ident).returncode == 0
    key = load_identity(theirs_ident, check_permissions=False)
    assert theirs_ident.read_text() == identity_text(key)


# -- addresses ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    ["relay_1.example.org:4567", "2001:db8::1:4567", "relais.bücher.example:4567", "h:+4567"],
)
def test_ticket_takes_every_address_a_node_dials(tmp_path, ident, address):
    ticket = tmp_path / "t.relay"
    made = run(BIN / "stmgr", *ticket_args(ident, address, ticket))
    assert made.returncode == 0, made.stderr
    assert json.loads(ticket.read_text())["address"] == address


@pytest.mark.parametrize(
    "address, reason",
    [
        ("0.0.0.0:4567", "no node can dial it"),
        ("[::]:4567", "no node can dial it"),
        ("0:4567", "no node can dial it"),
        ("http://relay.example.org:4567", "drop http://"),
        ("relay.example.org", "no port"),
        ("relay.example.org:0", "expected 1-65535"),
        ("relay example.org:4567", "contains ' '"),
        ("2001:db8::zz:4567", "put an IPv6 address in brackets"),
        ("a" * 300 + ":1", "at most 256"),
    ],
)
def test_ticket_refuses_what_no_node_can_dial_saying_why(tmp_path, ident, address, reason):
    result = run(BIN / "stmgr", *ticket_args(ident, address, tmp_path / "t.relay"))
    assert result.returncode == os.EX_USAGE
    assert reason in one_line_error(result)
    assert not (tmp_path / "t.relay").exists()


def test_http_url_is_not_taken_for_ipv6(tmp_path, ident):
    result = run(BIN / "stmgr", *ticket_args(ident, "http://relay.example.org:4567", "-"))
    message = one_line_error(result)
    assert "not a URL" in message and "brackets" not in message.split(";")[0]


@pytest.mark.parametrize(
    "address, kind",
    [
        ("127.0.0.1:4567", "loopback"),
        ("localhost:4567", "this machine"),
        ("192.168.1.5:4567", "private"),
        ("100.64.0.7:4567", "private"),
        ("[fd00::1]:4567", "private"),
    ],
)
def test_ticket_warns_on_private_addresses(tmp_path, ident, address, kind):
    ticket = tmp_path / "t.relay"
    result = run(BIN / "stmgr", *ticket_args(ident, address, ticket))
    assert result.returncode == 0 and ticket.exists()
    assert kind in result.stderr and "--allow-private" in result.stderr
    ticket.unlink()
    quiet = run(BIN / "stmgr", *ticket_args(ident, address, ticket), "--allow-private")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_public_address_makes_no_warning(tmp_path, ident):
    result = run(BIN / "stmgr", *ticket_args(ident, "203.0.113.1:4567", "-"))
    assert result.returncode == 0
    result = run(BIN / "stmgr", *ticket_args(ident, "relay.example.org:4567", "-"))
    assert result.returncode == 0 and result.stderr == ""


def _ticket_for(relay: RelayProcess, address: str, path: Path) -> Path:
    doc = {"publicKey": b64url_encode(relay.public_key), "address": address}
    path.write_text(json.dumps(doc, indent=2))
    return path


def test_probe_takes_an_address_the_original_dials(relay, tmp_path):
    # "127.1" is 127.0.0.1 to the resolver, as to a node; it used to be refused.
    ticket = _ticket_for(relay, f"127.1:{relay.port}", tmp_path / "t.relay")
    result = run(BIN / "stmgr", "probe", ticket, "--timeout", "10")
    assert result.returncode == 0, result.stderr
    ticket = _ticket_for(relay, f"relay_1.invalid:{relay.port}", tmp_path / "u.relay")
    result = run(BIN / "stmgr", "probe", ticket, "--timeout", "10")
    assert result.returncode == 2, result.stderr  # a name to look up, not a refused ticket


def test_probe_refuses_a_ticket_for_the_unspecified_address(tmp_path, relay):
    ticket = _ticket_for(relay, f"0.0.0.0:{relay.port}", tmp_path / "t.relay")
    result = run(BIN / "stmgr", "probe", ticket)
    assert result.returncode == os.EX_DATAERR
    assert "no node can dial it" in one_line_error(result)


def test_probe_an_address_before_the_ticket_exists(relay):
    address = f"127.0.0.1:{relay.port}"
    by_identity = run(BIN / "stmgr", "probe", "--address", address, "--idfile", relay.ident)
    assert by_identity.returncode == 0, by_identity.stderr
    assert by_identity.stdout.startswith(f"OK relay {address}")
    key = b64url_encode(relay.public_key)
    by_key = run(BIN / "stmgr", "probe", "-a", address, "--public-key", key)
    assert by_key.returncode == 0, by_key.stderr
    missing = run(BIN / "stmgr", "probe", "--address", address)
    assert missing.returncode == os.EX_USAGE
    assert "--idfile" in one_line_error(missing)


def test_probe_address_overrides_the_ticket(relay, tmp_path):
    ticket = _ticket_for(relay, "relay.example.org:4567", tmp_path / "t.relay")
    result = run(BIN / "stmgr", "probe", ticket, "--address", f"127.0.0.1:{relay.port}")
    assert result.returncode == 0, result.stderr


def test_probe_of_the_wrong_key_shows_both_keys(relay, tmp_path):
    other = tmp_path / "other.ident"
    run(BIN / "stmgr", "gen-ident", "--output", other)
    wrong = b64url_encode(bytes(load_identity(other).verify_key))
    result = run(
        BIN / "stmgr", "probe", "--address", f"127.0.0.1:{relay.port}", "--public-key", wrong
    )
    assert result.returncode == 1
    line = one_line_error(result)
    assert wrong in line and b64url_encode(relay.public_key) in line


# -- identities --------------------------------------------------------------------------------


def test_identity_of_the_original_0644_names_the_fix(tmp_path, ident):
    ident.chmod(0o644)
    result = run(BIN / "strelay", "-i", ident, "-l", "127.0.0.1:0")
    assert result.returncode == os.EX_CONFIG
    assert one_line_error(result).endswith(f"run: chmod 600 {ident}")


def test_ticket_given_as_identity_says_it_is_a_ticket(tmp_path, ident):
    ticket = tmp_path / "relay.relay"
    run(BIN / "stmgr", *ticket_args(ident, "relay.example.org:4567", ticket))
    assert ticket.stat().st_mode & 0o777 == 0o644
    result = run(BIN / "strelay", "--idfile", ticket, "--laddr", "127.0.0.1:0")
    assert result.returncode == os.EX_CONFIG
    line = one_line_error(result)
    assert "is a relay ticket" in line and "chmod" not in line
    result = run(BIN / "stmgr", *ticket_args(ticket, "relay.example.org:4567", "-"))
    assert result.returncode == os.EX_DATAERR
    assert "is a relay ticket" in one_line_error(result)


# -- strelay's errors --------------------------------------------------------------------------


def test_port_in_use_is_one_line_naming_the_socket(tmp_path, ident):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(BIN / "strelay", "--idfile", ident, "--laddr", f"127.0.0.1:{port}")
        assert result.returncode == os.EX_UNAVAILABLE
        line = one_line_error(result)
        assert line.startswith("strelay: cannot open the relay socket")
        assert "set by --laddr" in line and f"ss -ltnp 'sport = :{port}'" in line

        config = tmp_path / "relay.toml"
        config.write_text(f'identity_file = "{ident}"\nlisten = ["127.0.0.1:0"]\n')
        (tmp_path / "relay.d").mkdir()
        dropin = tmp_path / "relay.d" / "60-metrics.toml"
        dropin.write_text(f'[metrics]\nenabled = true\nlisten = "127.0.0.1:{port}"\n')
        result = run(BIN / "strelay", "--config", config)
        assert result.returncode == os.EX_UNAVAILABLE
        line = one_line_error(result)
        assert line.startswith("strelay: cannot open the metrics socket")
        assert f"set by metrics.listen in {dropin}" in line


def test_exit_69_is_documented():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    assert re.search(r"69 [^,.]*(port|socket|listen)", readme)


def test_max_connections_below_max_handshakes(tmp_path, ident):
    config = tmp_path / "relay.toml"
    config.write_text(
        f'identity_file = "{ident}"\nlisten = ["127.0.0.1:0"]\n[limits]\nmax_connections = 100\n'
    )
    relay = subprocess.Popen(
        [BIN / "strelay", "--config", config], stderr=subprocess.PIPE, text=True
    )
    try:
        assert relay.stderr is not None
        while "listening on" not in (line := relay.stderr.readline()):
            assert line, "strelay exited"
    finally:
        relay.terminate()
        relay.wait(10)
    config.write_text(
        f'identity_file = "{ident}"\nlisten = ["127.0.0.1:0"]\n'
        "[limits]\nmax_connections = 100\nmax_handshakes = 512\n"
    )
    result = run(BIN / "strelay", "--config", config)
    assert result.returncode == os.EX_CONFIG
    assert "lower max_handshakes too" in one_line_error(result)


# -- a running relay: its log, its tools -------------------------------------------------------


def _start(directory: Path, settings: str = "", dropins: dict[str, str] | None = None):
    directory.mkdir()
    if dropins:
        (directory / "relay.d").mkdir()
        for name, text in dropins.items():
            (directory / "relay.d" / name).write_text(text)
    relay = RelayProcess(directory, settings)
    # A handshake proves the loop runs, so its signal handlers are in place for SIGHUP.
    relay.client().close()
    return relay


@pytest.fixture
def started():
    relays: list[RelayProcess] = []
    yield relays
    for relay in relays:
        relay.stop()
        assert "Traceback" not in relay.log_text()


def test_reload_restoring_listen_does_not_warn(tmp_path, started):
    relay = _start(tmp_path / "r")
    started.append(relay)
    original = relay.config.read_text()

    def reload() -> None:
        count = relay.log_text().count("configuration reloaded")
        relay.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: relay.log_text().count("configuration reloaded") > count, "a reload")

    relay.config.write_text(original.replace("127.0.0.1:0", "127.0.0.1:1"))
    reload()
    assert relay.log_text().count("this takes a restart") == 1
    relay.config.write_text(original)
    reload()
    assert relay.log_text().count("this takes a restart") == 1


def test_config_files_logged_at_start_and_reload(tmp_path, started):
    dropins = {
        "50-a.toml": "[limits]\nmax_connections = 5000\n",
        "60-b.toml": 'listen = ["127.0.0.1:0"]\n',
    }
    relay = _start(tmp_path / "r", dropins=dropins)
    started.append(relay)
    d = relay.dir / "relay.d"
    read = f"configuration read from {relay.config}, {d / '50-a.toml'}, {d / '60-b.toml'}"
    assert f"start: {read}" in relay.log_text()
    # The drop-in repeats the listen in force: nothing replaced, nothing warned.
    assert "replaces the listen" not in relay.log_text()
    relay.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: f"reload: {read}" in relay.log_text(), "the reload's list of files")


def test_start_up_names_the_ticket_and_key(tmp_path, started):
    directory = tmp_path / "r"
    directory.mkdir()
    ident = directory / "relay.ident"
    run(BIN / "stmgr", "gen-ident", "--output", ident)
    key = b64url_encode(bytes(load_identity(ident).verify_key))
    relay = _start_in(directory, started)
    assert f"no ticket at {directory / 'relay.relay'} yet" in relay.log_text()
    relay.stop()
    run(BIN / "stmgr", *ticket_args(ident, "relay.example.org:4567", directory / "relay.relay"))
    relay = _start_in(directory, started)
    wanted = f"ticket {directory / 'relay.relay'}: address relay.example.org:4567, public key {key}"
    assert wanted in relay.log_text()


def _start_in(directory: Path, started: list) -> RelayProcess:
    relay = RelayProcess(directory)
    started.append(relay)
    return relay


def test_healthz_on_the_metrics_listener(tmp_path, started):
    relay = _start(tmp_path / "r", '[metrics]\nenabled = true\nlisten = "127.0.0.1:0"\n')
    started.append(relay)
    match = wait_for(
        lambda: re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", relay.log_text()),
        "the metrics address",
    )
    url = f"http://127.0.0.1:{match.group(1)}/healthz"
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        assert response.read() == b"ok\n"


# -- day-one tools -----------------------------------------------------------------------------


def test_versions():
    from offset_appliance import __version__

    for command in ("strelay", "stmgr"):
        result = run(BIN / command, "--version")
        assert result.returncode == 0 and result.stdout.strip() == f"{command} {__version__}"


@pytest.mark.parametrize(
    "command",
    [
        ("strelay",),
        ("stmgr",),
        ("stmgr", "gen-ident"),
        ("stmgr", "relay-ticket"),
        ("stmgr", "probe"),
    ],
)
def test_help_has_an_example(command):
    result = run(BIN / command[0], *command[1:], "--help")
    assert result.returncode == 0
    assert re.search(r"^examples?:\n  \S", result.stdout, re.M), result.stdout
    tail = result.stdout.split("example", 1)[1]
    assert f"{command[0]} {command[1]}" in tail if len(command) > 1 else command[0] in tail


@pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("setpriv"), reason="needs root and setpriv"
)
def test_low_port_without_the_capability_names_it():
    """As an unprivileged user (what the unit runs as), port 1000 needs CAP_NET_BIND_SERVICE."""
    directory = Path(tempfile.mkdtemp(prefix="offset-lowport-"))
    try:
        directory.chmod(0o755)
        ident = directory / "relay.ident"
        run(BIN / "stmgr", "gen-ident", "--output", ident)
        os.chown(ident, 65534, 65534)
        result = run(
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            BIN / "strelay",
            "-i",
            ident,
            "-l",
            "127.0.0.1:1000",
        )
        assert result.returncode == os.EX_UNAVAILABLE
        line = one_line_error(result)
        assert "127.0.0.1:1000" in line and "CAP_NET_BIND_SERVICE" in line
    finally:
        shutil.rmtree(directory)


# -- what the relay logs about its clients, on a live relay -------------------------------------


def test_refusals_by_a_limit_are_one_warning_per_source(tmp_path, started):
    relay = _start(tmp_path / "r", "[limits]\nmax_connections_per_ip = 2\n")
    started.append(relay)
    kept = [relay.client()]  # with the check connection of _start closed: two open
    kept.append(relay.client())
    for _ in range(5):
        with socket.create_connection(relay.address, timeout=10) as sock:
            assert sock.recv(1) == b""  # refused: closed at once
    # Said a second after the first: the five came within it (a count true when printed).
    line = "refusing 127.0.0.1: max_connections_per_ip (2); 5 refused in the last 1 s"
    wait_for(lambda: "refusing " in relay.log_text(), "the refusal warning")
    assert sum("refusing " in text for text in relay.lines) == 1, relay.log_text()
    assert line in relay.log_text(), relay.log_text()
    for client in kept:
        client.close()


def test_open_and_close_lines_find_the_client(tmp_path, started):
    from .conftest import tunnel

    relay = _start(tmp_path / "r")
    started.append(relay)
    # The loop's first pass logs the status (the next one is 5 minutes later). The log
    # reaches relay.lines through a reader thread of this process, which can lag behind the
    # relay under load: wait for the line rather than read the log at once.
    wait_for(
        lambda: re.search(r"INFO status: \d+ connections", relay.log_text()),
        "the status line at start",
    )
    listener, connector, acceptor = tunnel(relay)
    connector.send(b"y" * 500)
    assert acceptor.receive(10) == b"y" * 500
    connector.close()
    key = b64url_encode(connector.public_key)[:8]
    closed = wait_for(
        lambda: [line for line in relay.lines if f"close, key {key}, tunnel, after" in line],
        "the connector's close line",
    )
    assert re.search(
        r"127\.0\.0\.1:\d+: close, key \S+, tunnel, after [\d.]+ s, \d+ B in", closed[0]
    )
    assert closed[0].endswith("0 B out: peer_closed")
    assert f"open, key {b64url_encode(listener.public_key)[:8]}" in relay.log_text()
    wait_for(lambda: "500 B out: tunnel_peer_closed" in relay.log_text(), "the acceptor's line")
    listener.close()
    acceptor.close()
