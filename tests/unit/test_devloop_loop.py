"""`invoke retest` (vm/devloop/loop.py, loopguest.py, vm/machine/modreload.py) without a VM.

decide() is a pure function of what the loop guest runs, what was built and
whether the guest is alive; the module reload runs against a fake guest that
models mounts, the bind mount and the loaded module's build id, so a wrong
order (rmmod before the overlays are unmounted, modprobe before the bind
mount) or a module that is not the new one fails here.
"""

import shlex
import struct
from pathlib import Path

import pytest

from tests.fakes import FakeConnection
from vm import errors
from vm.devloop import loop, loopguest, trees
from vm.kernel import incremental
from vm.kernel.incremental import Artifacts
from vm.machine import modreload

pytestmark = pytest.mark.unit

A = Artifacts(builtin="k1", overlay="o1")


# --- decide ----------------------------------------------------------------------------

@pytest.mark.parametrize("before, after, alive, path", [
    (A, A, False, loop.BOOT),
    (None, A, False, loop.BOOT),
    (A, Artifacts("k2", "o1"), True, loop.REBOOT),
    (A, Artifacts("k2", "o2"), True, loop.REBOOT),        # both changed: the module needs the new kernel
    (A, Artifacts("k1", "o2"), True, loop.RELOAD),
    (A, Artifacts("k1", "o1", bzimage="other"), True, loop.UNCHANGED),   # bzImage bytes alone do not count
    (A, A, True, loop.UNCHANGED),
    (None, A, True, loop.REBOOT),                          # alive, but what it runs is unknown
    (A, Artifacts("", "o1"), True, loop.REBOOT),           # nothing to compare: never trust it
])
def test_decide(before, after, alive, path):
    decision = loop.decide(before, after, alive)
    assert decision.path == path
    assert decision.why


def test_decide_says_why():
    assert "overlay.ko" in loop.decide(A, Artifacts("k1", "o2"), True).why
    assert "built-in" in loop.decide(A, Artifacts("k2", "o1"), True).why


# --- artifacts ---------------------------------------------------------------------------

def test_artifacts_fingerprint_vmlinux_o_and_the_module(tmp_path):
    obj = tmp_path / "obj"
    (obj / "fs/overlayfs").mkdir(parents=True)
    (obj / "arch/x86/boot").mkdir(parents=True)
    (obj / "vmlinux.o").write_bytes(b"builtin")
    (obj / "fs/overlayfs/overlay.ko").write_bytes(b"module")
    (obj / "arch/x86/boot/bzImage").write_bytes(b"boot")
    first = incremental.artifacts(obj)
    assert first.builtin and first.overlay and first.bzimage
    (obj / "fs/overlayfs/overlay.ko").write_bytes(b"module 2")
    second = incremental.artifacts(obj)
    assert (second.builtin, second.bzimage) == (first.builtin, first.bzimage) and second.overlay != first.overlay
    assert Artifacts.from_dict(second.to_dict()) == second
    assert incremental.artifacts(tmp_path / "empty") == Artifacts("", "", "")


# --- a module file ---------------------------------------------------------------------------

