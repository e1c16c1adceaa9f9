"""The commands as an operator meets them: exit codes and one-line errors, never tracebacks."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, cwd=cwd, timeout=30
    )


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines, "expected an error message"
    return lines[-1]


def test_gen_ident_and_ticket_refuse_overwrite(tmp_path):
    ident, ticket = tmp_path / "r.ident", tmp_path / "r.relay"
    assert run(BIN / "stmgr", "gen-ident", "--output", ident).returncode == 0
    again = run(BIN / "stmgr", "gen-ident", "--output", ident)
    assert again.returncode == os.EX_CANTCREAT
    assert "already exists" in one_line_error(again)
    args = ("relay-ticket", "--address", "127.0.0.1:4567", "--idfile", ident, "--output", ticket)
    assert run(BIN / "stmgr", *args).returncode == 0
    again = run(BIN / "stmgr", *args)
    assert again.returncode == os.EX_CANTCREAT


@pytest.mark.parametrize("address", ["127.0.0.1", "host:0", "host:70000", "[::1:5", "a b:1"])
def test_ticket_rejects_bad_address(tmp_path, address):
    ident = tmp_path / "r.ident"
    run(BIN / "stmgr", "gen-ident", "--output", ident)
    result = run(
        BIN / "stmgr",
        "relay-ticket",
        "--address",
        address,
        "--idfile",
        ident,
        "--output",
        tmp_path / "t.relay",
    )
    assert result.returncode == os.EX_USAGE
    one_line_error(result)
    assert not (tmp_path / "t.relay").exists()


def test_ticket_from_missing_or_bad_identity(tmp_path):
    result = run(
        BIN / "stmgr",
        "relay-ticket",
        "--address",
        "h:1",
        "--idfile",
        tmp_path / "none",
        "--output",
        tmp_path / "t",
    )
    assert result.returncode == os.EX_NOINPUT
    (tmp_path / "bad").write_text("{}")
    result = run(
        BIN / "stmgr",
        "relay-ticket",
        "--address",
        "h:1",
        "--idfile",
        tmp_path / "bad",
        "--output",
        tmp_path / "t",
    )
    assert result.returncode == os.EX_DATAERR
    assert '"privateKey"' in one_line_error(result)


def test_usage_errors_exit_64():
    assert run(BIN / "stmgr").returncode == os.EX_USAGE
    assert run(BIN / "stmgr", "frobnicate").returncode == os.EX_USAGE
    assert run(BIN / "strelay", "--laddr").returncode == os.EX_USAGE


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: None, "does not exist"),
        (lambda p: (p.write_text("junk"), p.chmod(0o600)), "not valid JSON"),
        (lambda p: (p.write_text('{"privateKey": "AAAA"}'), p.chmod(0o600)), "32 bytes"),
        (lambda p: (p.write_text("{}"), p.chmod(0o644)), "chmod 600"),
        # A FIFO would block the open until a writer came: refused at once instead.
        (lambda p: os.mkfifo(p, 0o600), "not a regular file"),
        (lambda p: p.symlink_to("/dev/null"), "symbolic link"),
    ],
)
def test_strelay_refuses_unusable_identity(tmp_path, make, needle):
    ident = tmp_path / "relay.ident"
    make(ident)
    result = run(BIN / "strelay", "--idfile", ident, "--laddr", "127.0.0.1:0")
    assert result.returncode == os.EX_CONFIG
    assert needle in one_line_error(result)


def test_strelay_config_error_names_key(tmp_path):
    ident = tmp_path / "relay.ident"
    run(BIN / "stmgr", "gen-ident", "--output", ident)
    config = tmp_path / "relay.toml"
    config.write_text(f'identity_file = "{ident}"\nlisten = ["127.0.0.1:0"]\n[limits]\nbogus = 1\n')
    result = run(BIN / "strelay", "--config", config)
    assert result.returncode == os.EX_CONFIG
    assert "limits.bogus" in one_line_error(result)


def test_strelay_port_in_use(tmp_path):
    import socket

    ident = tmp_path / "relay.ident"
    run(BIN / "stmgr", "gen-ident", "--output", ident)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run(BIN / "strelay", "--idfile", ident, "--laddr", f"127.0.0.1:{port}")
    assert result.returncode == os.EX_UNAVAILABLE
    assert str(port) in one_line_error(result)


def test_probe_bad_ticket(tmp_path):
    (tmp_path / "t.relay").write_text('{"publicKey": "x"}')
    result = run(BIN / "stmgr", "probe", tmp_path / "t.relay")
    assert result.returncode == os.EX_DATAERR
    one_line_error(result)


def _relay_config(tmp_path, extra: str = "") -> Path:
    ident = tmp_path / "relay.ident"
    if not ident.exists():
        run(BIN / "stmgr", "gen-ident", "--output", ident)
    config = tmp_path / "relay.toml"
    config.write_text(f'identity_file = "{ident}"\nlisten = ["127.0.0.1:0"]\n' + extra)
    return config


def test_strelay_check_config_exits_0_or_78_naming_the_key(tmp_path):
    config = _relay_config(tmp_path)
    result = run(BIN / "strelay", "--check-config", "--config", config)
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout
    dropins = tmp_path / "relay.d"
    dropins.mkdir()
    (dropins / "50-x.toml").write_text("[limits]\nmax_half_tunnels_per_listener = 1025\n")
    result = run(BIN / "strelay", "--check-config", "--config", config)
    assert result.returncode == os.EX_CONFIG
    assert "50-x.toml: limits.max_half_tunnels_per_listener" in one_line_error(result)


def test_strelay_check_config_reads_a_candidate_in_place_of_a_drop_in(tmp_path):
    config = _relay_config(tmp_path)
    (tmp_path / "relay.d").mkdir()
    (tmp_path / "relay.d" / "50-ansible.toml").write_text("[limits]\nmax_handshakes = 1\n")
    candidate = tmp_path / "candidate"
    candidate.write_text("[limits]\nmax_handshakes = 0\n")
    args = ["--check-config", "--config", config, "--drop-in", f"50-ansible.toml={candidate}"]
    result = run(BIN / "strelay", *args)
    assert result.returncode == os.EX_CONFIG
    # Named by the drop-in it would become, not by the candidate's temporary path.
    error = one_line_error(result)
    assert f"{tmp_path / 'relay.d' / '50-ansible.toml'}: limits.max_handshakes" in error
    assert str(candidate) not in error
    result = run(BIN / "strelay", "--check-config", "--config", config)
    assert result.returncode == 0, result.stderr


def test_strelay_check_config_refuses_a_missing_identity(tmp_path):
    result = run(
        BIN / "strelay", "--check-config", "--idfile", tmp_path / "no.ident", "--laddr", "[::]:1"
    )
    assert result.returncode == os.EX_CONFIG
    assert "no.ident" in one_line_error(result)


def test_strelay_print_config_prints_the_effective_config_as_toml(tmp_path):
    import tomllib

    config = _relay_config(tmp_path, "[limits]\nmax_connections = 1000\n")
    result = run(BIN / "strelay", "--print-config", "--config", config, "--log-level", "debug")
    assert result.returncode == 0, result.stderr
    doc = tomllib.loads(result.stdout)
    assert doc["log_level"] == "debug"
    assert doc["listen"] == ["127.0.0.1:0"]
    assert doc["limits"]["max_connections"] == 1000
    assert doc["limits"]["max_handshakes"] == 512
    assert doc["timeouts"]["keepalive"] == 32.0
    assert doc["metrics"] == {"enabled": False, "listen": "127.0.0.1:9477"}
    printed = tmp_path / "printed.toml"
    printed.write_text(result.stdout)
    assert run(BIN / "strelay", "--check-config", "--config", printed).returncode == 0


def _proc_owner_of(argv: list, uid: int, ready: str) -> int:
    """Start ``argv`` as ``uid``, wait for ``ready`` on its stderr; the owner of its
    /proc/PID files (root for a process that is not dumpable, its own user otherwise)."""
    prefix = []
    if os.geteuid() == 0:
        prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    proc = subprocess.Popen(
        [*prefix, *map(str, argv)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if ready in line:
                break
        else:
            raise AssertionError(f"{argv[0]} exited before {ready!r}: {''.join(seen)}")
        return os.stat(f"/proc/{proc.pid}/environ").st_uid
    finally:
        proc.terminate()
        proc.wait(10)


def test_strelay_is_not_dumpable():
    # PR_SET_DUMPABLE 0: no core file holding the seed, no ptrace by the same user. The
    # kernel shows it by giving the process's /proc files to root.
    uid = 65534 if os.geteuid() == 0 else os.geteuid()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        home.chmod(0o755)
        _check_not_dumpable(home, uid)


def _check_not_dumpable(home: Path, uid: int) -> None:
    ident = home / "relay.ident"
    run(BIN / "stmgr", "gen-ident", "--output", ident)
    if os.geteuid() == 0:
        os.chown(ident, uid, uid)
    # The check itself: an ordinary process of that user owns its /proc files.
    python = [
        sys.executable,
        "-c",
        "import sys, time; print('up', file=sys.stderr, flush=True); time.sleep(30)",
    ]
    assert _proc_owner_of(python, uid, "up") == uid
    relay = [BIN / "strelay", "--idfile", ident, "--laddr", "127.0.0.1:0"]
    assert _proc_owner_of(relay, uid, "listening on") == 0
