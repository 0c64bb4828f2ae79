"""The ``debian-archive:SUITE/PACKAGE[=VERSION]`` source against a tiny fake Debian archive:
a throwaway gpg key signs its InRelease, ``dpkg-deb`` builds its packages, a real HTTP
server on 127.0.0.1 serves it, and ``gpgv`` checks it like apt would."""

from __future__ import annotations

import hashlib
import io
import lzma
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from tests.fakes import Server, http_server
from vm import errors
from vm.kernel import debarchive
from vm.kernel import fetch as fetch_mod
from vm.kernel.fetch import SourceSpec, fetch
from vm.runner import run

pytestmark = pytest.mark.unit

PACKAGE = "linux-source-9.9"
VERSIONS = ("9.9.9-1", "9.9.10-1")  # 9.9.10-1 is the highest (Debian order, not string order)
MAKEFILE = "# SPDX\nVERSION = 9\nPATCHLEVEL = 9\nSUBLEVEL = {sub}\nEXTRAVERSION =\nNAME = Fake\n"
INDEX = "main/binary-all/Packages.xz"


# --- a real HTTP server --------------------------------------------------------

@pytest.fixture
def server() -> Iterator[Server]:
    with http_server() as state:
        yield state


# --- keys, packages and the archive ----------------------------------------------

#: keys are made and used "in 2020": the expired key's one year is over by now
KEY_TIME, SIGN_TIME = "20200101T000000", "20200601T000000"


