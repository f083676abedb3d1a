# make demo: a sample live LVM disk inside the test VM (runs under bash as
# root in the guest). This is the situation dmconvert is for: a PV in use
# by LVs, one of them a mounted file system with a process writing to it.
set -euo pipefail
D=${DMCONVERT_GUEST_DISKS%%,*}
say() { printf '\n=== %s\n' "$*"; }
# (lvm.conf turns metadata backups off in the guest; hide LVM's reminder)
show() { printf '$ %s\n' "$*"; "$@" 2>&1 | { grep -v 'metadata update is NOT backed up' || true; }; }

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
sleep 3

say "the live stack"
show lsblk -o NAME,SIZE,TYPE,FSTYPE,MOUNTPOINT "$D"
show pvs
show vgs
show lvs -o lv_name,lv_size,devices
show dmsetup table
show findmnt -t ext4,xfs
show df -h /mnt/root /mnt/data

sleep 2
touch /tmp/stop-writer
wait "$writer"
say "the writer wrote $(wc -l < /mnt/data/manifest) records; verifying every one"
(cd / && sha256sum -c --quiet /mnt/data/manifest) && echo "all records verified"

show umount /mnt/root /mnt/data
show e2fsck -f -n /dev/demo/root
show vgchange -an demo
say "this is the live LVM PV that dmconvert converts in place to LVM-over-LUKS (the conversion engine is not built yet)"
