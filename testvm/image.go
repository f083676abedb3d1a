package testvm

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	_ "embed"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"
)

// builderVersion changes whenever the way an image is assembled changes
// in a way the hashed inputs do not show; it is part of the cache key.
const builderVersion = "testvm-image-3"

//go:embed guest/init.sh
var initScript []byte

//go:embed guest/lvm.conf
var lvmConf []byte

// Image is a prepared guest: an uncompressed kernel and an initramfs,
// both in the cache directory. Images are immutable once built.
type Image struct {
	Dir                  string        `json:"dir"`                    // the image's cache directory
	Kernel               string        `json:"kernel"`                 // ELF vmlinux, booted through its PVH entry
	Initrd               string        `json:"initrd"`                 // newc cpio, uncompressed
	KernelVersion        string        `json:"kernel_version"`         // the guest's uname -r, e.g. 6.1.0-56-amd64
	KernelPackage        string        `json:"kernel_package"`         // e.g. linux-image-6.1.0-56-amd64
	KernelPackageVersion string        `json:"kernel_package_version"` // e.g. 6.1.192-2
	Modules              []string      `json:"modules"`                // .ko files in the initramfs (relative to lib/modules/<version>)
	BootModules          []string      `json:"boot_modules"`           // the ones /init loads, in load order
	Hash                 string        `json:"hash"`                   // hash of every input
	InitrdBytes          int64         `json:"initrd_bytes"`           //
	Built                bool          `json:"-"`                      // this call built it (false: cache hit)
	BuildTime            time.Duration `json:"-"`                      // time this call spent (resolving, hashing, building)
}

// String describes the image in one line (used in test logs).
func (img *Image) String() string {
	return fmt.Sprintf("kernel %s (%s %s), initramfs %.1f MiB, image %s",
		img.KernelVersion, img.KernelPackage, img.KernelPackageVersion,
		float64(img.InitrdBytes)/(1<<20), shortHash(img.Hash))
}

// Kernel modules of the guest, by module name or alias; each is resolved
// with its dependencies (modprobe --show-depends against the kernel
// package). bootModules are loaded by /init, in this order; the others
// are in the initramfs too and the kernel loads them on first use
// (request_module through busybox modprobe: mounting xfs, a "raid" or
// "thin-pool" table, a serpent cipher...). Loading xfs alone costs ~1.4 s
// under TCG, and the raid6 module benchmarks itself for ~0.3 s.
var bootModules = []string{
	// virtio transport, disks, entropy, the 9p share
	"virtio_pci", "virtio_blk", "virtio_rng", "9p", "9pnet_virtio",
	// device-mapper and the targets the project's tests use most
	"dm-mod", "dm-crypt", "dm-mirror", "dm-log", "dm-region-hash",
	"dm-flakey", "dm-log-writes", "dm-delay", "dm-zero", "dm-snapshot",
	"loop", "ext4",
	// crypto for dm-crypt and cryptsetup (af_alg)
	"aesni_intel", "xts", "ecb", "cbc", "sha256_ssse3",
	"af_alg", "algif_skcipher", "algif_hash",
}

var onDemandModules = []string{
	"dm-thin-pool", "dm-raid", "raid1", "raid10", "raid456",
	"md-mod", // md arrays made by mdadm (a PV on md RAID1)
	"dm-cache", "dm-cache-smq", "dm-writecache",
	"xfs",
	// tcplay/TrueCrypt ciphers and hashes
	"sha512_ssse3", "serpent", "twofish", "rmd160", "wp512",
	// aes-cbc-essiv:sha256 (old LUKS volumes' cipher)
	"essiv",
}

// guestTool is a host program copied into the initramfs with its
// shared libraries; links are extra names for it in the same directory.
type guestTool struct {
	name  string
	pkg   string // Debian package that provides it (for the error message)
	links []string
}

