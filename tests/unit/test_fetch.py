"""Unit tests for vm.kernel.fetch against a real local HTTP server and small synthetic trees."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.fakes import Server, http_server
from vm import errors
from vm.kernel import fetch as fetch_mod
from vm.kernel.fetch import SourceSpec, Tree, fetch
from vm.runner import run

pytestmark = pytest.mark.unit

MAKEFILE = "# SPDX\nVERSION = 6\nPATCHLEVEL = 12\nSUBLEVEL = {sub}\nEXTRAVERSION =\nNAME = Baby Opossum\n"


# --- helpers -----------------------------------------------------------------

def _add(tf: tarfile.TarFile, name: str, data: bytes | None = None, **attrs: object) -> None:
    info = tarfile.TarInfo(name)
    info.mtime = 1_700_000_000
    if data is None and "type" not in attrs:
        info.type, info.mode = tarfile.DIRTYPE, 0o755
    else:
        info.mode = 0o644
    for key, value in attrs.items():
        setattr(info, key, value)
    info.size = len(data) if data is not None else 0
    tf.addfile(info, io.BytesIO(data) if data is not None else None)


def kernel_tarball(path: Path, top: str = "linux-6.12.1", sub: str = "1",
                   extra: Callable[[tarfile.TarFile], None] | None = None) -> Path:
    """A tiny kernel-like tarball (compression from the suffix); ``extra`` adds members."""
    mode = {".xz": "w:xz", ".gz": "w:gz", ".bz2": "w:bz2", ".tgz": "w:gz"}[path.suffix]
    with tarfile.open(path, mode) as tf:
        _add(tf, top)
        _add(tf, f"{top}/Makefile", MAKEFILE.format(sub=sub).encode())
        _add(tf, f"{top}/scripts")
        _add(tf, f"{top}/scripts/run.sh", b"#!/bin/sh\necho hi\n", mode=0o755)
        _add(tf, f"{top}/fs")
        _add(tf, f"{top}/fs/overlayfs.c", b"int x;\n" * 100)
        _add(tf, f"{top}/fs/link.c", type=tarfile.SYMTYPE, linkname="overlayfs.c")
        if extra:
            extra(tf)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cache_entries(cache: Path) -> list[str]:
    """Everything in downloads/ and trees/ (lock file aside)."""
    return sorted(str(p.relative_to(cache)) for sub in ("downloads", "trees")
                  if (cache / sub).exists() for p in (cache / sub).iterdir())


def snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_mtime_ns, st.st_mode,
                                         p.read_bytes() if p.is_file() and not p.is_symlink() else b"")
    return out


@pytest.fixture
def server() -> Iterator[Server]:
    with http_server() as state:
        yield state


def publish_release(server: Server, tarball: Path, version: str = "6.12.1",
                    listed_sha: str | None = None) -> str:
    """Serve ``tarball`` kernel.org style under /pub; return the mirror URL."""
    name = f"linux-{version}.tar.xz"
    server.files[f"/pub/v6.x/{name}"] = tarball.read_bytes()
    digest = listed_sha or sha256(tarball)
    server.files["/pub/v6.x/sha256sums.asc"] = (
        "-----BEGIN PGP SIGNED MESSAGE-----\nHash: SHA256\n\n"
        f"{'0' * 64}  linux-6.11.tar.xz\n{digest}  {name}\n{'1' * 64}  patch-{version}.xz\n"
        "-----BEGIN PGP SIGNATURE-----\n\nabc\n-----END PGP SIGNATURE-----\n").encode()
    return f"{server.base}/pub"


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def parse(text: str) -> SourceSpec:
    return SourceSpec.parse(text, "6.12")


# --- kernel.org over HTTP ----------------------------------------------------

def test_kernelorg_download_extract_and_reuse(tmp_path: Path, server: Server, cache: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = kernel_tarball(tmp_path / "src.tar.xz")
    mirror = publish_release(server, tarball)
    tree = fetch(parse("kernel.org:6.12.1"), cache, kernelorg_mirror=mirror, progress=False)
    assert tree.version == "6.12.1" and not tree.in_place
    assert tree.key == sha256(tarball)[:16]
    assert tree.path == cache / "trees" / tree.key / "linux-6.12.1"
    assert (tree.path / "Makefile").is_file() and os.access(tree.path / "scripts/run.sh", os.X_OK)
    assert os.readlink(tree.path / "fs/link.c") == "overlayfs.c"
    assert tree.origin == f"kernel.org:{mirror}/v6.x/linux-6.12.1.tar.xz"
    assert server.count("/pub/v6.x/linux-6.12.1.tar.xz") == 1

    monkeypatch.setattr(fetch_mod, "extract", lambda *a, **k: pytest.fail("re-extracted"))
    again = fetch(parse("kernel.org:6.12.1"), cache, kernelorg_mirror=mirror, progress=False)
    assert again == tree
    assert server.count("/pub/v6.x/linux-6.12.1.tar.xz") == 1
    entries = cache_entries(cache)
    assert entries[0] == f"downloads/{tree.key}-linux-6.12.1.tar.xz" and entries[-1] == f"trees/{tree.key}"
    assert len(entries) == 3 and entries[1].startswith("downloads/url-")  # the verified sha record


def test_kernelorg_reextracts_from_cached_download_offline(tmp_path: Path, server: Server,
                                                           cache: Path) -> None:
    mirror = publish_release(server, kernel_tarball(tmp_path / "src.tar.xz"))
    tree = fetch(parse("kernel.org:6.12.1"), cache, kernelorg_mirror=mirror, progress=False)
    fetch_mod.Cache(cache).discard(cache / "trees" / tree.key)
    server.files.clear()
    requests_before = len(server.log)
    assert fetch(parse("kernel.org:6.12.1"), cache, kernelorg_mirror=mirror, progress=False) == tree
    assert len(server.log) == requests_before


def test_kernelorg_progress_on_stderr(tmp_path: Path, server: Server, cache: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    mirror = publish_release(server, kernel_tarball(tmp_path / "src.tar.xz"))
    fetch(parse("kernel.org:6.12.1"), cache, kernelorg_mirror=mirror, progress=True)
    err = capsys.readouterr().err
    assert "linux-6.12.1.tar.xz:" in err and "MB in" in err


def test_kernelorg_checksum_mismatch_keeps_nothing(tmp_path: Path, server: Server, cache: Path) -> None:
    mirror = publish_release(server, kernel_tarball(tmp_path / "src.tar.xz"), listed_sha="ab" * 32)
    with pytest.raises(errors.ChecksumMismatch) as exc:
        fetch(parse("kernel.org:6.12.1"), cache, kernelorg_mirror=mirror, progress=False)
    assert "abab" in str(exc.value) and "\n" not in str(exc.value)
    assert cache_entries(cache) == []


def test_kernelorg_truncated_download_keeps_nothing(tmp_path: Path, server: Server, cache: Path) -> None:
    mirror = publish_release(server, kernel_tarball(tmp_path / "src.tar.xz"))
    server.truncate.add("/pub/v6.x/linux-6.12.1.tar.xz")
    with pytest.raises(errors.FetchFailed) as exc:
        fetch(parse("kernel.org:6.12.1"), cache, kernelorg_mirror=mirror, progress=False)
    assert "\n" not in str(exc.value)
    assert cache_entries(cache) == []


def test_kernelorg_unknown_version(tmp_path: Path, server: Server, cache: Path) -> None:
    mirror = publish_release(server, kernel_tarball(tmp_path / "src.tar.xz"))
    with pytest.raises(errors.SourceNotFound, match="linux-6.12.99.tar.xz"):
        fetch(parse("kernel.org:6.12.99"), cache, kernelorg_mirror=mirror, progress=False)
    assert cache_entries(cache) == []


def test_kernelorg_unreachable_mirror(cache: Path) -> None:
    with pytest.raises(errors.FetchFailed):
        fetch(parse("kernel.org:6.12.1"), cache, kernelorg_mirror="http://127.0.0.1:9/pub", progress=False)


# --- tarball URLs and local tarballs -----------------------------------------

def test_tarball_url_pinned_and_unpinned_reuse(tmp_path: Path, server: Server, cache: Path) -> None:
    tarball = kernel_tarball(tmp_path / "k.tar.gz")
    server.files["/k.tar.gz"] = tarball.read_bytes()
    url = f"{server.base}/k.tar.gz"
    tree = fetch(parse(url), cache, progress=False)
    assert tree.version == "6.12.1" and tree.key == sha256(tarball)[:16]
    assert fetch(parse(url), cache, progress=False) == tree
    assert fetch(parse(f"tarball:{url}#sha256={sha256(tarball)}"), cache, progress=False).path == tree.path
    assert server.count("/k.tar.gz") == 1


def test_tarball_url_wrong_pin(tmp_path: Path, server: Server, cache: Path) -> None:
    server.files["/k.tar.xz"] = kernel_tarball(tmp_path / "k.tar.xz").read_bytes()
    with pytest.raises(errors.ChecksumMismatch):
        fetch(parse(f"tarball:{server.base}/k.tar.xz#sha256={'c' * 64}"), cache, progress=False)
    assert cache_entries(cache) == []


def test_tarball_url_corrupt_keeps_nothing(server: Server, cache: Path) -> None:
    server.files["/k.tar.xz"] = os.urandom(10_000)
    with pytest.raises(errors.CorruptTarball):
        fetch(parse(f"{server.base}/k.tar.xz"), cache, progress=False)
    assert cache_entries(cache) == []


def test_tarball_url_404(server: Server, cache: Path) -> None:
    with pytest.raises(errors.SourceNotFound, match="HTTP 404"):
        fetch(parse(f"{server.base}/missing.tar.xz"), cache, progress=False)
    assert cache_entries(cache) == []


@pytest.mark.parametrize("suffix", [".tar.xz", ".tar.gz", ".tar.bz2", ".tgz"])
def test_local_tarball(tmp_path: Path, cache: Path, suffix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = kernel_tarball(tmp_path / f"linux{suffix}", sub="7")
    tree = fetch(parse(str(tarball)), cache, progress=False)
    assert (tree.version, tree.origin) == ("6.12.7", f"tarball:{tarball}")
    monkeypatch.setattr(fetch_mod, "extract", lambda *a, **k: pytest.fail("re-extracted"))
    assert fetch(parse(f"tarball:{tarball}#sha256={sha256(tarball)}"), cache, progress=False) == tree
    assert cache_entries(cache) == [f"trees/{tree.key}"]


def test_local_tarball_wrong_pin_and_missing(tmp_path: Path, cache: Path) -> None:
    tarball = kernel_tarball(tmp_path / "linux.tar.xz")
    with pytest.raises(errors.ChecksumMismatch):
        fetch(parse(f"tarball:{tarball}#sha256={'d' * 64}"), cache, progress=False)
    with pytest.raises(errors.SourceNotFound):
        fetch(parse(f"tarball:{tmp_path / 'nope.tar.xz'}"), cache, progress=False)
    assert cache_entries(cache) == []


# --- unsafe and corrupt archives ---------------------------------------------

UNSAFE: dict[str, Callable[[tarfile.TarFile], None]] = {
    "dotdot": lambda tf: _add(tf, "../evil", b"x"),
    "dotdot-inside": lambda tf: _add(tf, "linux-6.12.1/../../evil", b"x"),
    "absolute": lambda tf: _add(tf, "/tmp/ovl-harness-evil-abs", b"x"),
    "symlink-out": lambda tf: _add(tf, "linux-6.12.1/out", type=tarfile.SYMTYPE, linkname="../../evil"),
    "symlink-abs": lambda tf: _add(tf, "linux-6.12.1/etc", type=tarfile.SYMTYPE, linkname="/etc"),
    "hardlink-out": lambda tf: _add(tf, "linux-6.12.1/hl", type=tarfile.LNKTYPE, linkname="../evil"),
    "device": lambda tf: _add(tf, "linux-6.12.1/null", type=tarfile.CHRTYPE, devmajor=1, devminor=3),
    "fifo": lambda tf: _add(tf, "linux-6.12.1/fifo", type=tarfile.FIFOTYPE),
}


@pytest.mark.parametrize("case", sorted(UNSAFE))
def test_unsafe_archive(tmp_path: Path, cache: Path, case: str) -> None:
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    tarball = kernel_tarball(work / "evil.tar.xz", extra=UNSAFE[case])
    with pytest.raises(errors.UnsafeArchive) as exc:
        fetch(parse(str(tarball)), cache, progress=False)
    assert "\n" not in str(exc.value) and "unsafe member" in str(exc.value)
    assert cache_entries(cache) == []
    assert not list(tmp_path.rglob("evil")) and not Path("/tmp/ovl-harness-evil-abs").exists()


def test_corrupt_random_bytes(tmp_path: Path, cache: Path) -> None:
    bogus = tmp_path / "linux.tar.xz"
    bogus.write_bytes(os.urandom(4096))
    with pytest.raises(errors.CorruptTarball):
        fetch(parse(str(bogus)), cache, progress=False)
    assert cache_entries(cache) == []


@pytest.mark.parametrize("suffix", [".tar.xz", ".tar.gz", ".tar.bz2"])
def test_corrupt_truncated(tmp_path: Path, cache: Path, suffix: str) -> None:
    big = lambda tf: _add(tf, "linux-6.12.1/blob", os.urandom(200_000))  # noqa: E731
    good = kernel_tarball(tmp_path / f"good{suffix}", extra=big).read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(good[: len(good) * 2 // 3])
    with pytest.raises(errors.CorruptTarball):
        fetch(parse(str(cut)), cache, progress=False)
    assert cache_entries(cache) == []


def test_not_a_kernel_tree(tmp_path: Path, cache: Path) -> None:
    tarball = tmp_path / "x.tar.gz"
    with tarfile.open(tarball, "w:gz") as tf:
        _add(tf, "proj")
        _add(tf, "proj/Makefile", b"all:\n\techo\n")
    with pytest.raises(errors.CorruptTarball, match="not a kernel tree"):
        fetch(parse(str(tarball)), cache, progress=False)
    assert cache_entries(cache) == []


def test_two_top_level_dirs(tmp_path: Path, cache: Path) -> None:
    tarball = kernel_tarball(tmp_path / "x.tar.xz", extra=lambda tf: _add(tf, "other"))
    with pytest.raises(errors.CorruptTarball, match="one top-level directory"):
        fetch(parse(str(tarball)), cache, progress=False)
    assert cache_entries(cache) == []


def test_interrupted_extraction_leaves_nothing(tmp_path: Path, cache: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    tarball = kernel_tarball(tmp_path / "linux.tar.xz")
    real = fetch_mod.extract

    def interrupted(tb: Path, dest: Path, **kw: object) -> Path:
        real(tb, dest, progress=False)
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch_mod, "extract", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch(parse(str(tarball)), cache, progress=False)
    assert cache_entries(cache) == []


def test_stale_temp_and_broken_entries_are_cleaned(tmp_path: Path, cache: Path) -> None:
    tarball = kernel_tarball(tmp_path / "linux.tar.xz")
    key = sha256(tarball)[:16]
    (cache / "trees" / ".tmp-dead" / "linux-6.12.1").mkdir(parents=True)
    (cache / "trees" / key).mkdir()  # a broken entry (never published by us)
    (cache / "downloads").mkdir()
    (cache / "downloads" / ".part-dead").write_bytes(b"half")
    tree = fetch(parse(str(tarball)), cache, progress=False)
    assert tree.key == key and tree.version == "6.12.1"
    assert cache_entries(cache) == [f"trees/{key}"]


# --- debian ------------------------------------------------------------------

def test_debian_package_tarball(tmp_path: Path, cache: Path) -> None:
    src = tmp_path / "usr-src"
    src.mkdir()
    tarball = kernel_tarball(src / "linux-source-6.12.tar.xz", top="linux-source-6.12", sub="117")
    tree = fetch(parse("debian"), cache, debian_src_dir=src, progress=False)
    assert tree.version == "6.12.117" and tree.path.name == "linux-source-6.12"
    assert tree.origin == f"debian:{tarball}" and tree.key == sha256(tarball)[:16]
    assert fetch(parse("debian:6.12"), cache, debian_src_dir=src, progress=False) == tree


def test_debian_missing_package(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(errors.SourceNotFound, match=r"apt-get install linux-source-6\.13"):
        fetch(parse("debian:6.13"), cache, debian_src_dir=tmp_path, progress=False)


# --- tree in place -----------------------------------------------------------

def make_tree(root: Path, sub: str = "3") -> Path:
    (root / "fs").mkdir(parents=True)
    (root / "Makefile").write_text(MAKEFILE.format(sub=sub))
    (root / "fs" / "inode.c").write_text("int i;\n")
    return root


def test_tree_in_place(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "linux")
    before = snapshot(root)
    tree = fetch(parse(f"tree:{root}"), tmp_path / "cache", progress=False)
    assert tree == Tree(root, tree.key, "6.12.3", f"tree:{root}", True)
    assert len(tree.key) == 16 and snapshot(root) == before
    assert not (tmp_path / "cache").exists()
    assert fetch(parse(str(root)), tmp_path / "cache").key == tree.key

    (root / "fs" / "inode.c").write_text("int i, j;\n")
    changed = fetch(parse(f"tree:{root}"), tmp_path / "cache").key
    assert changed != tree.key
    os.utime(root / "fs" / "inode.c", ns=(1, 1))
    assert fetch(parse(f"tree:{root}"), tmp_path / "cache").key not in (tree.key, changed)


def test_tree_ignores_dot_git_but_uses_head(tmp_path: Path) -> None:
    root = make_tree(tmp_path / "linux")
    plain = fetch_mod.tree_fingerprint(root)
    git_init_commit(root)
    with_git = fetch_mod.tree_fingerprint(root)
    assert with_git != plain
    (root / ".git" / "junk").write_text("x")
    assert fetch_mod.tree_fingerprint(root) == with_git


def test_tree_errors(tmp_path: Path) -> None:
    with pytest.raises(errors.SourceNotFound):
        fetch(parse(f"tree:{tmp_path / 'nope'}"), tmp_path / "cache")
    (tmp_path / "empty").mkdir()
    with pytest.raises(errors.SourceNotFound, match="VERSION"):
        fetch(parse(f"tree:{tmp_path / 'empty'}"), tmp_path / "cache")


# --- git ---------------------------------------------------------------------

GIT_ID = ["-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "commit.gpgsign=false"]


def git(repo: Path, *args: str) -> str:
    return run(["git", "-C", repo, *GIT_ID, *args], quiet=True).stdout.strip()


def git_init_commit(repo: Path) -> str:
    run(["git", "init", "-q", "-b", "main", repo], quiet=True)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")
    return git(repo, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> tuple[str, str, str]:
    """A kernel-like repo: tag v6.12.1 on the first commit, main one commit later."""
    path = make_tree(tmp_path / "repo", sub="1")
    first = git_init_commit(path)
    git(path, "tag", "-a", "v6.12.1", "-m", "v6.12.1")
    (path / "Makefile").write_text(MAKEFILE.format(sub="2"))
    git(path, "commit", "-q", "-am", "bump")
    return f"file://{path}", first, git(path, "rev-parse", "HEAD")


def test_git_tag_branch_and_commit(repo: tuple[str, str, str], cache: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    url, first, second = repo
    tagged = fetch(parse(f"git:{url}@v6.12.1"), cache, progress=False)
    assert tagged.version == "6.12.1" and first[:12] in tagged.origin
    assert git(tagged.path, "rev-parse", "HEAD") == first
    main = fetch(parse(f"git:{url}@main"), cache, progress=False)
    assert main.version == "6.12.2" and main.key != tagged.key

    monkeypatch.setattr(fetch_mod, "_git_checkout", lambda *a: pytest.fail("fetched again"))
    assert fetch(parse(f"git:{url}@{first}"), cache, progress=False).key == tagged.key
    assert fetch(parse(f"git:{url}@v6.12.1"), cache, progress=False) == tagged
    assert fetch(parse(f"git:{url}"), cache, progress=False).key == main.key  # HEAD


@pytest.mark.parametrize("short", [False, True])
def test_git_commit_needs_full_fetch(repo: tuple[str, str, str], cache: Path, short: bool,
                                     monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    url, first, _ = repo
    # Protocol v0 refuses a depth-1 fetch of a commit that is not a ref tip
    # (and no server accepts an abbreviated id).
    monkeypatch.setenv("GIT_CONFIG_COUNT", "1")
    monkeypatch.setenv("GIT_CONFIG_KEY_0", "protocol.version")
    monkeypatch.setenv("GIT_CONFIG_VALUE_0", "0")
    tree = fetch(parse(f"git:{url}@{first[:10] if short else first}"), cache, progress=False)
    assert "refused a depth-1 fetch" in capsys.readouterr().err
    assert tree.version == "6.12.1" and git(tree.path, "rev-parse", "HEAD") == first
    assert cache_entries(cache) == [f"trees/{tree.key}"]


def test_git_bad_ref_and_url(repo: tuple[str, str, str], tmp_path: Path, cache: Path) -> None:
    url, _, _ = repo
    with pytest.raises(errors.SourceNotFound):
        fetch(parse(f"git:{url}@no-such-branch"), cache, progress=False)
    with pytest.raises(errors.SourceNotFound):
        fetch(parse(f"git:{url}@{'e' * 40}"), cache, progress=False)
    with pytest.raises(errors.FetchFailed):
        fetch(parse(f"git:file://{tmp_path}/nope.git@main"), cache, progress=False)
    assert cache_entries(cache) == []


# --- SourceSpec.parse --------------------------------------------------------

def test_parse_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    tarball = kernel_tarball(tmp_path / "linux.tar.xz")
    (tmp_path / "src").mkdir()
    sha = "AB" * 32
    cases = {
        "debian": SourceSpec("debian", "6.12"),
        "": SourceSpec("debian", "6.12"),
        "debian:6.11": SourceSpec("debian", "6.11"),
        "kernel.org:6.12.117": SourceSpec("kernelorg", "6.12.117"),
        "kernel.org:6.13": SourceSpec("kernelorg", "6.13"),
        f"tarball:linux.tar.xz#sha256={sha}": SourceSpec("tarball", str(tarball), None, sha.lower()),
        "tarball:https://h/x/linux-6.12.tar.gz": SourceSpec("tarball", "https://h/x/linux-6.12.tar.gz"),
        f"tarball:file://{tarball}": SourceSpec("tarball", str(tarball)),
        str(tarball): SourceSpec("tarball", str(tarball)),
        "linux.tar.xz": SourceSpec("tarball", str(tarball)),
        "https://h/linux-6.12.tgz": SourceSpec("tarball", "https://h/linux-6.12.tgz"),
        "git:https://h/linux.git@v6.12": SourceSpec("git", "https://h/linux.git", "v6.12"),
        "git:https://h/linux.git": SourceSpec("git", "https://h/linux.git"),
        "git:git@github.com:t/linux.git": SourceSpec("git", "git@github.com:t/linux.git"),
        "git:git@github.com:t/linux.git@feature/x":
            SourceSpec("git", "git@github.com:t/linux.git", "feature/x"),
        "git:https://u@h/linux.git": SourceSpec("git", "https://u@h/linux.git"),
        "https://h/linux.git": SourceSpec("git", "https://h/linux.git"),
        "https://h/linux.git@abc1234": SourceSpec("git", "https://h/linux.git", "abc1234"),
        "tree:src": SourceSpec("tree", str(tmp_path / "src")),
        str(tmp_path / "src"): SourceSpec("tree", str(tmp_path / "src")),
    }
    for text, expected in cases.items():
        assert SourceSpec.parse(text, "6.12") == expected, text


@pytest.mark.parametrize("text", ["kernel.org", "kernel.org:6", "debian:six", "nonsense", "svn:x",
                                  "tree:", "git:", "tarball:x.tar.xz#sha256=12", "tarball:x.tar.xz#md5=1",
                                  "git:https://h/l.git@--upload-pack=x", "git:-x"])
def test_parse_rejects(text: str) -> None:
    with pytest.raises(errors.BadArgument) as exc:
        SourceSpec.parse(text, "6.12")
    assert "fix:" in str(exc.value) and "\n" not in str(exc.value)


def test_parse_kernelorg_alone_asks_for_version() -> None:
    with pytest.raises(errors.BadArgument, match="full release version"):
        SourceSpec.parse("kernel.org", "6.12")