def make_elf(sections: dict[str, bytes]) -> bytes:
    """A minimal little-endian ELF64 file with these sections (enough for elf_section)."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in [*sections, ".shstrtab"])
    body, offsets = b"", []
    for data in [*sections.values(), names]:
        offsets.append(64 + len(body))
        body += data
    shoff = 64 + len(body)
    header = (b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
              + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(sections) + 2,
                            len(sections) + 1))
    shdrs = bytes(64)
    name_off = 1
    for (name, data), off in zip([*sections.items(), (".shstrtab", names)], offsets):
        shdrs += struct.pack("<IIQQQQIIQQ", name_off, 7, 0, 0, off, len(data), 0, 0, 4, 0)
        name_off += len(name) + 1
    return header + body + shdrs


def build_id(tag: bytes) -> bytes:
    return struct.pack("<III", 4, 20, 3) + b"GNU\0" + (tag * 20)[:20]


def test_elf_section_and_build_id_note():
    ko = make_elf({".text": b"\x90" * 7, ".note.gnu.build-id": build_id(b"a")})
    assert modreload.elf_section(ko, ".text") == b"\x90" * 7
    assert modreload.build_id_note(ko) == build_id(b"a").hex()
    assert modreload.elf_section(b"not an elf", ".text") is None
    with pytest.raises(errors.BadArgument, match="build-id"):
        modreload.build_id_note(make_elf({".text": b"x"}))


# --- the reload, on a fake guest -------------------------------------------------------------

KO_PATH = "/lib/modules/7.2.13+/kernel/fs/overlayfs/overlay.ko"


class FakeGuestModules:
    """The state the reload changes: overlay mounts, the bind mount, the loaded module."""

    def __init__(self, loaded: bytes | None, disk_note: bytes, mounts: int = 2, busy: bool = False,
                 bind_works: bool = True) -> None:
        self.loaded, self.disk_note = loaded, disk_note
        self.mounts, self.busy, self.bind_works = mounts, busy, bind_works
        self.bound = False
        self.log: list[str] = []
        self.conn = FakeConnection({
            modreload.UNMOUNT_OVERLAYS: self.unmount, "modinfo -n overlay": lambda _: KO_PATH + "\n",
            "sh -c 'while grep": self.unbind, modreload.READ_NOTE: self.note,
            "test -d /sys/module/overlay": lambda _: 0 if self.loaded else 1,
            "rmmod overlay": self.rmmod, "mount --bind": self.bind, "modprobe overlay": self.modprobe,
            "mkdir -p": lambda _: 0,
        }, strict=True)

    def unmount(self, _):
        self.log.append("umount")
        if self.busy:
            return 32
        self.mounts = 0

    def unbind(self, line):
        assert shlex.split(line)[-1] == KO_PATH
        self.bound = False

    def note(self, _):
        return self.loaded.hex() if self.loaded else ""

    def rmmod(self, _):
        self.log.append("rmmod")
        if self.mounts:
            return 1            # in use: a mounted overlay pins the module
        self.loaded = None

    def bind(self, line):
        self.log.append("bind")
        assert shlex.split(line)[-2:] == [modreload.REMOTE_KO, KO_PATH]
        assert modreload.REMOTE_KO in self.conn.blobs, "bound before the module was copied in"
        self.bound = self.bind_works

    def modprobe(self, _):
        self.log.append("modprobe")
        if self.loaded:
            return 0            # already loaded: modprobe does nothing
        new = modreload.elf_section(self.conn.blobs[modreload.REMOTE_KO], ".note.gnu.build-id")
        self.loaded = new if self.bound else self.disk_note


def test_reload_swaps_in_the_new_module():
    old, new = build_id(b"o"), build_id(b"n")
    guest = FakeGuestModules(loaded=old, disk_note=old)
    ko = make_elf({".note.gnu.build-id": new})
    done = modreload.reload_overlay(guest.conn, ko)
    assert guest.log == ["umount", "rmmod", "bind", "modprobe"]
    assert guest.conn.blobs[modreload.REMOTE_KO] == ko
    assert (done.path, done.before, done.after) == (KO_PATH, old.hex(), new.hex())
    assert guest.loaded == new and guest.mounts == 0


def test_reload_when_the_module_was_not_loaded():
    guest = FakeGuestModules(loaded=None, disk_note=build_id(b"o"), mounts=0)
    done = modreload.reload_overlay(guest.conn, make_elf({".note.gnu.build-id": build_id(b"n")}))
    assert guest.log == ["umount", "bind", "modprobe"] and done.before == ""


def test_reload_fails_when_the_old_module_stays_loaded():
    old = build_id(b"o")
    guest = FakeGuestModules(loaded=old, disk_note=old, bind_works=False)
    with pytest.raises(errors.ModuleReloadFailed, match="build id"):
        modreload.reload_overlay(guest.conn, make_elf({".note.gnu.build-id": build_id(b"n")}))


def test_reload_stops_at_a_busy_overlay():
    guest = FakeGuestModules(loaded=build_id(b"o"), disk_note=build_id(b"o"), busy=True)
    with pytest.raises(errors.GuestCommandFailed, match="unmount every overlay"):
        modreload.reload_overlay(guest.conn, make_elf({".note.gnu.build-id": build_id(b"n")}))
    assert guest.log == ["umount"]          # nothing unloaded while an overlay is mounted


# --- the loop's state and its actions ----------------------------------------------------------

class FakeGuest:
    def __init__(self, conn, run_dir=Path("/run/devloop-patched-1-abcdef"), pid=42):
        self.conn = conn
        self.plan = type("Plan", (), {"run_dir": run_dir, "kernel_label": "devloop-patched"})()
        self.pid = pid
        self.stopped = self.released = False

    def stop(self):
        self.stopped = True

    def release(self):
        self.released = True


def test_loop_state_round_trip(tmp_path):
    g = FakeGuest(FakeConnection())
    assert loopguest.read_state(tmp_path) is None
    loopguest.write_state(tmp_path, g, A)
    state = loopguest.read_state(tmp_path)
    assert (state.run_dir, state.pid, state.artifacts) == (g.plan.run_dir, 42, A)
    (tmp_path / loopguest.STATE).write_text("{broken")
    assert loopguest.read_state(tmp_path) is None


def test_find_reports_a_dead_loop_guest(tmp_path):
    loopguest.write_state(tmp_path, FakeGuest(FakeConnection(), run_dir=tmp_path / "gone"), A)
    found = loopguest.find(None, tmp_path, "devloop-patched")
    assert found.guest is None and "gone" in found.note and found.state.artifacts == A
    assert loop.decide(found.state.artifacts, A, found.guest is not None).path == loop.BOOT


@pytest.fixture
def tree_plan(tmp_path):
    obj = tmp_path / "patched" / "obj"
    (obj / "fs/overlayfs").mkdir(parents=True)
    (obj / incremental.OVERLAY_KO).write_bytes(make_elf({".note.gnu.build-id": build_id(b"n")}))
    item = trees.DevBuild("devloop-patched", "patched", tmp_path / "wt", obj, tmp_path / "patched", None)
    return trees.TreePlan(tree=None, root=tmp_path, baseline=item, patched=item)


def _act(monkeypatch, tree_plan, decision, guest):
    booted = []
    monkeypatch.setattr(loop, "_boot", lambda s, tp, kernel, g: booted.append(g) or "fresh guest")
    built = trees.Built(kernel="kernel", before=A, after=A, seconds=0.0)
    notes: list[str] = []
    found = loopguest.Found(guest, None, "")
    return loop._act(None, tree_plan, built, found, decision, notes), booted, notes


def test_act_reloads_the_module_in_the_running_guest(monkeypatch, tree_plan):
    old = build_id(b"o")
    fake = FakeGuestModules(loaded=old, disk_note=old)
    g = FakeGuest(fake.conn)
    got, booted, notes = _act(monkeypatch, tree_plan, loop.Decision(loop.RELOAD, "x"), g)
    assert got is g and booted == [] and notes == []
    assert fake.loaded == build_id(b"n")


def test_act_reboots_when_the_reload_fails(monkeypatch, tree_plan):
    old = build_id(b"o")
    fake = FakeGuestModules(loaded=old, disk_note=old, bind_works=False)
    g = FakeGuest(fake.conn)
    got, booted, notes = _act(monkeypatch, tree_plan, loop.Decision(loop.RELOAD, "x"), g)
    assert got == "fresh guest" and booted == [g]
    assert notes and notes[0].startswith("retest: reboot (the module reload failed")


@pytest.mark.parametrize("path", [loop.BOOT, loop.REBOOT])
def test_act_boots_on_boot_and_reboot(monkeypatch, tree_plan, path):
    g = FakeGuest(FakeConnection(strict=True))
    got, booted, _ = _act(monkeypatch, tree_plan, loop.Decision(path, "x"), g)
    assert got == "fresh guest" and booted == [g] and g.conn.calls == []


def test_act_leaves_the_guest_alone_when_unchanged(monkeypatch, tree_plan):
    g = FakeGuest(FakeConnection(strict=True))
    got, booted, _ = _act(monkeypatch, tree_plan, loop.Decision(loop.UNCHANGED, "x"), g)
    assert got is g and booted == [] and g.conn.calls == []


def test_build_in_place_repackages_only_what_changed(tmp_path, monkeypatch):
    """A rebuild that changed none of the artifacts keeps the package (no modules_install,
    no modules image); one that changed overlay.ko packages again."""
    from vm.kernel import build, kconfig

    src, obj, kdir = tmp_path / "src", tmp_path / "obj", tmp_path / "k"
    outputs = {"vmlinux.o": b"v1", "fs/overlayfs/overlay.ko": b"m1", "arch/x86/boot/bzImage": b"b1"}
    packaged, configured = [], []

    def compile_tree(src_, obj_, fragments, tc, log, label, reconfigure=True):
        configured.append(reconfigure)
        for rel, data in outputs.items():
            (obj_ / rel).parent.mkdir(parents=True, exist_ok=True)
            (obj_ / rel).write_bytes(data)
        return obj_ / ".config", "7.2.13+"

    def package(src_, obj_, config, release, tc, log, out, label):
        packaged.append(release)
        out.mkdir(parents=True, exist_ok=True)
        for name in ("bzImage", "modules.ext4", "config"):
            (out / name).write_bytes(b"x")

    monkeypatch.setattr(build, "compile_tree", compile_tree)
    monkeypatch.setattr(build, "package", package)
    tc = build.Toolchain(jobs=1, ccache_dir=None, cache_root=tmp_path)

    fragment = tmp_path / "base.config"
    fragment.write_text("CONFIG_OVERLAY_FS=m\n")

    def run():
        frags = (kconfig.parse_fragment(fragment),)
        return incremental.build_in_place(src, obj, kdir, label="devloop-patched", version="7.2.13",
                                          key="worktree", fragments=frags, tc=tc, log=tmp_path / "log")

    first = run()
    assert len(packaged) == 1 and first.label == "devloop-patched" and first.release == "7.2.13+"
    assert run().bzimage == first.bzimage and len(packaged) == 1       # nothing changed: kept
    outputs["fs/overlayfs/overlay.ko"] = b"m2"
    run()
    assert len(packaged) == 2
    assert configured == [True, False, False]       # the .config is kept while the fragments are
    fragment.write_text("CONFIG_OVERLAY_FS=y\n")
    run()
    assert configured[-1] is True