@dataclass(frozen=True)
class Keys:
    home: Path
    trusted: str   # fingerprint of a key exported to ``keyring``
    other: str     # a key the keyring does not hold
    expired: str   # a key in ``keyring`` that expired at the end of 2020
    keyring: Path

    def gpg(self, *args: object) -> str:
        return run(["gpg", "--batch", "--homedir", self.home, *args], quiet=True).stdout

    def clearsign(self, text: str, *signers: str) -> bytes:
        src, out = self.home / "in.txt", self.home / "out.asc"
        src.write_text(text)
        users = [a for fpr in signers for a in ("--local-user", fpr)]
        self.gpg("--yes", "--faked-system-time", SIGN_TIME, "--pinentry-mode", "loopback",
                 "--passphrase", "", *users, "--clearsign", "--output", out, src)
        return out.read_bytes()


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keys]:
    home = tmp_path_factory.mktemp("gnupg")
    home.chmod(0o700)
    fprs = []
    for who, expiry in (("Fake Archive Key", "never"), ("Someone Else", "never"), ("Old Archive Key", "1y")):
        run(["gpg", "--batch", "--homedir", home, "--faked-system-time", KEY_TIME, "--passphrase", "",
             "--quick-gen-key", f"{who} <{who.split()[0].lower()}@example.org>", "ed25519", "sign", expiry],
            quiet=True)
        listing = run(["gpg", "--batch", "--homedir", home, "--with-colons", "--list-keys", who],
                      quiet=True).stdout
        fprs.append(next(ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr:")))
    keyring = home / "archive-keyring.gpg"
    run(["gpg", "--batch", "--homedir", home, "--output", keyring, "--export", fprs[0], fprs[2]],
        quiet=True)
    try:
        yield Keys(home, fprs[0], fprs[1], fprs[2], keyring)
    finally:
        run(["gpgconf", "--homedir", home, "--kill", "gpg-agent"], quiet=True, check=False)


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes | None = None) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 1_700_000_000
    info.type, info.mode = (tarfile.DIRTYPE, 0o755) if data is None else (tarfile.REGTYPE, 0o644)
    info.size = len(data or b"")
    tf.addfile(info, io.BytesIO(data) if data is not None else None)


def kernel_tarball(sub: str) -> bytes:
    """A tiny kernel-like ``linux-source-9.9.tar.xz`` (Makefile SUBLEVEL ``sub``)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:xz") as tf:
        _tar_add(tf, PACKAGE)
        _tar_add(tf, f"{PACKAGE}/Makefile", MAKEFILE.format(sub=sub).encode())
        _tar_add(tf, f"{PACKAGE}/fs")
        _tar_add(tf, f"{PACKAGE}/fs/overlayfs.c", b"int x;\n")
    return buf.getvalue()


def build_deb(work: Path, version: str, payload: dict[str, bytes]) -> bytes:
    """A real .deb of PACKAGE ``version`` (``dpkg-deb --build``) holding ``payload``."""
    root = work / f"root-{version}"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {PACKAGE}\nVersion: {version}\nArchitecture: all\n"
        "Maintainer: Test <t@example.org>\nDescription: fake kernel source\n")
    for rel, data in payload.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    out = work / f"{PACKAGE}_{version}_all.deb"
    run(["dpkg-deb", "--root-owner-group", "-Zxz", "--build", root, out], quiet=True)
    return out.read_bytes()


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """version -> .deb bytes; version "9.9.X-1" holds a tree whose Makefile says 9.9.X."""
    work = tmp_path_factory.mktemp("debs")
    out = {v: build_deb(work, v, {f"usr/src/{PACKAGE}.tar.xz": kernel_tarball(v.split(".")[2][:-2])})
           for v in VERSIONS}
    out["empty"] = build_deb(work, "1.0-1", {"usr/share/doc/x/README": b"nothing here\n"})
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stanza(version: str, deb: bytes, package: str = PACKAGE) -> str:
    return (f"Package: {package}\nSource: linux\nVersion: {version}\nArchitecture: all\n"
            f"Filename: pool/main/l/linux/{package}_{version}_all.deb\nSize: {len(deb)}\n"
            f"SHA256: {sha(deb)}\nDescription: fake\n")


@dataclass
class Archive:
    """A fake Debian archive under ``/debian`` of ``server`` (call :meth:`publish`)."""

    server: Server
    keys: Keys
    suite: str = "sid"
    debs: dict[str, bytes] = field(default_factory=dict)   # version -> bytes served
    listed: dict[str, bytes] = field(default_factory=dict)  # version -> bytes in Packages
    index: str = INDEX
    by_hash: bool = False

    def __post_init__(self) -> None:
        self.listed = {**self.debs, **self.listed}

    @property
    def mirror(self) -> str:
        return f"{self.server.base}/debian"

    def deb_path(self, version: str) -> str:
        return f"/debian/pool/main/l/linux/{PACKAGE}_{version}_all.deb"

    def packages(self) -> bytes:
        text = stanza("1.0-1", b"x", package="hello") + "\n"
        text += "\n".join(stanza(v, d) for v, d in self.listed.items())
        return lzma.compress(text.encode())

    def release(self, packages: bytes, suite: str | None = None) -> str:
        return (f"Origin: Debian\nSuite: {suite or self.suite}\nCodename: {suite or self.suite}\n"
                f"Acquire-By-Hash: {'yes' if self.by_hash else 'no'}\n"
                "Date: Fri, 30 Oct 2026 08:08:01 UTC\nArchitectures: all amd64\nComponents: main\n"
                f"SHA256:\n {'0' * 64} 12 main/Contents-all\n {sha(packages)} {len(packages)} {self.index}\n")

    def publish(self, *, inrelease: bytes | None = None, packages: bytes | None = None) -> str:
        """Serve everything; ``inrelease``/``packages`` replace what would be served."""
        for version, deb in self.debs.items():
            self.server.files[self.deb_path(version)] = deb
        real = self.packages()
        dists = f"/debian/dists/{self.suite}"
        folder = self.index.rsplit("/", 1)[0]
        served = packages if packages is not None else real
        self.server.files[f"{dists}/{self.index}"] = served
        if self.by_hash:
            self.server.files[f"{dists}/{folder}/by-hash/SHA256/{sha(real)}"] = served
        if inrelease is None:
            inrelease = self.keys.clearsign(self.release(real), self.keys.trusted)
        self.server.files[f"{dists}/InRelease"] = inrelease
        return self.mirror


@pytest.fixture
def archive(server: Server, keys: Keys, debs: dict[str, bytes]) -> Archive:
    return Archive(server, keys, debs={v: debs[v] for v in VERSIONS})


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def get(text: str, archive: Archive, cache: Path) -> fetch_mod.Tree:
    return fetch(SourceSpec.parse(text, "6.12"), cache, debian_mirror=archive.mirror,
                 debian_keyring=archive.keys.keyring, progress=False)


def cache_entries(cache: Path) -> list[str]:
    """Everything in downloads/ and trees/ (the lock file aside), temp files included."""
    return sorted(str(p.relative_to(cache)) for sub in ("downloads", "trees")
                  if (cache / sub).exists() for p in (cache / sub).iterdir())


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text and "; fix: " in text, text
    return text


# --- the happy path --------------------------------------------------------------

def test_fetch_highest_version_then_offline(archive: Archive, cache: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    archive.publish()
    tree = get(f"debian-archive:sid/{PACKAGE}", archive, cache)
    tarball = kernel_tarball("10")
    assert tree.version == "9.9.10" and not tree.in_place
    assert tree.key == sha(tarball)[:16] and tree.path == cache / "trees" / tree.key / PACKAGE
    assert (tree.path / "fs/overlayfs.c").read_text() == "int x;\n"
    assert tree.origin == (f"debian-archive:sid/{PACKAGE}=9.9.10-1 "
                           f"({archive.mirror}/pool/main/l/linux/{PACKAGE}_9.9.10-1_all.deb)")
    entries = cache_entries(cache)  # the tarball, two records (as written, pinned), the tree; no .deb
    assert entries[-1] == f"trees/{tree.key}" and f"downloads/{tree.key}-{PACKAGE}.tar.xz" in entries
    assert len(entries) == 4 and sum(e.startswith("downloads/debarchive-") for e in entries) == 2
    assert (cache / "downloads" / f"{tree.key}-{PACKAGE}.tar.xz").read_bytes() == tarball

    archive.server.files.clear()  # offline from here on
    seen = len(archive.server.log)
    monkeypatch.setattr(fetch_mod, "extract", lambda *a, **k: pytest.fail("re-extracted"))
    assert get(f"debian-archive:sid/{PACKAGE}", archive, cache) == tree
    assert get(f"debian-archive:sid/{PACKAGE}=9.9.10-1", archive, cache) == tree
    monkeypatch.undo()
    fetch_mod.Cache(cache).discard(cache / "trees" / tree.key)
    assert get(f"debian-archive:sid/{PACKAGE}", archive, cache) == tree  # re-extracted, offline
    assert len(archive.server.log) == seen and cache_entries(cache) == entries


def test_pinned_version(archive: Archive, cache: Path) -> None:
    archive.publish()
    tree = get(f"debian-archive:sid/{PACKAGE}=9.9.9-1", archive, cache)
    assert tree.version == "9.9.9" and "=9.9.9-1 " in tree.origin
    assert archive.server.log.count(archive.deb_path("9.9.10-1")) == 0


@pytest.mark.parametrize("extra", ["other", "expired"])
def test_one_good_signature_of_two_is_enough(archive: Archive, keys: Keys, cache: Path, extra: str) -> None:
    """Like sid, signed by several archive keys of which the keyring holds one valid key
    (the other is unknown, or expired): apt accepts that, so do we."""
    real = archive.packages()
    archive.publish(inrelease=keys.clearsign(archive.release(real), getattr(keys, extra), keys.trusted))
    assert get(f"debian-archive:sid/{PACKAGE}", archive, cache).version == "9.9.10"


@pytest.mark.parametrize("served", ["by-hash", "plain"])
def test_acquire_by_hash(archive: Archive, cache: Path, served: str) -> None:
    """With Acquire-By-Hash the index comes from by-hash/SHA256/<sha> (no race with a mirror
    update), and from its plain path when the mirror has no by-hash copy."""
    archive.by_hash = True
    archive.publish()
    plain = f"/debian/dists/sid/{INDEX}"
    if served == "by-hash":
        del archive.server.files[plain]
    else:
        del archive.server.files[next(p for p in archive.server.files if "/by-hash/" in p)]
    assert get(f"debian-archive:sid/{PACKAGE}", archive, cache).version == "9.9.10"


def test_falls_back_to_the_native_architecture_index(archive: Archive, cache: Path) -> None:
    archive.index = debarchive.index_paths()[-1]  # main/binary-amd64/Packages.xz here
    archive.publish()
    assert get(f"debian-archive:sid/{PACKAGE}", archive, cache).version == "9.9.10"


# --- a broken link anywhere: one line, nothing cached ----------------------------

@pytest.mark.parametrize("case", ["other-key", "expired-key", "altered", "unsigned", "garbage-before"])
def test_inrelease_not_signed_by_the_keyring(archive: Archive, keys: Keys, cache: Path, case: str) -> None:
    text = archive.release(archive.packages())
    signed = keys.clearsign(text, keys.trusted)
    inrelease = {
        "other-key": keys.clearsign(text, keys.other),
        "expired-key": keys.clearsign(text, keys.expired),
        "altered": signed.replace(b"Suite: sid", b"Suite: sid-evil"),
        "unsigned": text.encode(),
        "garbage-before": b"Suite: evil\n\n" + signed,
    }[case]
    archive.publish(inrelease=inrelease)
    with pytest.raises(errors.ArchiveSignatureInvalid) as exc:
        get(f"debian-archive:sid/{PACKAGE}", archive, cache)
    assert one_line(exc).startswith(f"InRelease of sid ({archive.mirror}/dists/sid/InRelease) is not "
                                    f"signed by a key in {keys.keyring} (")
    reason = {"other-key": "unknown key", "expired-key": "EXPKEYSIG", "altered": "bad signature",
              "unsigned": "clear-signed", "garbage-before": "clear-signed"}[case]
    assert reason in str(exc.value)
    assert cache_entries(cache) == [] and not any("Packages" in p for p in archive.server.log)


def test_inrelease_of_another_suite(archive: Archive, keys: Keys, cache: Path) -> None:
    """A genuine signature on another suite's InRelease (a replay under this name) is refused."""
    archive.publish(inrelease=keys.clearsign(archive.release(archive.packages(), "stable"), keys.trusted))
    with pytest.raises(errors.ArchiveInconsistent, match="describes stable") as exc:
        get(f"debian-archive:sid/{PACKAGE}", archive, cache)
    one_line(exc)
    assert cache_entries(cache) == []


def test_tampered_packages_index(archive: Archive, debs: dict[str, bytes], cache: Path) -> None:
    """A Packages.xz that is not the one InRelease lists (here: it points at another .deb)."""
    evil = Archive(archive.server, archive.keys, listed={"9.9.10-1": debs["9.9.9-1"]}).packages()
    archive.publish(packages=evil)
    with pytest.raises(errors.ArchiveChecksumMismatch) as exc:
        get(f"debian-archive:sid/{PACKAGE}", archive, cache)
    assert f"the InRelease of sid lists {sha(archive.packages())}" in one_line(exc)
    assert cache_entries(cache) == [] and not any(p.endswith(".deb") for p in archive.server.log)


def test_tampered_deb(archive: Archive, debs: dict[str, bytes], cache: Path) -> None:
    archive.publish()
    archive.server.files[archive.deb_path("9.9.10-1")] = debs["9.9.9-1"]  # a valid .deb, the wrong one
    with pytest.raises(errors.ArchiveChecksumMismatch) as exc:
        get(f"debian-archive:sid/{PACKAGE}", archive, cache)
    text = one_line(exc)
    assert f"{PACKAGE}_9.9.10-1_all.deb from " in text and "the Packages index of sid lists" in text
    assert isinstance(exc.value, errors.ChecksumMismatch)
    assert cache_entries(cache) == []


def test_interrupted_deb_download(archive: Archive, cache: Path) -> None:
    archive.publish()
    archive.server.truncate.add(archive.deb_path("9.9.10-1"))
    with pytest.raises(errors.FetchFailed, match="could not fetch .*_9.9.10-1_all.deb") as exc:
        get(f"debian-archive:sid/{PACKAGE}", archive, cache)
    one_line(exc)
    assert cache_entries(cache) == []
    archive.server.truncate.clear()  # the retry starts clean and succeeds
    assert get(f"debian-archive:sid/{PACKAGE}", archive, cache).version == "9.9.10"


def test_package_not_in_the_suite(archive: Archive, cache: Path) -> None:
    archive.publish()
    with pytest.raises(errors.SourceNotFound) as exc:
        get("debian-archive:sid/linux-source-9.8", archive, cache)
    assert f"package linux-source-9.8 in sid of {archive.mirror} (there: {PACKAGE})" in one_line(exc)
    assert cache_entries(cache) == []


def test_pinned_version_not_in_the_suite(archive: Archive, cache: Path) -> None:
    archive.publish()
    with pytest.raises(errors.SourceNotFound) as exc:
        get(f"debian-archive:sid/{PACKAGE}=9.9.11-1", archive, cache)
    assert "version 9.9.11-1 of linux-source-9.9 in sid" in one_line(exc)
    assert "(there: 9.9.9-1, 9.9.10-1)" in str(exc.value)
    assert cache_entries(cache) == []


def test_deb_without_a_source_tarball(archive: Archive, debs: dict[str, bytes], cache: Path) -> None:
    archive.debs = archive.listed = {"9.9.10-1": debs["empty"]}
    archive.publish()
    with pytest.raises(errors.ArchiveInconsistent, match=rf"no usr/src/{PACKAGE}\.tar\.\*") as exc:
        get(f"debian-archive:sid/{PACKAGE}", archive, cache)
    one_line(exc)
    assert cache_entries(cache) == []


def test_unknown_suite_and_missing_keyring(archive: Archive, cache: Path, tmp_path: Path) -> None:
    archive.publish()
    with pytest.raises(errors.SourceNotFound, match="suite bookworm-nope on") as exc:
        get(f"debian-archive:bookworm-nope/{PACKAGE}", archive, cache)
    one_line(exc)
    with pytest.raises(errors.MissingTool, match="debian-archive-keyring"):
        fetch(SourceSpec.parse(f"debian-archive:sid/{PACKAGE}", "6.12"), cache,
              debian_mirror=archive.mirror, debian_keyring=tmp_path / "none.gpg", progress=False)
    assert cache_entries(cache) == []


# --- pieces ----------------------------------------------------------------------

def test_parse_the_source_form() -> None:
    parse = lambda text: SourceSpec.parse(text, "6.12")  # noqa: E731
    assert parse("debian-archive:sid/linux-source-7.2") == SourceSpec("debian-archive",
                                                                     "sid/linux-source-7.2")
    assert parse("debian-archive:trixie-backports/linux-source-7.2=7.2.13-1~bpo13+1") == SourceSpec(
        "debian-archive", "trixie-backports/linux-source-7.2", "7.2.13-1~bpo13+1")
    assert parse("debian") == SourceSpec("debian", "6.12")  # the installed package, unchanged
    for bad in ("debian-archive:", "debian-archive:sid", "debian-archive:sid/", "debian-archive:/x",
                "debian-archive:sid/Linux", "debian-archive:sid/a/b", "debian-archive:../x/y",
                "debian-archive:sid/linux-source-7.2="):
        with pytest.raises(errors.BadArgument, match="debian-archive:SUITE/PACKAGE"):
            parse(bad)


PAIRS = [("1.0", "1.0-1"), ("1.0~rc1", "1.0"), ("1:0.1", "2.0"), ("7.2.13-1", "7.2.9-3"),
         ("1.0a", "1.0+"), ("7.2.13-1~bpo13+1", "7.2.13-1"), ("2.0", "2.0"), ("1.0.0", "1.0"),
         ("1.0-1", "1.0-1.1"), ("1.0~~", "1.0~"), ("1.01", "1.1"), ("9.9.10-1", "9.9.9-1")]


def test_version_order_matches_dpkg() -> None:
    for a, b in PAIRS:
        ours = debarchive.compare_versions(a, b)
        for op, want in (("lt", ours < 0), ("eq", ours == 0), ("gt", ours > 0)):
            dpkg = run(["dpkg", "--compare-versions", a, op, b], quiet=True, check=False)
            assert dpkg.ok == want, (a, op, b)


def test_extract_refuses_a_non_deb(tmp_path: Path) -> None:
    bogus = tmp_path / "x.deb"
    bogus.write_bytes(b"!<arch>\ndebian-binary   0           0     0     100644  4         `\n2.0\n")
    with pytest.raises(ValueError, match="no data.tar member"):
        debarchive.extract_source_tarball(bogus, PACKAGE, tmp_path / "out")
    bogus.write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="not an ar archive"):
        debarchive.extract_source_tarball(bogus, PACKAGE, tmp_path / "out")

