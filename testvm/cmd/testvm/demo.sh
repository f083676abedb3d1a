# make demo: a live conversion inside the test VM (runs under bash as root
# in the guest). A disk is an LVM PV with two LVs, mounted ext4 and xfs, and
# a process writing and fsyncing records the whole time; dmconvert encrypts
# the disk in place, online; then the result is checked, and opened again
# from scratch with stock cryptsetup, as a fresh boot would.
set -euo pipefail
D=${DMCONVERT_GUEST_DISKS%%,*}
say() { printf '\n=== %s\n' "$*"; }
# (lvm.conf turns metadata backups off in the guest; hide LVM's reminder)
show() { printf '$ %s\n' "$*"; "$@" 2>&1 | { grep -v 'metadata update is NOT backed up' || true; }; }
DMC=/share/dmconvert
if [ ! -x "$DMC" ]; then
	echo "no dmconvert binary in the share (scripts/demo.sh builds it)" >&2
	exit 1
fi
cp "$DMC" /tmp/dmconvert
# The journal's default place, /var/lib/dmconvert, on a disk of its own, as
# on a real machine (the guest's root file system is in memory, which a
# power cut empties: dmconvert would warn).
IFS=, read -r _ J _ <<< "$DMCONVERT_GUEST_DISKS"
if [ -n "$J" ]; then
	mkfs.ext4 -q "$J"
	mkdir -p /var/lib/dmconvert
	mount "$J" /var/lib/dmconvert
fi

say "guest: Linux $(uname -r), $(nproc) CPUs; disk $D is $(( $(blockdev --getsize64 "$D") >> 20 )) MiB"
show pvcreate -q "$D"
show vgcreate -q demo "$D"
show lvcreate -q -y -L 256M -n root demo
show lvcreate -q -y -L 320M -n data demo
show mkfs.ext4 -q /dev/demo/root
show mkfs.xfs -q /dev/demo/data
mkdir -p /mnt/root /mnt/data
show mount /dev/demo/root /mnt/root
show mount /dev/demo/data /mnt/data

say "a writer: fsync'd 256 KiB records into /mnt/root, their checksums into /mnt/data/manifest"
(
	i=0
	while [ ! -e /tmp/stop-writer ]; do
		i=$((i + 1))
		dd if=/dev/urandom of=/mnt/root/rec.$i bs=256K count=1 conv=fsync status=none
		sha256sum /mnt/root/rec.$i >> /mnt/data/manifest
		sync /mnt/data/manifest
	done
) &
writer=$!
sleep 2

say "the live stack, before"
show lsblk -o NAME,SIZE,TYPE,FSTYPE,MOUNTPOINT "$D"
show pvs
show dmsetup table

say "what dmconvert would do (--dry-run changes nothing)"
printf 'demo passphrase' > /tmp/pw
KDF="--pbkdf argon2id --pbkdf-memory 32768 --pbkdf-force-iterations 4 --pbkdf-parallel 1"
show /tmp/dmconvert encrypt "$D" --dry-run --shrink-pv $KDF

say "dmconvert encrypt, live: the file systems stay mounted and the writer keeps writing"
echo "\$ dmconvert encrypt $D --shrink-pv --batch-mode --key-file /tmp/pw (cheap KDF for the demo)"
# The serial console is a terminal: the progress bar draws there.
start=$(date +%s.%N)
/tmp/dmconvert encrypt "$D" --shrink-pv --batch-mode --key-file /tmp/pw $KDF > /dev/console 2>&1
end=$(date +%s.%N)
echo "converted in $(awk "BEGIN { printf \"%.1f\", $end - $start }") s while the writer kept writing"

say "the live stack, after"
show lsblk -o NAME,SIZE,TYPE,FSTYPE,MOUNTPOINT "$D"
show pvs
show cryptsetup status "$(basename "$D")_crypt"
show blkid -p "$D"

sleep 2
touch /tmp/stop-writer
wait "$writer"
say "the writer wrote $(wc -l < /mnt/data/manifest) records during the demo; verifying every one"
(cd / && sha256sum -c --quiet /mnt/data/manifest) && echo "all records verified"

say "cold: close everything and open the disk like a fresh boot, with stock cryptsetup"
show umount /mnt/root /mnt/data
show vgchange -an demo
show dmsetup remove "$(basename "$D")_crypt"
show cryptsetup open --key-file /tmp/pw "$D" "$(basename "$D")_crypt"
show vgchange -ay demo
show e2fsck -f -n /dev/demo/root
show xfs_repair -n /dev/demo/data
show mount /dev/demo/root /mnt/root
show mount /dev/demo/data /mnt/data
(cd / && sha256sum -c --quiet /mnt/data/manifest) && echo "all $(wc -l < /mnt/data/manifest) records verified after a cold open"
say "done: $D is LUKS2, its volume group lives on /dev/mapper/$(basename "$D")_crypt"
