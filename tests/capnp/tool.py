"""Drive the reference ``capnp`` tool (Debian package ``capnproto``) on our schema.

Tests that use it fail, never skip, when the tool is missing: ``make test`` installs it.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

SCHEMA = Path(__file__).with_name("offset.capnp")

# How the tool's text format writes bytes that are not printed as themselves.
_ESCAPES = {
    0x07: "\\a",
    0x08: "\\b",
    0x09: "\\t",
    0x0A: "\\n",
    0x0B: "\\v",
    0x0C: "\\f",
    0x0D: "\\r",
    0x22: '\\"',
    0x27: "\\'",
    0x5C: "\\\\",
}


def capnp() -> str:
    """Path of the ``capnp`` executable; fails the test if it is not installed."""
    path = shutil.which("capnp")
    if path is None:
        pytest.fail("the capnp tool is missing: install the Debian package capnproto (make deps)")
    return path


def run(args: list[str], data: bytes) -> subprocess.CompletedProcess[bytes]:
    """Run ``capnp ARGS`` with ``data`` on stdin."""
    return subprocess.run([capnp(), *args], input=data, capture_output=True, timeout=120)


def decode(struct_name: str, packed: bytes) -> str:
    """The tool's one-line text of a packed message; fails on any error or warning."""
    result = run(["decode", "--packed", "--short", str(SCHEMA), struct_name], packed)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    # The tool warns when input does not look like what it expects; ours must not.
    assert result.stderr == b"", result.stderr.decode(errors="replace")
    return result.stdout.decode("ascii").rstrip("\n")


def encode(struct_name: str, text: str) -> bytes:
    """The tool's packed encoding of a message written in its text format."""
    result = run(["encode", "--packed", str(SCHEMA), struct_name], text.encode("ascii"))
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def compile_layout() -> str:
    """The schema as the compiler lays it out (``capnp compile -ocapnp``)."""
    result = subprocess.run(
        [capnp(), "compile", "-ocapnp", str(SCHEMA)], capture_output=True, timeout=120
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode()


def data_text(value: bytes) -> str:
    """A Data value as the tool prints it."""
    chars = []
    for byte in value:
        if byte in _ESCAPES:
            chars.append(_ESCAPES[byte])
        elif 0x20 <= byte < 0x7F:
            chars.append(chr(byte))
        else:
            chars.append(f"\\{byte:03o}")
    return '"' + "".join(chars) + '"'


def data_literal(value: bytes) -> str:
    """A Data value written for the tool's parser (a hex literal; it refuses an empty one)."""
    return f'0x"{value.hex()}"' if value else '""'


def buffer_text(value: bytes) -> str:
    """A BufferN struct holding ``value``: x0.. are the big-endian 8-byte chunks."""
    words = struct.unpack(f">{len(value) // 8}Q", value)
    return "(" + ", ".join(f"x{i} = {word}" for i, word in enumerate(words)) + ")"


def wrapped_text(value: bytes) -> str:
    """A PublicKey, Salt, Signature, ... struct: one pointer to the BufferN."""
    return f"(inner = {buffer_text(value)})"
