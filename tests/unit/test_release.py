"""`make release VERSION=X.Y.Z` (tools/release), run on a git copy of the files that carry the
version: it sets all of them to the same version and adds a well-formed changelog entry, or
refuses with one line and changes nothing."""

from __future__ import annotations

import email.utils
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FILES = [
    "tools/release",
    "offset_appliance/__init__.py",
    "pyproject.toml",
    "packaging/debian/changelog",
    "man/strelay.1",
    "man/stmgr.1",
    "README.md",
]
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@example.org",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@example.org",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": "/nonexistent",
}

pytestmark = pytest.mark.skipif(
    not (shutil.which("dpkg") and shutil.which("git") and shutil.which("make")),
    reason="needs dpkg, git and make",
)


# Run as make would be from a shell, also when this suite itself runs under make (whose
# variables would make the inner make say "make[1]:" and pass its flags on).
OUTSIDE_MAKE = {
    k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")
}


def run(cwd: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, cwd=cwd, env={**OUTSIDE_MAKE, **GIT_ENV, **env}, capture_output=True, text=True
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The files that carry the version, the release script and the Makefile, committed."""
    for name in [*FILES, "Makefile"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    assert run(tmp_path, "git", "init", "-q").returncode == 0
    assert run(tmp_path, "git", "add", "-A").returncode == 0
    assert run(tmp_path, "git", "commit", "-q", "-m", "base").returncode == 0
    return tmp_path


def version_of(tree: Path) -> str:
    text = (tree / "offset_appliance/__init__.py").read_text()
    match = re.search(r'^__version__ = "(.*)"$', text, re.M)
    assert match
    return match.group(1)


def bump(version: str, part: int) -> str:
    numbers = [int(n) for n in version.split(".")]
    numbers[part] += 1
    numbers[part + 1 :] = [0] * (2 - part)
    return ".".join(map(str, numbers))


def snapshot(tree: Path) -> dict[str, str]:
    return {name: (tree / name).read_text() for name in FILES}


def parsechangelog(tree: Path, field: str) -> str:
    result = run(tree, "dpkg-parsechangelog", "-l", "packaging/debian/changelog", "-S", field)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_release_sets_every_place_and_adds_the_entry(tree):
    old = version_of(tree)
    new = bump(old, 1)
    before = snapshot(tree)
    message = "A long line about the release, " * 4 + "ending here."
    result = run(tree, "make", "release", f"VERSION={new}", f"MESSAGE={message}")
    assert result.returncode == 0, result.stderr
    assert version_of(tree) == new
    assert f'\nversion = "{new}"\n' in (tree / "pyproject.toml").read_text()
    for page in ("man/strelay.1", "man/stmgr.1"):
        assert f'"offset-relay {new}" "User Commands"' in (tree / page).read_text().splitlines()[0]
    if old != new and f"offset-relay_{old}_all.deb" in before["README.md"]:
        readme = (tree / "README.md").read_text()
        assert f"offset-relay_{old}_all.deb" not in readme
        assert f"offset-relay_{new}_all.deb" in readme
    # The new entry on top, the old ones below it untouched.
    changelog = (tree / "packaging/debian/changelog").read_text()
    assert changelog.split("\n\n", 3)[3] == before["packaging/debian/changelog"]
    lines = changelog.splitlines()
    assert lines[0] == f"offset-relay ({new}) unstable; urgency=medium"
    assert lines[1] == ""
    bullet = [lines[2]]
    i = 3
    while lines[i].startswith("    "):
        bullet.append(lines[i])
        i += 1
    assert bullet[0].startswith("  * ") and all(len(line) <= 80 for line in bullet)
    assert " ".join(line.strip() for line in bullet) == "* " + message.rstrip()
    assert lines[i] == ""
    previous_maintainer = re.search(
        r"^ -- (.*>)  ", before["packaging/debian/changelog"], re.M
    ).group(1)
    trailer = re.fullmatch(r" -- (.*>)  (.+)", lines[i + 1])
    assert trailer and trailer.group(1) == previous_maintainer
    assert email.utils.parsedate_to_datetime(trailer.group(2)).tzinfo is not None
    assert lines[i + 2] == ""
    # What Debian's tools read, and the Makefile's check of the three places.
    assert parsechangelog(tree, "Version") == new
    assert parsechangelog(tree, "Maintainer") == previous_maintainer
    assert parsechangelog(tree, "Distribution") == "unstable"
    check = run(tree, "make", "check-version")
    assert check.returncode == 0, check.stderr
    # The next steps.
    assert f"git tag -a v{new}" in result.stdout and "make deb" in result.stdout
    assert "make apt-repo" in result.stdout


def test_default_message(tree):
    new = bump(version_of(tree), 2)
    result = run(tree, "tools/release", new)
    assert result.returncode == 0, result.stderr
    changes = parsechangelog(tree, "Changes")
    assert "* New upstream release." in changes


@pytest.mark.parametrize("which", ["equal", "lower", "not X.Y.Z", "leading zero", "none"])
def test_refuses_a_version_not_greater_or_not_plain(tree, which):
    old = version_of(tree)
    major, minor, patch = (int(n) for n in old.split("."))
    lower = f"{major}.{minor}.{patch - 1}" if patch else f"{major}.{minor - 1}.9" if minor else ""
    version = {
        "equal": old,
        "lower": lower or "0.0.0",
        "not X.Y.Z": bump(old, 1).rsplit(".", 1)[0],
        "leading zero": "0" + bump(old, 0),
        "none": None,
    }[which]
    before = snapshot(tree)
    argv = ["make", "release"] + ([f"VERSION={version}"] if version is not None else [])
    result = run(tree, *argv)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if not line.startswith("make:")]
    assert len(errors) == 1 and errors[0].startswith("release: "), result.stderr
    if which in ("equal", "lower"):
        assert "is not greater than the current version" in errors[0]
    assert snapshot(tree) == before


def test_refuses_a_dirty_tree(tree):
    before = snapshot(tree)
    with (tree / "pyproject.toml").open("a") as f:
        f.write("# local edit\n")
    dirty = snapshot(tree)
    result = run(tree, "tools/release", bump(version_of(tree), 1))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        "release: the tree is not clean (pyproject.toml and maybe more): commit or stash first"
    ]
    assert snapshot(tree) == dirty != before
    # An untracked file counts too: it would go into the package.
    run(tree, "git", "checkout", "-q", "pyproject.toml")
    (tree / "stray").write_text("")
    result = run(tree, "tools/release", bump(version_of(tree), 1))
    assert result.returncode == 1 and "not clean (stray" in result.stderr
    assert snapshot(tree) == before


@pytest.mark.skipif(not shutil.which("dpkg-parsechangelog"), reason="needs dpkg-dev")
def test_mismatch_names_the_three_places_and_make_release(tree):
    init = tree / "offset_appliance/__init__.py"
    init.write_text(init.read_text().replace(version_of(tree), bump(version_of(tree), 2)))
    result = run(tree, "make", "check-version")
    assert result.returncode != 0
    error = result.stderr.splitlines()[0]
    assert "packaging/debian/changelog does not match version" in error
    for place in ("offset_appliance/__init__.py", "pyproject.toml", "packaging/debian/changelog"):
        assert place in error
    assert "make release VERSION=X.Y.Z" in error
