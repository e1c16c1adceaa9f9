"""The package the way Debian ships its own (issue 13): ``make apt-repo`` builds the source
package, builds its binary in a clean bookworm chroot and publishes both in a signed apt
repository; lintian finds nothing to warn about in either; debian/copyright is machine
readable; piuparts installs, purges and upgrades the package from the previous release.

Needs root and Debian's tools (tools/install-deps). The chroots get their packages from the
Debian archive, as a build daemon's do; their bases are cached in
/var/cache/offset-relay-tests.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from offset_appliance import __version__

from .conftest import ROOT, make_signed_repo, run_make

pytestmark = pytest.mark.deploy

DIST = ROOT / "dist"
CHROOT_DEB = DIST / "chroot" / f"offset-relay_{__version__}_all.deb"
DSC = DIST / f"offset-relay_{__version__}.dsc"
TOOLS = ("mmdebstrap", "systemd-nspawn", "apt-ftparchive", "gpg", "gpgv", "lintian", "piuparts")


def missing_tools() -> str | None:
    if os.geteuid() != 0:
        return "building in a chroot and piuparts need root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (run tools/install-deps)"
    return None


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where the signing key is made on first use (absent until then)."""
    home = tmp_path_factory.mktemp("apt-signing") / "gnupg"
    yield home
    # The tests' own gpg calls on it started an agent.
    subprocess.run(
        ["gpgconf", "--kill", "gpg-agent"],
        env={**os.environ, "GNUPGHOME": str(home)},
        capture_output=True,
    )


@pytest.fixture(scope="module")
def apt_repo(key_dir: Path) -> Path:
    """``make apt-repo``: the source package, its binary built in a clean chroot, and the
    signed repository of both in dist/apt."""
    reason = missing_tools()
    if reason:
        pytest.skip(reason)
    lock = ROOT / "build" / ".deb.lock"
    lock.parent.mkdir(exist_ok=True)
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        # A repository of this build only: dist/apt keeps what earlier runs published.
        shutil.rmtree(DIST / "apt", ignore_errors=True)
        run_make("apt-repo", timeout=1800, APT_KEY_DIR=str(key_dir))
    return DIST / "apt"


def fields(path: Path) -> dict[str, str]:
    """The fields of a one-paragraph control file (a .dsc), continuation lines joined."""
    text = path.read_text()
    if text.startswith("-----BEGIN PGP SIGNED MESSAGE-----"):
        text = text.split("\n\n", 1)[1].split("\n-----BEGIN PGP SIGNATURE-----", 1)[0]
    return dict(
        (m.group(1), m.group(2).strip())
        for m in re.finditer(r"^([A-Za-z-]+):(.*(?:\n[ \t].*)*)", text, re.MULTILINE)
    )


