"""Swap the overlayfs module of a running guest for a new build (``invoke retest``).

The guest's modules come from a read-only disk, so the new ``overlay.ko`` is
copied into the guest's ``/tmp`` and bind-mounted over the file ``modinfo -n
overlay`` names: ``modprobe overlay`` (also the one a scenario runs after its
own ``rmmod``) then loads the new module.  The sequence:

1. unmount every overlay (a mounted overlay pins the module);
2. copy the module in; undo the bind mount of a previous reload, bind the new file;
3. ``rmmod overlay`` (when loaded), ``modprobe overlay``;
4. check the module now loaded is the new one: its GNU build id
   (``/sys/module/overlay/notes/.note.gnu.build-id``) must be the new file's.
   (``srcversion`` would not do: modpost hashes the sources without comments
   and whitespace, so an edit of a comment keeps it, and it only exists with
   ``MODULE_SRCVERSION_ALL``.)
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vm import errors

MODULE = "overlay"
REMOTE_DIR = "/tmp/ovl-devloop"
REMOTE_KO = f"{REMOTE_DIR}/overlay.ko"
NOTE = f"/sys/module/{MODULE}/notes/.note.gnu.build-id"
#: every overlay mount point, deepest first (mount points in /proc/mounts escape spaces as \040)
UNMOUNT_OVERLAYS = ("awk '$3 == \"overlay\" {print $2}' /proc/mounts | sort -r | "
                    "while read -r m; do umount \"$(printf '%b' \"$m\")\" || exit 1; done")
READ_NOTE = f"[ -e {NOTE} ] && od -An -tx1 -v {NOTE} | tr -d ' \\n' || true"


def elf_section(data: bytes, name: str) -> bytes | None:
    """The bytes of section ``name`` of a little-endian ELF64 file (a ``.ko``), or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def header(i: int) -> tuple[int, int, int]:
        name_off, = struct.unpack_from("<I", data, shoff + i * shentsize)
        offset, size = struct.unpack_from("<QQ", data, shoff + i * shentsize + 0x18)
        return name_off, offset, size

    _, str_off, str_size = header(shstrndx)
    names = data[str_off:str_off + str_size]
    for i in range(shnum):
        name_off, offset, size = header(i)
        if names[name_off:names.index(b"\0", name_off)].decode(errors="replace") == name:
            return data[offset:offset + size]
    return None


def build_id_note(ko: bytes) -> str:
    """The ``.note.gnu.build-id`` section of ``ko`` in hex, as the guest's sysfs shows it."""
    note = elf_section(ko, ".note.gnu.build-id")
    if not note:
        raise errors.BadArgument(what="the new overlay.ko has no .note.gnu.build-id section",
                                 fix="build it with the kernel's default linker flags (--build-id)")
    return note.hex()


@dataclass(frozen=True)
class Reloaded:
    path: str          # what modinfo -n names (now bind-mounted)
    before: str        # build-id note of the module loaded before ("" if none was)
    after: str         # ... and after: the new file's


def _check(res, what: str, fix: str):
    if not res.ok:
        raise errors.GuestCommandFailed(cmd=what, rc=res.exit_status,
                                        detail=f": {(res.stderr or res.stdout).strip()[:300]}", fix=fix)
    return res


def reload_overlay(conn, ko: bytes) -> Reloaded:
    """Load ``ko`` in place of the guest's overlay module (see the module docstring)."""
    want = build_id_note(ko)
    _check(conn.run(UNMOUNT_OVERLAYS), "unmount every overlay",
           "an overlay is busy (a process has its cwd or a file open in it); stop it, or retest with a reboot")
    path = _check(conn.run(["modinfo", "-n", MODULE]), "modinfo -n overlay",
                  "the guest's modules disk has no overlay module: build with CONFIG_OVERLAY_FS=m").stdout.strip()
    conn.run(["mkdir", "-p", REMOTE_DIR], check=True)
    conn.put_bytes(REMOTE_KO, ko)
    conn.run(["sh", "-c", 'while grep -qs " $1 " /proc/mounts; do umount "$1" || exit 1; done', "unbind", path],
             check=True)
    before = conn.run(READ_NOTE).stdout.strip()
    if conn.run(["test", "-d", f"/sys/module/{MODULE}"]).ok:
        _check(conn.run(["rmmod", MODULE]), "rmmod overlay",
               "something still uses the overlay module (see `lsmod`); retest with a reboot")
    conn.run(["mount", "--bind", REMOTE_KO, path], check=True)
    _check(conn.run(["modprobe", MODULE]), "modprobe overlay", "see the guest's dmesg for why the new module "
           "did not load (a symbol the running kernel lacks means the built-in code changed: reboot)")
    after = conn.run(READ_NOTE).stdout.strip()
    if after != want:
        raise errors.ModuleReloadFailed(why=f"the loaded module's build id is {after[-40:] or 'unreadable'}, "
                                            f"the new overlay.ko's is {want[-40:]}")
    return Reloaded(path, before, after)
