#!/bin/bash
# Installs the Debian packages that make test and make demo need, and only
# those that are missing; apt-get update runs only when something is
# missing (or apt has no package lists, which the kernel lookup needs).
# Nothing here installs a kernel: the guest kernel package is only
# downloaded (apt-get download) by testvm into its cache.
set -euo pipefail

pkgs=(
	qemu-system-x86   # the VM (TCG)
	busybox-static    # guest userland
	lvm2 dmsetup cryptsetup-bin e2fsprogs xfsprogs tcplay
	udev              # udevd in the guest, for the tests that run it
	mdadm             # md RAID arrays in the guest (a PV on md RAID1); only its binary is used
	util-linux mount fdisk coreutils bash
	kmod              # modprobe --show-depends, depmod for the guest's modules
	xz-utils          # unpacks the kernel's XZ payload into a bootable ELF vmlinux
	dpkg apt cpio ca-certificates
)

missing=()
for p in "${pkgs[@]}"; do
	if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != installed ]; then
		missing+=("$p")
	fi
done
need_lists=
apt-cache show linux-image-amd64 > /dev/null 2>&1 || need_lists=1
if [ ${#missing[@]} -eq 0 ] && [ -z "$need_lists" ]; then
	exit 0
fi

sudo=
if [ "$(id -u)" != 0 ]; then
	command -v sudo > /dev/null || { echo "host-deps: need root (or sudo) to install: ${missing[*]}" >&2; exit 1; }
	sudo=sudo
fi
export DEBIAN_FRONTEND=noninteractive
echo "host-deps: apt-get update${missing:+; installing ${missing[*]}}" >&2
$sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
if [ ${#missing[@]} -gt 0 ]; then
	$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" > /dev/null
fi