def deb_paths(deb: Path) -> set[str]:
    listing = subprocess.run(
        ["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True
    ).stdout
    return {line.split()[5] for line in listing.splitlines()}


def signer(signed: Path, armored_key: Path, tmp_path: Path) -> str:
    """The fingerprint that made a valid signature over ``signed`` (clear-signed, or with a
    detached .gpg beside it), checked by gpgv against ``armored_key`` only."""
    keyring = tmp_path / f"{armored_key.stem}.gpg"
    subprocess.run(
        ["gpg", "--batch", "--yes", "--dearmor", "--output", str(keyring), str(armored_key)],
        check=True,
    )
    argv = ["gpgv", "--status-fd", "1", "--keyring", str(keyring), str(signed)]
    if signed.suffix == ".gpg":
        argv.append(str(signed.with_suffix("")))
    result = subprocess.run(argv, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    match = re.search(r"^\[GNUPG:\] VALIDSIG ([0-9A-F]{40}) ", result.stdout, re.MULTILINE)
    assert match, result.stdout
    return match.group(1)


def secret_fingerprints(gnupg_home: Path) -> list[str]:
    out = subprocess.run(
        ["gpg", "--batch", "--homedir", str(gnupg_home), "--list-secret-keys", "--with-colons"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.splitlines()
    return [
        lines[i + 1].split(":")[9]
        for i, line in enumerate(lines[:-1])
        if line.startswith("sec:") and lines[i + 1].startswith("fpr:")
    ]


# --- the source package and its build --------------------------------------------------


def test_source_package_is_made_by_dpkg_source(apt_repo: Path) -> None:
    dsc = fields(DSC)
    assert dsc["Format"] == "3.0 (native)"
    assert (dsc["Source"], dsc["Version"], dsc["Binary"]) == (
        "offset-relay",
        __version__,
        "offset-relay",
    )
    # dpkg-source saw debian/tests/control.
    assert dsc["Testsuite"] == "autopkgtest"
    tarball = f"offset-relay_{__version__}.tar.xz"
    assert dsc["Files"].split()[2] == tarball and (DIST / tarball).is_file()
    listing = subprocess.run(
        ["tar", "-tJf", str(DIST / tarball)], capture_output=True, text=True, check=True
    ).stdout.split()
    top = f"offset-relay-{__version__}/"
    for path in ("debian/control", "debian/tests/control", "debian/tests/smoke", "pyproject.toml"):
        assert top + path in listing, path
    caches = r"\.git|\.venv|build|dist|__pycache__|\.\w+_cache|\.hypothesis"
    assert not [p for p in listing if re.search(rf"/({caches})/", p)]


def test_binary_is_built_from_the_source_in_a_clean_chroot(
    apt_repo: Path, deb_package: Path
) -> None:
    log = (DIST / "chroot" / "build.log").read_text()
    # The chroot had build-essential only: apt installed what Build-Depends names...
    for package in ("debhelper", "dh-python", "pybuild-plugin-pyproject", "python3-setuptools"):
        assert re.search(rf"^Setting up {re.escape(package)} ", log, re.MULTILINE), package
    # ...and the build from the unpacked .dsc went through as the unprivileged user.
    assert "dpkg-source: info: extracting offset-relay in src" in log
    assert "build-in-chroot: building as builder" in log
    assert "dpkg-buildpackage: info: binary-only upload" in log
    changes = fields(DIST / "chroot" / f"offset-relay_{__version__}_amd64.changes")
    assert changes["Binary"] == "offset-relay" and changes["Version"] == __version__
    # The same files as the package built on this machine by `make deb`.
    assert deb_paths(CHROOT_DEB) == deb_paths(deb_package)


def test_lintian_source_and_binary_no_errors_no_warnings(
    apt_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    result = subprocess.run(
        [
            "lintian",
            "--display-info",
            "--pedantic",
            "--display-experimental",
            str(DSC),
            str(CHROOT_DEB),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    tags = [line for line in result.stdout.splitlines() if re.match(r"^[EWIPXO]: ", line)]
    with capsys.disabled():  # the pedantic and informational tags, in every run's output
        print("\nlintian --display-info --pedantic (source and binary):")
        print("\n".join(tags) or "(no tags)")
    assert [t for t in tags if t[0] in "EW"] == []


def test_copyright_is_machine_readable() -> None:
    # python-debian's parser of the copyright format 1.0 (DEP-5), strict about its fields.
    script = """
import sys
from debian.copyright import Copyright, LicenseParagraph
with open(sys.argv[1], encoding="utf-8") as handle:
    c = Copyright(handle, strict=True)
assert c.header.format.startswith("https://www.debian.org/doc/packaging-manuals/copyright-format/1.0")
files = list(c.all_files_paragraphs())
assert files and files[0].files == ("*",), files
named = {p.license.synopsis for p in c.all_paragraphs() if isinstance(p, LicenseParagraph)}
for p in files:
    assert p.copyright and p.license.synopsis in named, p.license.synopsis
print(",".join(sorted(named)))
"""
    result = subprocess.run(
        ["/usr/bin/python3", "-c", script, str(ROOT / "packaging" / "debian" / "copyright")],
        capture_output=True,
        text=True,
    )
    if "No module named 'debian'" in result.stderr:
        pytest.skip("needs python3-debian (run tools/install-deps)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "AGPL-3.0-or-later"


# --- the signed repository -------------------------------------------------------------


def test_apt_repository_is_signed_by_the_key_made_on_first_use(
    apt_repo: Path, key_dir: Path, tmp_path: Path
) -> None:
    (fingerprint,) = secret_fingerprints(key_dir)
    assert oct(key_dir.stat().st_mode & 0o777) == "0o700"
    dists = apt_repo / "dists" / "bookworm"
    public = apt_repo / "offset-relay.asc"
    assert public.read_text().startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert signer(dists / "InRelease", public, tmp_path) == fingerprint
    assert signer(dists / "Release.gpg", public, tmp_path) == fingerprint
    release = (dists / "Release").read_text()
    assert "Codename: bookworm" in release and "SHA256:" in release
    packages = (dists / "main" / "binary-amd64" / "Packages").read_text()
    stanzas = [dict(re.findall(r"^(\S+): (.*)$", block, re.M)) for block in packages.split("\n\n")]
    assert any(
        f.get("Package") == "offset-relay" and f.get("Version") == __version__ for f in stanzas
    ), packages
    deb = re.search(r"^Filename: (\S+)$", packages, re.MULTILINE)
    assert deb and (apt_repo / deb.group(1)).read_bytes() == CHROOT_DEB.read_bytes()
    sources = subprocess.run(
        ["zcat", str(dists / "main" / "source" / "Sources.gz")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    source_stanzas = [dict(re.findall(r"^(\S+): (.*)$", b, re.M)) for b in sources.split("\n\n")]
    assert any(
        f.get("Package") == "offset-relay" and f.get("Format") == "3.0 (native)"
        for f in source_stanzas
    ), sources
    # Only what a web server should publish: no reprepro database, no secret key.
    assert sorted(p.name for p in apt_repo.iterdir()) == ["dists", "offset-relay.asc", "pool"]
    for path in apt_repo.rglob("*"):
        if path.is_file() and path.suffix in (".asc", ".gpg", ""):
            assert b"PRIVATE KEY" not in path.read_bytes(), path


def test_signing_key_is_kept_or_given_by_path(
    apt_repo: Path, key_dir: Path, deb_package: Path, tmp_path: Path
) -> None:
    (fingerprint,) = secret_fingerprints(key_dir)
    # Run again: the key in the directory is used, not replaced.
    again = make_signed_repo(tmp_path / "again", key_dir, deb_package)
    assert secret_fingerprints(key_dir) == [fingerprint]
    inrelease = again / "dists" / "bookworm" / "InRelease"
    assert signer(inrelease, again / "offset-relay.asc", tmp_path) == fingerprint
    # The key given as a file (an operator's exported key), the key directory left alone.
    exported = tmp_path / "signing-key.asc"
    with open(exported, "wb") as handle:
        subprocess.run(
            ["gpg", "--batch", "--homedir", str(key_dir), "--armor", "--export-secret-keys"],
            stdout=handle,
            check=True,
        )
    tool = ROOT / "tools" / "make-apt-repo"
    env = {**os.environ, "APT_SIGNING_KEY": str(exported), "HOME": str(tmp_path / "home")}
    given = subprocess.run(
        [tool, tmp_path / "given", deb_package], env=env, capture_output=True, text=True
    )
    assert given.returncode == 0, given.stderr
    inrelease = tmp_path / "given" / "dists" / "bookworm" / "InRelease"
    assert signer(inrelease, tmp_path / "given" / "offset-relay.asc", tmp_path) == fingerprint
    assert not (tmp_path / "home").exists()
    # A file that holds no key: one clear error, no repository.
    (tmp_path / "nokey.asc").write_text("not a key\n")
    env["APT_SIGNING_KEY"] = str(tmp_path / "nokey.asc")
    bad = subprocess.run(
        [tool, tmp_path / "bad", deb_package], env=env, capture_output=True, text=True
    )
    assert bad.returncode == 1
    assert "make-apt-repo: " in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad" / "dists").exists()


# --- piuparts ----------------------------------------------------------------------------


def test_piuparts_install_purge_and_upgrade_from_the_previous_release(
    apt_repo: Path, previous_deb: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = tmp_path / "piuparts.log"
    result = subprocess.run(
        [ROOT / "tools" / "run-piuparts", CHROOT_DEB, previous_deb, log],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    with capsys.disabled():
        print(f"\npiuparts {CHROOT_DEB.name} (upgrade from {previous_deb.name}):")
        print(result.stdout.strip())
    assert result.returncode == 0, result.stdout + result.stderr + log.read_text()[-6000:]
    assert "PASS: Installation and purging test." in result.stdout
    assert "PASS: Installation, upgrade and purging tests." in result.stdout
    text = log.read_text()
    # The upgrade really was from the previous release, through apt, to this package.
    assert re.search(
        rf"Setting up offset-relay \({re.escape(previous_deb.name.split('_')[1])}\)", text
    )
    assert f"Unpacking offset-relay ({__version__}) over" in text
