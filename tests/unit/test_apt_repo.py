"""tools/make-apt-repo on a temporary folder, with two tiny packages built by dpkg-deb: the
repository keeps every version published, so a host can downgrade from it; the same file
again is kept, a changed one under a published version refused; --remove prunes a version;
the Release file is signed after every run."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "make-apt-repo"

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("reprepro", "gpg", "gpgv", "dpkg-deb")),
    reason="needs reprepro, gpg, gpgv and dpkg-deb (tools/install-deps)",
)


def fake_deb(where: Path, version: str, payload: str = "") -> Path:
    """An offset-relay_<version>_all.deb holding one small file."""
    where.mkdir(exist_ok=True)
    tree = where / f"tree-{version}-{len(payload)}"
    (tree / "DEBIAN").mkdir(parents=True)
    (tree / "DEBIAN" / "control").write_text(
        f"Package: offset-relay\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: Test <test@example.org>\nSection: net\nPriority: optional\n"
        "Description: test package\n"
    )
    (tree / "usr" / "share" / "offset-relay").mkdir(parents=True)
    (tree / "usr" / "share" / "offset-relay" / "version").write_text(version + payload)
    deb = where / f"offset-relay_{version}_all.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zxz", "--build", str(tree), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


@pytest.fixture
def key_dir(tmp_path: Path):
    home = tmp_path / "gnupg"
    yield home
    subprocess.run(
        ["gpgconf", "--kill", "gpg-agent"],
        env={**os.environ, "GNUPGHOME": str(home)},
        capture_output=True,
    )


def publish(key_dir: Path, *argv: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TOOL, *argv],
        env={**os.environ, "APT_KEY_DIR": str(key_dir)},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def versions(repo: Path) -> list[str]:
    packages = (repo / "dists" / "bookworm" / "main" / "binary-amd64" / "Packages").read_text()
    stanzas = [s for s in packages.split("\n\n") if s.strip()]
    for stanza in stanzas:  # every version listed is in the pool
        filename = re.search(r"^Filename: (\S+)$", stanza, re.MULTILINE)
        assert filename and (repo / filename.group(1)).is_file(), stanza
    found = [re.search(r"^Version: (\S+)$", s, re.MULTILINE) for s in stanzas]
    return sorted(m.group(1) for m in found if m)


def assert_signed(repo: Path, tmp_path: Path) -> None:
    """InRelease and Release.gpg verify with the published key, and Release lists the
    Packages index as it is."""
    keyring = tmp_path / "keyring.gpg"
    subprocess.run(
        ["gpg", "--batch", "--yes", "--dearmor", "--output", str(keyring)]
        + [str(repo / "offset-relay.asc")],
        check=True,
    )
    dists = repo / "dists" / "bookworm"
    for argv in (
        [str(dists / "InRelease")],
        [str(dists / "Release.gpg"), str(dists / "Release")],
    ):
        result = subprocess.run(
            ["gpgv", "--keyring", str(keyring), *argv], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
    index = dists / "main" / "binary-amd64" / "Packages"
    digest = subprocess.run(
        ["sha256sum", str(index)], capture_output=True, text=True, check=True
    ).stdout.split()[0]
    release = (dists / "Release").read_text()
    assert re.search(rf"^ {digest} +\d+ main/binary-amd64/Packages$", release, re.MULTILINE)


def test_a_new_version_is_added_beside_the_published_ones(tmp_path: Path, key_dir: Path) -> None:
    repo = tmp_path / "apt"
    old = fake_deb(tmp_path, "0.1.0")
    new = fake_deb(tmp_path, "0.2.0")

    first = publish(key_dir, repo, old)
    assert first.returncode == 0, first.stderr
    assert versions(repo) == ["0.1.0"]
    second = publish(key_dir, repo, new)

    assert second.returncode == 0, second.stderr
    assert versions(repo) == ["0.1.0", "0.2.0"]
    assert_signed(repo, tmp_path)
    assert sorted(p.name for p in repo.iterdir()) == ["dists", "offset-relay.asc", "pool"]


def test_the_same_file_again_is_kept_and_a_changed_one_refused(
    tmp_path: Path, key_dir: Path
) -> None:
    repo = tmp_path / "apt"
    deb = fake_deb(tmp_path, "0.2.0")
    assert publish(key_dir, repo, deb).returncode == 0
    pooled = next(repo.joinpath("pool").rglob("*.deb")).read_bytes()

    again = publish(key_dir, repo, deb)

    assert again.returncode == 0, again.stderr
    assert "offset-relay_0.2.0_all.deb is already published, identical: kept" in again.stderr
    assert versions(repo) == ["0.2.0"]
    assert_signed(repo, tmp_path)

    (tmp_path / "other").mkdir()
    changed = fake_deb(tmp_path / "other", "0.2.0", payload=" rebuilt")
    assert changed.read_bytes() != deb.read_bytes()
    refused = publish(key_dir, repo, changed)

    assert refused.returncode == 1
    (line,) = refused.stderr.splitlines()
    assert "offset-relay_0.2.0_all.deb is already published with other contents" in line
    assert next(repo.joinpath("pool").rglob("*.deb")).read_bytes() == pooled
    assert versions(repo) == ["0.2.0"]


def test_remove_prunes_one_version(tmp_path: Path, key_dir: Path) -> None:
    repo = tmp_path / "apt"
    for version in ("0.1.0", "0.2.0"):
        assert publish(key_dir, repo, fake_deb(tmp_path, version)).returncode == 0

    removed = publish(key_dir, "--remove", repo, "0.1.0")

    assert removed.returncode == 0, removed.stderr
    assert versions(repo) == ["0.2.0"]
    assert [p.name for p in repo.joinpath("pool").rglob("*.deb")] == ["offset-relay_0.2.0_all.deb"]
    assert_signed(repo, tmp_path)
    missing = publish(key_dir, "--remove", repo, "0.1.0")
    assert missing.returncode == 1
    assert missing.stderr.strip() == f"make-apt-repo: offset-relay 0.1.0 is not in {repo}"


def test_a_folder_that_is_no_repository_is_not_overwritten(tmp_path: Path, key_dir: Path) -> None:
    (tmp_path / "apt").mkdir()
    (tmp_path / "apt" / "notes.txt").write_text("mine\n")

    result = publish(key_dir, tmp_path / "apt", fake_deb(tmp_path, "0.1.0"))

    assert result.returncode == 1
    assert "exists but is no apt repository made by make-apt-repo" in result.stderr
    assert [p.name for p in (tmp_path / "apt").iterdir()] == ["notes.txt"]
