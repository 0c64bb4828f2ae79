#!/usr/bin/env bash
# Install everything ovl-volatile-harness needs on a Debian (or Ubuntu) host:
# the kernel toolchain, QEMU, mmdebstrap, the offline kernel sources, and the
# pinned Python dependencies from pyproject.toml.  Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

PKGS=(
	build-essential flex bison bc libelf-dev libssl-dev cpio ccache kmod git patch
	rsync xz-utils zstd python3-venv
	qemu-system-x86 qemu-utils mmdebstrap e2fsprogs xfsprogs
	openssh-client openssh-server
	gpgv debian-archive-keyring gpg gpg-agent
	# b4: `invoke series checkout` makes branches `b4 prep`/`b4 send` work on;
	# tests/unit/test_gitseries.py checks b4 understands them
	b4
	# fstests (xfstests), built on the host and shipped to the guest: its
	# Debian build dependencies (README "Building")
	autoconf automake libtool gawk libacl1-dev libattr1-dev libaio-dev libcap-dev
	liburing-dev uuid-dev xfslibs-dev pkg-config make
)
# The offline kernel trees (Debian's linux-source-X.Y packages), one per series
# base in patches/<base>/ (ovl.base: 6.12 by default, 6.1 for the LTS backport);
# optional where the distribution does not ship them (use --source
# kernel.org:X.Y.Z there).  OVL_KERNEL_SOURCES="pkg ..." replaces the list.
SOURCES=(${OVL_KERNEL_SOURCES:-linux-source-6.12 linux-source-6.1})

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

missing=()
for p in "${PKGS[@]}" "${SOURCES[@]}"; do
	installed "$p" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
	echo "setup: installing ${missing[*]}"
	$SUDO apt-get update -q
	avail=()
	for p in "${missing[@]}"; do
		if apt-cache show "$p" >/dev/null 2>&1; then
			avail+=("$p")
		else
			echo "setup: warning: package $p is not available here; skipping it" >&2
		fi
	done
	$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${avail[@]}"
else
	echo "setup: Debian packages already installed"
fi

# Only the pinned dependencies are installed: the harness itself always runs
# from this checkout (tasks.py and pytest put it first on sys.path).
PY="${PYTHON:-python3}"
mapfile -t DEPS < <("$PY" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]))')
echo "setup: Python dependencies (pinned in pyproject.toml): ${DEPS[*]}"
PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install -q --disable-pip-version-check "${DEPS[@]}"