var guestTools = []guestTool{
	{name: "bash", pkg: "bash"},
	{name: "dmsetup", pkg: "dmsetup"},
	{name: "lvm", pkg: "lvm2", links: lvmCommands},
	{name: "cryptsetup", pkg: "cryptsetup-bin"},
	{name: "mke2fs", pkg: "e2fsprogs", links: []string{"mkfs.ext2", "mkfs.ext3", "mkfs.ext4"}},
	{name: "e2fsck", pkg: "e2fsprogs", links: []string{"fsck.ext2", "fsck.ext3", "fsck.ext4"}},
	{name: "resize2fs", pkg: "e2fsprogs"},
	{name: "tune2fs", pkg: "e2fsprogs", links: []string{"e2label"}},
	{name: "dumpe2fs", pkg: "e2fsprogs"},
	{name: "debugfs", pkg: "e2fsprogs"},
	{name: "mkfs.xfs", pkg: "xfsprogs"},
	{name: "xfs_repair", pkg: "xfsprogs"},
	{name: "xfs_db", pkg: "xfsprogs"},
	{name: "xfs_growfs", pkg: "xfsprogs"},
	{name: "xfs_admin", pkg: "xfsprogs"},
	{name: "xfs_io", pkg: "xfsprogs"},
	{name: "blkid", pkg: "util-linux"},
	{name: "wipefs", pkg: "util-linux"},
	{name: "blockdev", pkg: "util-linux"},
	{name: "findmnt", pkg: "util-linux"},
	{name: "lsblk", pkg: "util-linux"},
	{name: "losetup", pkg: "mount"},
	{name: "mount", pkg: "mount"}, // util-linux mount finds the fs type with blkid (busybox's only tries loaded ones)
	{name: "umount", pkg: "mount"},
	{name: "sfdisk", pkg: "fdisk"},
	{name: "dd", pkg: "coreutils"},
	{name: "date", pkg: "coreutils"},
	{name: "sha256sum", pkg: "coreutils"},
	{name: "truncate", pkg: "coreutils"},
	{name: "stat", pkg: "coreutils"},
	{name: "sync", pkg: "coreutils"},
	{name: "timeout", pkg: "coreutils"},
	{name: "tcplay", pkg: "tcplay"},
	{name: "mdadm", pkg: "mdadm"},
	{name: "script", pkg: "bsdutils"}, // a terminal for tcplay -c, which reads its passphrase from one
	// udev, for the tests that run udevd (guestUdevRules); no other test
	// starts it, so the guest has no udev by default.
	{name: "udevadm", pkg: "udev"},
}

// guestUdevRules are the udev rules files copied into the guest (from
// /lib/udev/rules.d): what a Debian system runs for block and
// device-mapper devices: dmsetup's rules (/dev/mapper links, the cookie
// completion), lvm2's (/dev/VG/LV links, pvscan), systemd's block rules (the inotify watch that turns a
// close after a write into a "change" event, blkid probing,
// /dev/disk/by-* links).
var guestUdevRules = []struct{ name, pkg string }{
	{"50-udev-default.rules", "udev"},
	{"55-dm.rules", "dmsetup"},
	{"56-lvm.rules", "lvm2"}, // /dev/VG/LV links (LVM waits for them with udev_rules = 1)
	{"60-block.rules", "udev"},
	{"60-persistent-storage.rules", "udev"},
	{"60-persistent-storage-dm.rules", "dmsetup"},
	{"69-lvm.rules", "lvm2"}, // pvscan --cache on a new PV (autoactivation needs systemd-run: none here)
	{"95-dm-notify.rules", "dmsetup"},
}

// lvmCommands are the usual names of the lvm multi-call binary.
var lvmCommands = []string{
	"pvcreate", "pvs", "pvscan", "pvresize", "pvdisplay", "pvremove", "pvchange", "pvmove", "pvck",
	"vgcreate", "vgs", "vgscan", "vgchange", "vgdisplay", "vgremove", "vgextend", "vgreduce",
	"vgcfgbackup", "vgcfgrestore", "vgrename", "vgck", "vgmknodes", "vgimportclone",
	"lvcreate", "lvs", "lvscan", "lvchange", "lvdisplay", "lvremove", "lvextend", "lvreduce",
	"lvresize", "lvrename", "lvconvert", "lvmconfig", "lvmdiskscan", "lvmdevices",
}

// toolPath is the PATH used to find host tools (sbin first, as root has).
const toolPath = "/usr/sbin:/usr/bin:/sbin:/bin"

// CacheDir returns the directory testvm caches downloads and images in:
// ${DMCONVERT_CACHE:-${XDG_CACHE_HOME:-~/.cache}}/dmconvert/testvm.
func CacheDir() (string, error) {
	base := os.Getenv("DMCONVERT_CACHE")
	if base == "" {
		base = os.Getenv("XDG_CACHE_HOME")
	}
	if base == "" {
		home, err := os.UserHomeDir()
		if err != nil {
			return "", fmt.Errorf("testvm cache: no DMCONVERT_CACHE, XDG_CACHE_HOME or home directory: %w", err)
		}
		base = filepath.Join(home, ".cache")
	}
	return filepath.Join(base, "dmconvert", "testvm"), nil
}

var (
	prepareMu  sync.Mutex
	prepareMem *Image
)

// Prepare returns the guest image, building it if any input changed
// (kernel package version, module list, host tools and their libraries,
// init script, lvm.conf). It is safe to call from several processes at
// once (the cache is locked) and cheap after the first call in a process.
func Prepare(ctx context.Context) (*Image, error) {
	return PrepareLog(ctx, nil)
}

// PrepareLog is Prepare with progress messages sent to logf (may be nil).
func PrepareLog(ctx context.Context, logf func(format string, args ...any)) (*Image, error) {
	prepareMu.Lock()
	defer prepareMu.Unlock()
	if prepareMem != nil {
		c := *prepareMem
		c.Built, c.BuildTime = false, 0
		return &c, nil
	}
	if logf == nil {
		logf = func(string, ...any) {}
	}
	start := time.Now()
	cache, err := CacheDir()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return nil, fmt.Errorf("testvm cache %s: %w", cache, err)
	}
	unlock, err := lockFile(ctx, filepath.Join(cache, "lock"))
	if err != nil {
		return nil, err
	}
	defer unlock()

	b := &builder{cache: cache, logf: logf}
	img, err := b.prepare(ctx)
	if err != nil {
		return nil, err
	}
	img.BuildTime = time.Since(start)
	c := *img
	prepareMem = &c
	return img, nil
}

