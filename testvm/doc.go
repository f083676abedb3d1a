// Package testvm boots a real Linux kernel (Debian's bookworm kernel, with
// device-mapper, dm-crypt, dm-mirror and LVM) under QEMU and runs tests in
// it. The development machine's own kernel has no device-mapper, so every
// test that must touch the real thing goes through here.
//
// Unit tests never need this package. Guest tests skip on the host unless
// the VM run was requested, and a requested run that cannot boot fails.
//
// # Writing guest tests
//
// A package's guest tests are named TestGuest* and start with
// RequireGuest(t), which skips them on the host. One host-side test boots
// the VM and reruns them there:
//
//	func TestVM(t *testing.T) {
//		testvm.RunTestsInGuest(t, testvm.Options{
//			Disks: []testvm.Disk{{Size: 256 << 20}},
//		})
//	}
//
// RunTestsInGuest skips unless DMCONVERT_VM=1 (make test sets it). It
// builds the package's test binary with CGO_ENABLED=0 go test -c, boots
// the guest, runs the binary with -test.v -test.run '^TestGuest' and turns
// every guest test into a host subtest of the same name. A guest test that
// fails, skips, or never finishes fails its subtest; no guest test at all
// fails TestVM. DMCONVERT_VM_RUN overrides Options.Run (one guest test),
// DMCONVERT_VM_BENCH sets Options.Bench, DMCONVERT_VM_KEEP=1 keeps the
// work directory (share, disks, console.log) even when all passed; it is
// always kept, and the QEMU command line and guest dmesg printed, when
// something failed. With DMCONVERT_VM_REPORT_DIR set, a JSON Report per
// run goes there (make test prints their total).
//
// Host tests that need several boots (power cuts, "reboot, then verify")
// use Prepare, Start, VM.WaitForConsole, VM.Kill, VM.Wait and Run, and
// RequireVM to skip when no VM run was requested. BuildStatic builds a
// command (such as ./cmd/dmconvert) to pass in with Options.Files.
//
// # The guest
//
//   - Kernel: the package linux-image-amd64 depends on in the apt archive,
//     at the version the archive serves (apt-cache), fetched with apt-get
//     download and never installed on the host; DMCONVERT_KERNEL_PKG=name
//     or name=version overrides. QEMU boots its uncompressed ELF vmlinux
//     through the PVH entry (the XZ bzImage would cost ~2.5 s per boot
//     under TCG). Module signatures are stripped (the kernel is tainted
//     'E'), which saves their verification time at every boot.
//   - QEMU: -accel tcg,thread=multi (never KVM: on these machines it runs a
//     stock kernel ~100x slower), -M q35 -cpu max,-erms,-fsrm (AES-NI is
//     emulated; without ERMS/FSRM the guest kernel does not copy with
//     rep movsb, which TCG runs much more slowly: measured in one guest,
//     3000 MiB /dev/zero -> /dev/null 7.7 s -> 1.2-1.6 s, 10 x `lvm pvs`
//     3.5 s -> 1.9-2.0 s, one failpoint case 20-23 s -> 14 s), -smp 1
//     (DefaultSMP; benchmarks ask for 2) -m 2048 by default, virtio-rng,
//     no network.
//   - Disks: Options.Disks / Config.Disks are virtio raw disks with
//     cache=none, in order /dev/vda, /dev/vdb, ... (GuestDisks, and
//     $DMCONVERT_GUEST_DISKS, comma separated). The guest sees a volatile
//     write cache and issues flushes; a QEMU kill keeps every write that
//     completed (it models a power cut after completed writes, not the
//     loss of a disk's unflushed cache: use dm-flakey or dm-log-writes for
//     that).
//   - Share: a host directory mounted read-write with 9p (msize 512000) at
//     /share (GuestShare, $DMCONVERT_GUEST_SHARE); scripts and test
//     binaries start there. Results can be written there. The
//     host's control files live in /share/.testvm: run.sh (environment and
//     script), exit (the exit status), dmesg (saved after the script),
//     test.out (a guest test binary's output).
//   - Files: RunTestsInGuest copies the test binary to /run/testvm and
//     Options.Files to /run/testvm/files (GuestFile, GuestFilesDir), both
//     tmpfs: executing from 9p costs seconds per program start. The
//     package's testdata directory is copied to /share/testdata, so
//     relative paths work as on the host.
//   - Environment: root, DMCONVERT_GUEST=1, DM_DISABLE_UDEV=1 (no udevd
//     runs unless a test starts it: libdevmapper creates /dev/mapper nodes
//     itself),
//     PATH=/usr/sbin:/usr/bin, TMPDIR=/tmp (a tmpfs), LC_ALL=C, plus
//     Options.Env. /run/lock/lvm and /run/cryptsetup exist.
//   - LVM: lvm.conf without udev (udev_sync, udev_rules,
//     verify_udev_operations, obtain_device_list_from_udev = 0), no devices
//     file, hints "none", a filter accepting only /dev/vd*, /dev/loop*,
//     /dev/dm-* and /dev/mapper/*, locking_dir /run/lock/lvm, no metadata
//     backup or archive, no lvmpolld, no event activation.
//   - Tools: bash (run scripts with it: busybox ash runs its own applets
//     even when PATH has the real tool), busybox for everything else,
//     dmsetup, lvm and its command names, cryptsetup, e2fsprogs (mkfs.ext4,
//     e2fsck, resize2fs, tune2fs, dumpe2fs, debugfs), xfsprogs (mkfs.xfs,
//     xfs_repair, xfs_db, xfs_growfs, xfs_admin, xfs_io), util-linux
//     (blkid, wipefs, blockdev, losetup, findmnt, lsblk, mount, umount,
//     sfdisk), coreutils (dd, date, sha256sum, truncate, stat, sync,
//     timeout), tcplay, script (a terminal for tcplay -c), udevadm (and
//     /usr/lib/systemd/systemd-udevd, the same program) with Debian's udev
//     rules for block and dm devices (guestUdevRules; started only by the
//     tests that want udev, e.g. convert's TestGuestUdev*); copied from the
//     host with their shared libraries.
//   - Modules loaded at boot: virtio, 9p, dm-mod, dm-crypt, dm-mirror
//     (dm-log, dm-region-hash), dm-flakey, dm-log-writes, dm-delay,
//     dm-zero, dm-snapshot, loop, ext4, aesni, xts, ecb, sha256, af_alg,
//     algif_skcipher, algif_hash. Loaded on first use by the kernel: xfs,
//     dm-thin-pool, dm-raid with raid1/raid10/raid456, dm-cache with
//     dm-cache-smq, sha512, serpent,
//     twofish, rmd160, wp512, essiv (or modprobe them).
//
// # The cache
//
// Everything lives in ${DMCONVERT_CACHE:-${XDG_CACHE_HOME:-~/.cache}}/dmconvert/testvm
// (CacheDir): kernels/<package>_<version>/ holds the .deb and the
// extracted vmlinux, images/<hash>/ the vmlinux and initramfs.cpio of one
// image. The hash covers the kernel package and version, the module lists,
// /init, lvm.conf and every file of the userland (path, mode, size,
// content), so an image is rebuilt only when one of them changes; the
// three most recently used images are kept. Removing the directory is
// always safe.
package testvm