// lockFile takes an exclusive flock on path, polling so ctx can cancel.
func lockFile(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("testvm cache lock %s: %w", path, err)
	}
	for {
		err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
		if err == nil {
			return func() { syscall.Flock(int(f.Fd()), syscall.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, syscall.EWOULDBLOCK) && !errors.Is(err, syscall.EINTR) {
			f.Close()
			return nil, fmt.Errorf("testvm cache lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("testvm cache lock %s: %w", path, ctx.Err())
		case <-time.After(100 * time.Millisecond):
		}
	}
}

type builder struct {
	cache string
	logf  func(string, ...any)
}

// kernelRef names the Debian kernel package to boot.
type kernelRef struct{ Package, Version string }

func (k kernelRef) dirName() string { return k.Package + "_" + k.Version }

func (b *builder) prepare(ctx context.Context) (*Image, error) {
	kref, err := b.resolveKernel(ctx)
	if err != nil {
		return nil, err
	}
	root, err := userlandTree()
	if err != nil {
		return nil, err
	}
	hash, err := inputHash(kref, root)
	if err != nil {
		return nil, err
	}
	dir := filepath.Join(b.cache, "images", shortHash(hash))
	if img, err := readImage(dir); err == nil && img.Hash == hash {
		now := time.Now()
		os.Chtimes(dir, now, now) // recently used images survive pruning
		return img, nil
	}
	b.logf("testvm: building guest image %s (%s %s)", shortHash(hash), kref.Package, kref.Version)
	img, err := b.build(ctx, kref, root, hash, dir)
	if err != nil {
		return nil, err
	}
	img.Built = true
	b.prune(dir)
	return img, nil
}

func shortHash(h string) string {
	if len(h) > 16 {
		return h[:16]
	}
	return h
}

func readImage(dir string) (*Image, error) {
	data, err := os.ReadFile(filepath.Join(dir, "image.json"))
	if err != nil {
		return nil, err
	}
	var img Image
	if err := json.Unmarshal(data, &img); err != nil {
		return nil, fmt.Errorf("%s: %w", dir, err)
	}
	img.Dir = dir
	img.Kernel = filepath.Join(dir, "vmlinux")
	img.Initrd = filepath.Join(dir, "initramfs.cpio")
	for _, p := range []string{img.Kernel, img.Initrd} {
		if _, err := os.Stat(p); err != nil {
			return nil, err
		}
	}
	return &img, nil
}

// resolveKernel picks the kernel package: $DMCONVERT_KERNEL_PKG
// ("name" or "name=version") if set, else what linux-image-amd64 depends
// on in the apt archive, at the version the archive serves. The answer is
// remembered until apt's package lists change (apt-cache takes ~0.7 s).
// Without apt lists it falls back to the newest kernel already cached.
func (b *builder) resolveKernel(ctx context.Context) (kernelRef, error) {
	name, version, _ := strings.Cut(os.Getenv("DMCONVERT_KERNEL_PKG"), "=")
	if name != "" && version != "" {
		return kernelRef{name, version}, nil
	}
	memo := filepath.Join(b.cache, "kernel-resolved.json")
	stamp := aptStamp() + "\n" + name
	var m struct{ Stamp, Package, Version string }
	if data, err := os.ReadFile(memo); err == nil && json.Unmarshal(data, &m) == nil && m.Stamp == stamp && m.Package != "" && m.Version != "" {
		return kernelRef{m.Package, m.Version}, nil
	}
	k, aptErr := aptResolve(ctx, name)
	if aptErr == nil {
		m.Stamp, m.Package, m.Version = stamp, k.Package, k.Version
		data, _ := json.Marshal(m)
		os.WriteFile(memo, data, 0o644)
		return k, nil
	}
	// Offline fallback: the newest kernel already downloaded.
	ents, _ := os.ReadDir(filepath.Join(b.cache, "kernels"))
	var best os.DirEntry
	var bestTime time.Time
	for _, e := range ents {
		info, err := e.Info()
		if err != nil || !e.IsDir() || !strings.Contains(e.Name(), "_") {
			continue
		}
		if name != "" && !strings.HasPrefix(e.Name(), name+"_") {
			continue
		}
		if _, err := os.Stat(filepath.Join(b.cache, "kernels", e.Name(), "vmlinux")); err != nil {
			continue
		}
		if best == nil || info.ModTime().After(bestTime) {
			best, bestTime = e, info.ModTime()
		}
	}
	if best == nil {
		return kernelRef{}, fmt.Errorf("testvm: cannot resolve the Debian kernel package (run apt-get update, or set DMCONVERT_KERNEL_PKG=linux-image-<abi>-amd64[=version]): %w", aptErr)
	}
	n, v, _ := strings.Cut(best.Name(), "_")
	b.logf("testvm: apt-cache unusable (%v); using cached kernel %s %s", aptErr, n, v)
	return kernelRef{n, v}, nil
}

// aptResolve asks apt-cache for the kernel package linux-image-amd64
// depends on (or for name's version, when name is given).
func aptResolve(ctx context.Context, name string) (kernelRef, error) {
	if name == "" {
		out, err := run(ctx, "", "apt-cache", "show", "--no-all-versions", "linux-image-amd64")
		if err != nil {
			return kernelRef{}, err
		}
		for _, line := range strings.Split(out, "\n") {
			deps, ok := strings.CutPrefix(line, "Depends: ")
			if !ok {
				continue
			}
			for _, d := range strings.Split(deps, ",") {
				f := strings.Fields(strings.TrimSpace(d))
				if len(f) == 0 || !strings.HasPrefix(f[0], "linux-image-") {
					continue
				}
				name = f[0]
				if len(f) == 3 && f[1] == "(=" {
					return kernelRef{name, strings.TrimSuffix(f[2], ")")}, nil
				}
				break
			}
		}
		if name == "" {
			return kernelRef{}, fmt.Errorf("apt-cache show linux-image-amd64 names no linux-image-* dependency")
		}
	}
	out, err := run(ctx, "", "apt-cache", "show", "--no-all-versions", name)
	if err != nil {
		return kernelRef{}, err
	}
	for _, line := range strings.Split(out, "\n") {
		if v, ok := strings.CutPrefix(line, "Version: "); ok {
			return kernelRef{name, strings.TrimSpace(v)}, nil
		}
	}
	return kernelRef{}, fmt.Errorf("apt-cache show %s gives no version", name)
}

// aptStamp identifies the state of apt's configuration and package
// lists (names, sizes and mtimes).
func aptStamp() string {
	h := sha256.New()
	for _, pat := range []string{"/var/lib/apt/lists/*", "/etc/apt/sources.list", "/etc/apt/sources.list.d/*", "/etc/apt/preferences.d/*"} {
		files, _ := filepath.Glob(pat)
		for _, f := range files {
			if st, err := os.Stat(f); err == nil {
				fmt.Fprintf(h, "%s %d %d\n", f, st.Size(), st.ModTime().UnixNano())
			}
		}
	}
	return hex.EncodeToString(h.Sum(nil))
}

// userlandTree assembles everything of the guest's root file system
// except the kernel modules: directories, busybox and its applets, the
// host tools with their shared libraries, /init and configuration.
func userlandTree() (tree, error) {
	t := tree{}
	for _, d := range []string{"usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "proc", "sys", "dev", "run",
		"tmp", "mnt", "root", "etc/lvm", "etc/testvm", "var/tmp", strings.TrimPrefix(GuestShare, "/")} {
		t.dir(d)
	}
	for _, l := range [][2]string{{"bin", "usr/bin"}, {"sbin", "usr/sbin"}, {"lib", "usr/lib"}, {"lib64", "usr/lib64"}, {"etc/mtab", "/proc/self/mounts"}} {
		t.symlink(l[0], l[1])
	}
	t["tmp"].mode = 0o1777
	t["var/tmp"].mode = 0o1777

	busybox, err := lookTool("busybox", "busybox-static")
	if err != nil {
		return nil, err
	}
	if dyn, err := isDynamicELF(busybox); err != nil {
		return nil, err
	} else if dyn {
		return nil, fmt.Errorf("testvm: %s is dynamically linked; install busybox-static", busybox)
	}
	t.file("usr/bin/busybox", 0o755, busybox)

	libs := map[string]string{} // guest path -> host path
	have := map[string]bool{}
	for _, tool := range guestTools {
		p, err := lookTool(tool.name, tool.pkg)
		if err != nil {
			return nil, err
		}
		dst := guestPath(filepath.Dir(p)) + "/" + tool.name
		src, err := filepath.EvalSymlinks(p)
		if err != nil {
			return nil, fmt.Errorf("testvm: %s: %w", p, err)
		}
		t.file(dst, 0o755, src)
		have[tool.name] = true
		for _, l := range tool.links {
			t.symlink(filepath.Dir(dst)+"/"+l, tool.name)
			have[l] = true
		}
		if err := sharedLibs(src, libs); err != nil {
			return nil, err
		}
	}
	// Libraries loaded with dlopen, which ldd does not show: glibc loads
	// libgcc_s for pthread_exit/pthread_cancel (cryptsetup aborts without it).
	for _, name := range dlopenLibs {
		p, err := findLib(name)
		if err != nil {
			return nil, err
		}
		real, err := filepath.EvalSymlinks(p)
		if err != nil {
			return nil, fmt.Errorf("testvm: %s: %w", p, err)
		}
		libs[guestPath(filepath.Dir(p))+"/"+filepath.Base(p)] = real
	}
	for g, h := range libs {
		t.file(g, 0o755, h)
	}
	// busybox applets for everything the real tools do not provide
	out, err := exec.Command(busybox, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("testvm: %s --list: %w", busybox, err)
	}
	for _, a := range strings.Fields(string(out)) {
		if a == "busybox" || have[a] || strings.Contains(a, "/") {
			continue
		}
		t.symlink("usr/bin/"+a, "busybox")
	}
	// Module tools where programs exec them: lvm runs /sbin/modprobe for
	// a missing target (thin-pool, raid), the kernel its modprobe helper.
	for _, a := range []string{"modprobe", "insmod", "rmmod", "lsmod", "modinfo", "depmod"} {
		if !have[a] {
			t.symlink("usr/sbin/"+a, "../bin/busybox")
		}
	}

	// udevd is udevadm under another name (as in Debian's udev package).
	t.symlink("usr/lib/systemd/systemd-udevd", "../../bin/udevadm")
	for _, r := range guestUdevRules {
		src := ""
		for _, d := range []string{"/lib/udev/rules.d", "/usr/lib/udev/rules.d"} {
			if _, err := os.Stat(filepath.Join(d, r.name)); err == nil {
				src = filepath.Join(d, r.name)
				break
			}
		}
		if src == "" {
			return nil, fmt.Errorf("testvm: udev rules file %s not found in /lib/udev/rules.d (install the Debian package %s; make test does)", r.name, r.pkg)
		}
		t.file("usr/lib/udev/rules.d/"+r.name, 0o644, src)
	}

	t.data("init", 0o755, initScript)
	t.data("etc/lvm/lvm.conf", 0o644, lvmConf)
	t.data("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/bash\n"))
	t.data("etc/group", 0o644, []byte("root:x:0:\ndisk:x:6:\n"))
	t.data("etc/hostname", 0o644, []byte("testvm\n"))
	t.data("etc/fstab", 0o644, nil)
	if data, err := os.ReadFile("/etc/mke2fs.conf"); err == nil {
		t.data("etc/mke2fs.conf", 0o644, data)
	}
	return t, nil
}

// dlopenLibs are shared libraries the guest tools load at run time:
// libgcc_s (above), and OpenSSL 3's legacy provider, which cryptsetup
// loads for the hashes OpenSSL keeps there (Whirlpool: TrueCrypt and
// VeraCrypt volumes made with it), as on a Debian system with libssl3.
var dlopenLibs = []string{"libgcc_s.so.1", "ossl-modules/legacy.so"}

// findLib finds a shared library in the multiarch library directories.
func findLib(name string) (string, error) {
	for _, dir := range []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64"} {
		p := filepath.Join(dir, name)
		if _, err := os.Stat(p); err == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("testvm: shared library %s not found on the host", name)
}

// lookTool finds a host program by name (in sbin and bin directories).
func lookTool(name, pkg string) (string, error) {
	for _, dir := range filepath.SplitList(toolPath) {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("testvm: host tool %s not found in %s (install the Debian package %s; make test does)", name, toolPath, pkg)
}

// guestPath maps a host directory onto the merged-/usr guest layout.
func guestPath(hostDir string) string {
	d := filepath.Clean(hostDir)
	for _, p := range []string{"/bin", "/sbin", "/lib", "/lib64"} {
		if d == p || strings.HasPrefix(d, p+"/") {
			return "usr" + d
		}
	}
	return strings.TrimPrefix(d, "/")
}

func isDynamicELF(path string) (bool, error) {
	f, err := elf.Open(path)
	if err != nil {
		var fe *elf.FormatError
		if errors.As(err, &fe) {
			return false, nil // a script
		}
		return false, fmt.Errorf("testvm: %s: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			return true, nil
		}
	}
	return false, nil
}

// sharedLibs adds the shared libraries (and the dynamic loader) that ldd
// reports for an executable to libs (guest path -> host path).
func sharedLibs(exe string, libs map[string]string) error {
	dyn, err := isDynamicELF(exe)
	if err != nil || !dyn {
		return err
	}
	out, err := exec.Command(hostCmd("ldd"), exe).CombinedOutput()
	if err != nil {
		return fmt.Errorf("testvm: ldd %s: %w\n%s", exe, err, out)
	}
	for _, line := range strings.Split(string(out), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "linux-vdso") {
			continue
		}
		if strings.Contains(line, "not found") {
			return fmt.Errorf("testvm: ldd %s: %s", exe, line)
		}
		var lib string
		if _, after, ok := strings.Cut(line, "=> "); ok {
			lib, _, _ = strings.Cut(after, " ")
		} else if strings.HasPrefix(line, "/") {
			lib, _, _ = strings.Cut(line, " ")
		}
		if lib == "" {
			continue
		}
		real, err := filepath.EvalSymlinks(lib)
		if err != nil {
			return fmt.Errorf("testvm: ldd %s: %s: %w", exe, lib, err)
		}
		libs[guestPath(filepath.Dir(lib))+"/"+filepath.Base(lib)] = real
	}
	return nil
}

// inputHash hashes everything an image is made of: the builder version,
// the kernel package and version, the module list and every file of the
// userland tree (guest path, mode, size, content).
func inputHash(k kernelRef, t tree) (string, error) {
	h := sha256.New()
	fmt.Fprintf(h, "%s\nkernel %s %s\nmodules %q %q\n", builderVersion, k.Package, k.Version, bootModules, onDemandModules)
	names := make([]string, 0, len(t))
	for p := range t {
		names = append(names, p)
	}
	sort.Strings(names)
	for _, p := range names {
		e := t[p]
		switch {
		case e.kind == sIFLNK:
			fmt.Fprintf(h, "L %s %s\n", p, e.target)
		case e.kind == sIFDIR:
			fmt.Fprintf(h, "D %s %o\n", p, e.mode)
		case e.src == "":
			fmt.Fprintf(h, "F %s %o %d\n", p, e.mode, len(e.data))
			h.Write(e.data)
		default:
			f, err := os.Open(e.src)
			if err != nil {
				return "", fmt.Errorf("testvm: hashing %s: %w", e.src, err)
			}
			st, err := f.Stat()
			if err == nil {
				fmt.Fprintf(h, "F %s %o %d\n", p, e.mode, st.Size())
				_, err = io.Copy(h, f)
			}
			f.Close()
			if err != nil {
				return "", fmt.Errorf("testvm: hashing %s: %w", e.src, err)
			}
		}
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// build makes the image: kernel package (downloaded once), vmlinux
// (extracted once per kernel), modules with dependencies, initramfs.
func (b *builder) build(ctx context.Context, k kernelRef, root tree, hash, dir string) (*Image, error) {
	kdir := filepath.Join(b.cache, "kernels", k.dirName())
	if err := os.MkdirAll(kdir, 0o755); err != nil {
		return nil, fmt.Errorf("testvm: %w", err)
	}
	deb, err := b.download(ctx, k, kdir)
	if err != nil {
		return nil, err
	}
	work, err := os.MkdirTemp(b.cache, "build-")
	if err != nil {
		return nil, fmt.Errorf("testvm: %w", err)
	}
	defer os.RemoveAll(work)

	b.logf("testvm: extracting %s", filepath.Base(deb))
	kroot := filepath.Join(work, "kernel")
	if _, err := run(ctx, "", "dpkg-deb", "-x", deb, kroot); err != nil {
		return nil, err
	}
	release, err := kernelRelease(kroot)
	if err != nil {
		return nil, err
	}
	vmlinux := filepath.Join(kdir, "vmlinux")
	if _, err := os.Stat(vmlinux); err != nil {
		b.logf("testvm: extracting the ELF vmlinux from vmlinuz-%s", release)
		if err := extractVmlinux(ctx, filepath.Join(kroot, "boot", "vmlinuz-"+release), vmlinux); err != nil {
			return nil, err
		}
	}
	if _, err := run(ctx, "", "depmod", "-b", kroot, release); err != nil {
		return nil, err
	}
	boot, err := resolveModules(ctx, kroot, release, bootModules)
	if err != nil {
		return nil, err
	}
	mods, err := resolveModules(ctx, kroot, release, append(append([]string{}, bootModules...), onDemandModules...))
	if err != nil {
		return nil, err
	}

	// Stage the selected modules and let depmod write their index
	// (modules.dep, modules.alias) so the guest's modprobe can load more
	// on demand; then add them to the tree.
	stage := filepath.Join(work, "stage")
	kmods := filepath.Join(kroot, "lib", "modules", release)
	smods := filepath.Join(stage, "lib", "modules", release)
	for _, m := range mods {
		if err := stripModule(filepath.Join(kmods, m), filepath.Join(smods, m)); err != nil {
			return nil, err
		}
	}
	for _, m := range []string{"modules.order", "modules.builtin", "modules.builtin.modinfo"} {
		if err := linkOrCopy(filepath.Join(kmods, m), filepath.Join(smods, m)); err != nil {
			return nil, err
		}
	}
	if _, err := run(ctx, "", "depmod", "-b", stage, release); err != nil {
		return nil, err
	}
	err = filepath.WalkDir(smods, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		rel, _ := filepath.Rel(smods, p)
		root.file("usr/lib/modules/"+release+"/"+rel, 0o644, p)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("testvm: staging modules: %w", err)
	}
	// /init loads these by module name, dependencies first
	var names []string
	for _, m := range boot {
		names = append(names, strings.TrimSuffix(filepath.Base(m), ".ko"))
	}
	root.data("etc/testvm/modules", 0o644, []byte(strings.Join(names, "\n")+"\n"))

	tmp := dir + ".tmp"
	os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return nil, fmt.Errorf("testvm: %w", err)
	}
	f, err := os.Create(filepath.Join(tmp, "initramfs.cpio"))
	if err != nil {
		return nil, fmt.Errorf("testvm: %w", err)
	}
	err = root.writeCPIO(f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, fmt.Errorf("testvm: writing initramfs: %w", err)
	}
	if err := linkOrCopy(vmlinux, filepath.Join(tmp, "vmlinux")); err != nil {
		return nil, err
	}
	st, err := os.Stat(filepath.Join(tmp, "initramfs.cpio"))
	if err != nil {
		return nil, fmt.Errorf("testvm: %w", err)
	}
	img := &Image{
		KernelVersion:        release,
		KernelPackage:        k.Package,
		KernelPackageVersion: k.Version,
		Modules:              mods,
		BootModules:          boot,
		Hash:                 hash,
		InitrdBytes:          st.Size(),
	}
	data, _ := json.MarshalIndent(img, "", "  ")
	if err := os.WriteFile(filepath.Join(tmp, "image.json"), append(data, '\n'), 0o644); err != nil {
		return nil, fmt.Errorf("testvm: %w", err)
	}
	os.RemoveAll(dir)
	if err := os.Rename(tmp, dir); err != nil {
		return nil, fmt.Errorf("testvm: %w", err)
	}
	b.logf("testvm: image ready: %d modules (%d loaded at boot), initramfs %.1f MiB", len(mods), len(boot), float64(st.Size())/(1<<20))
	return readImage(dir)
}

// download fetches the kernel package with apt-get download (never
// installing it) unless the cache has it.
func (b *builder) download(ctx context.Context, k kernelRef, kdir string) (string, error) {
	deb := filepath.Join(kdir, k.dirName()+"_amd64.deb")
	if _, err := os.Stat(deb); err == nil {
		return deb, nil
	}
	b.logf("testvm: apt-get download %s=%s", k.Package, k.Version)
	tmp, err := os.MkdirTemp(kdir, "download-")
	if err != nil {
		return "", fmt.Errorf("testvm: %w", err)
	}
	defer os.RemoveAll(tmp)
	args := []string{"download", k.Package + "=" + k.Version}
	if os.Geteuid() == 0 {
		// as root apt would try to drop to _apt, which cannot write here
		args = append([]string{"-o", "APT::Sandbox::User=root"}, args...)
	}
	if _, err := run(ctx, tmp, "apt-get", args...); err != nil {
		return "", err
	}
	got, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(got) != 1 {
		return "", fmt.Errorf("testvm: apt-get download %s=%s left %d .deb files", k.Package, k.Version, len(got))
	}
	if err := os.Rename(got[0], deb); err != nil {
		return "", fmt.Errorf("testvm: %w", err)
	}
	return deb, nil
}

func kernelRelease(kroot string) (string, error) {
	ents, err := os.ReadDir(filepath.Join(kroot, "lib", "modules"))
	if err != nil {
		return "", fmt.Errorf("testvm: kernel package has no lib/modules: %w", err)
	}
	for _, e := range ents {
		if _, err := os.Stat(filepath.Join(kroot, "boot", "vmlinuz-"+e.Name())); err == nil {
			return e.Name(), nil
		}
	}
	return "", fmt.Errorf("testvm: kernel package has no boot/vmlinuz-<release> matching lib/modules/*")
}

// extractVmlinux decompresses the XZ payload of a bzImage into an ELF
// vmlinux (QEMU boots it through the PVH entry note, without the
// decompressor stub that costs ~2.5 s per boot under TCG).
func extractVmlinux(ctx context.Context, vmlinuz, out string) error {
	data, err := os.ReadFile(vmlinuz)
	if err != nil {
		return fmt.Errorf("testvm: %w", err)
	}
	i := bytes.Index(data, []byte("\xfd7zXZ\x00"))
	if i < 0 {
		return fmt.Errorf("testvm: %s: no XZ payload found", vmlinuz)
	}
	tmp := out + ".tmp"
	f, err := os.Create(tmp)
	if err != nil {
		return fmt.Errorf("testvm: %w", err)
	}
	cmd := exec.CommandContext(ctx, hostCmd("xz"), "-dc", "--single-stream")
	cmd.Stdin = bytes.NewReader(data[i:])
	cmd.Stdout = f
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	err = cmd.Run()
	f.Close()
	if err != nil {
		os.Remove(tmp)
		return fmt.Errorf("testvm: xz -d of %s: %w: %s", vmlinuz, err, stderr.String())
	}
	if err := checkPVH(tmp); err != nil {
		os.Remove(tmp)
		return err
	}
	return os.Rename(tmp, out)
}

// checkPVH verifies that the file is an ELF kernel with the Xen PVH entry
// note (XEN_ELFNOTE_PHYS32_ENTRY, type 18) QEMU needs to boot it.
func checkPVH(path string) error {
	f, err := elf.Open(path)
	if err != nil {
		return fmt.Errorf("testvm: %s is not an ELF kernel: %w", path, err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type != elf.PT_NOTE {
			continue
		}
		data, err := io.ReadAll(p.Open())
		if err != nil {
			return fmt.Errorf("testvm: %s: reading notes: %w", path, err)
		}
		for len(data) >= 12 {
			nsz := int(f.ByteOrder.Uint32(data[0:]))
			dsz := int(f.ByteOrder.Uint32(data[4:]))
			typ := f.ByteOrder.Uint32(data[8:])
			off := 12 + (nsz+3)&^3
			if off > len(data) {
				break
			}
			name := strings.TrimRight(string(data[12:12+nsz]), "\x00")
			if name == "Xen" && typ == 18 {
				return nil
			}
			next := off + (dsz+3)&^3
			if next > len(data) {
				break
			}
			data = data[next:]
		}
	}
	return fmt.Errorf("testvm: %s has no PVH entry note (CONFIG_PVH); QEMU cannot boot it directly", path)
}

// resolveModules lists the .ko files (relative to lib/modules/<release>)
// for the given module names and their dependencies, in load order.
func resolveModules(ctx context.Context, kroot, release string, names []string) ([]string, error) {
	base := filepath.Join(kroot, "lib", "modules", release) + "/"
	seen := map[string]bool{}
	var out []string
	for _, n := range names {
		o, err := run(ctx, "", "modprobe", "-d", kroot, "-S", release, "--show-depends", n)
		if err != nil {
			return nil, fmt.Errorf("testvm: module %s: %w", n, err)
		}
		for _, line := range strings.Split(o, "\n") {
			f := strings.Fields(line)
			if len(f) < 2 || f[0] != "insmod" {
				continue // "builtin <name>": nothing to load
			}
			rel := strings.TrimPrefix(f[1], base)
			if rel == f[1] {
				return nil, fmt.Errorf("testvm: module %s: unexpected path %s", n, f[1])
			}
			if !seen[rel] {
				seen[rel] = true
				out = append(out, rel)
			}
		}
	}
	return out, nil
}

func linkOrCopy(src, dst string) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return fmt.Errorf("testvm: %w", err)
	}
	os.Remove(dst)
	if err := os.Link(src, dst); err == nil {
		return nil
	}
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("testvm: %w", err)
	}
	defer in.Close()
	st, err := in.Stat()
	if err != nil {
		return fmt.Errorf("testvm: %w", err)
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, st.Mode().Perm())
	if err != nil {
		return fmt.Errorf("testvm: %w", err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("testvm: copying %s: %w", src, err)
	}
	return out.Close()
}

// prune removes older images (keeping the newest three) and kernels no
// kept image uses. Running VMs keep their open files.
func (b *builder) prune(keep string) {
	imgs, _ := filepath.Glob(filepath.Join(b.cache, "images", "*"))
	type ent struct {
		path string
		t    time.Time
	}
	var es []ent
	for _, p := range imgs {
		if st, err := os.Stat(p); err == nil && st.IsDir() {
			es = append(es, ent{p, st.ModTime()})
		}
	}
	sort.Slice(es, func(i, j int) bool { return es[i].t.After(es[j].t) })
	used := map[string]bool{}
	kept := 0
	for _, e := range es {
		if e.path != keep && (kept >= 3 || strings.HasSuffix(e.path, ".tmp")) {
			os.RemoveAll(e.path)
			continue
		}
		kept++
		if img, err := readImage(e.path); err == nil {
			used[kernelRef{img.KernelPackage, img.KernelPackageVersion}.dirName()] = true
		}
	}
	kernels, _ := filepath.Glob(filepath.Join(b.cache, "kernels", "*"))
	for _, k := range kernels {
		if !used[filepath.Base(k)] {
			os.RemoveAll(k)
		}
	}
}

// run executes a command and returns its stdout; errors carry stderr.
func run(ctx context.Context, dir, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, hostCmd(name), args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return stdout.String(), nil
}

// hostCmd finds a host program in PATH or, failing that, in the sbin and
// bin directories (depmod and modprobe live in /usr/sbin, which a normal
// user's PATH may lack).
func hostCmd(name string) string {
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, dir := range filepath.SplitList(toolPath) {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && st.Mode()&0o111 != 0 {
			return p
		}
	}
	return name
}

// moduleSigMagic ends a signed kernel module; before it come a 12-byte
// struct module_signature (sig_len big-endian in its last 4 bytes) and
// the signature itself.
const moduleSigMagic = "~Module signature appended~\n"

// stripModule copies a .ko without its signature: the guest kernel then
// skips verifying it (which costs time under TCG) and loads it anyway,
// since Debian does not enforce module signatures without Secure Boot.
func stripModule(src, dst string) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("testvm: %w", err)
	}
	if bytes.HasSuffix(data, []byte(moduleSigMagic)) {
		end := len(data) - len(moduleSigMagic)
		if end >= 12 {
			info := data[end-12 : end]
			n := int(info[3]) + int(info[4]) + int(uint32(info[8])<<24|uint32(info[9])<<16|uint32(info[10])<<8|uint32(info[11]))
			if n > 0 && end-12-n > 0 {
				data = data[:end-12-n]
			}
		}
	}
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return fmt.Errorf("testvm: %w", err)
	}
	return os.WriteFile(dst, data, 0o644)
}
