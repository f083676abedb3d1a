package convert

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dmconvert/dmconvert/dmtable"
	"github.com/dmconvert/dmconvert/lvm"
)

// The real machine: device-mapper through dmtable's ioctl client, block
// devices through direct I/O, and the host's mount and swap tables.

// KernelDM adapts a dmtable.Client to DeviceMapper.
type KernelDM struct{ C *dmtable.Client }

func dmErr(err error) error {
	if errors.Is(err, dmtable.ErrMissingDevice) {
		return err // the device exists; its table's reference does not
	}
	if errors.Is(err, dmtable.ErrNotFound) {
		return fmt.Errorf("%w: %w", ErrNoDevice, err)
	}
	return err
}

func infoOf(i dmtable.Info) DevInfo {
	return DevInfo{Name: i.Name, UUID: i.UUID, Dev: i.Dev, Suspended: i.Suspended, EventNr: i.EventNr,
		OpenCount: i.OpenCount, Live: i.LivePresent, Inactive: i.InactivePresent}
}

// Create implements DeviceMapper.
func (k KernelDM) Create(name, uuid string, t dmtable.Table) (DevInfo, error) {
	create := k.C.CreateWithTable
	if strings.HasPrefix(uuid, helperUUIDPrefix) {
		// A run's helper (and its cipher probe and key check): only
		// the run reads it, and it shows the disk's data under another
		// name (an old key's view can carry the same PV label or file
		// system UUID as the mapping). Nothing else should probe it.
		create = k.C.CreatePrivate
	}
	i, err := create(name, uuid, t)
	return infoOf(i), dmErr(err)
}

// Load implements DeviceMapper. A read-only device (a mapping opened
// with cryptsetup open --readonly, an LV of permission r) stays read-only:
// the kernel gives a device the mode of the table that goes live, so
// restacking it with a read-write table would make it writable. The
// run's helpers are always read-write.
func (k KernelDM) Load(name string, t dmtable.Table) error {
	if !strings.HasPrefix(name, helperNamePrefix) {
		if i, err := k.C.Info(name); err == nil && i.ReadOnly {
			_, err := k.C.LoadReadOnly(name, t)
			return dmErr(err)
		}
	}
	_, err := k.C.Load(name, t)
	return dmErr(err)
}

// ClearInactive implements DeviceMapper.
func (k KernelDM) ClearInactive(name string) error {
	_, err := k.C.ClearInactive(name)
	return dmErr(err)
}

// Suspend implements DeviceMapper.
func (k KernelDM) Suspend(name string) error {
	_, err := k.C.Suspend(name, 0)
	return dmErr(err)
}

// SuspendNoFlush implements DeviceMapper.
func (k KernelDM) SuspendNoFlush(name string) error {
	_, err := k.C.Suspend(name, dmtable.NoFlush)
	return dmErr(err)
}

// Resume implements DeviceMapper.
func (k KernelDM) Resume(name string) error {
	if strings.HasPrefix(name, helperNamePrefix) {
		// A helper resumed again (after an interrupted run) keeps the
		// udev flags it was created with.
		if i, err := k.C.Info(name); err == nil && strings.HasPrefix(i.UUID, helperUUIDPrefix) {
			_, err := k.C.ResumePrivate(name)
			return dmErr(err)
		}
	}
	_, err := k.C.Resume(name)
	return dmErr(err)
}

// Remove implements DeviceMapper.
func (k KernelDM) Remove(name string) error { return dmErr(k.C.Remove(name)) }

// RemoveDeferred implements DeviceMapper.
func (k KernelDM) RemoveDeferred(name string) (bool, error) {
	removed, err := k.C.RemoveDeferred(name)
	return removed, dmErr(err)
}

// Info implements DeviceMapper.
func (k KernelDM) Info(name string) (DevInfo, error) {
	i, err := k.C.Info(name)
	return infoOf(i), dmErr(err)
}

// Table implements DeviceMapper.
func (k KernelDM) Table(name string) (dmtable.Table, error) {
	t, err := k.C.Table(name)
	return t, dmErr(err)
}

// Status implements DeviceMapper.
func (k KernelDM) Status(name string) ([]dmtable.TargetStatus, error) {
	s, err := k.C.Status(name)
	return s, dmErr(err)
}

// WaitEvent implements DeviceMapper.
func (k KernelDM) WaitEvent(ctx context.Context, name string, after uint32, timeout time.Duration) (uint32, error) {
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	i, err := k.C.WaitEvent(wctx, name, after)
	if err != nil {
		if wctx.Err() != nil && ctx.Err() == nil {
			return i.EventNr, context.DeadlineExceeded
		}
		return i.EventNr, dmErr(err)
	}
	return i.EventNr, nil
}

// List implements DeviceMapper.
func (k KernelDM) List() ([]DevInfo, error) {
	l, err := k.C.List()
	if err != nil {
		return nil, err
	}
	out := make([]DevInfo, 0, len(l))
	for _, e := range l {
		out = append(out, DevInfo{Name: e.Name, UUID: e.UUID, Dev: e.Dev, EventNr: e.EventNr})
	}
	return out, nil
}

// Deps implements DeviceMapper.
func (k KernelDM) Deps(name string) ([]dmtable.Dev, error) {
	d, err := k.C.Deps(name)
	return d, dmErr(err)
}

// SetUUID implements DeviceMapper.
func (k KernelDM) SetUUID(name, uuid string) error { return dmErr(k.C.SetUUID(name, uuid)) }

// OSHost is the real Host.
type OSHost struct {
	// DevDir is where dm nodes live; default /dev/mapper.
	DevDir string
	// LockDir holds the per-disk lock files; default /run/dmconvert.
	LockDir string
}

// Stat implements Host.
func (h OSHost) Stat(path string) (DiskInfo, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return DiskInfo{}, fmt.Errorf("stat %s: %w", path, err)
	}
	if st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return DiskInfo{}, fmt.Errorf("%s is not a block device", path)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return DiskInfo{}, fmt.Errorf("open %s: %w", path, err)
	}
	defer unix.Close(fd)
	var size uint64
	if err := ioctlPtr(fd, unix.BLKGETSIZE64, &size); err != nil {
		return DiskInfo{}, fmt.Errorf("size of %s: %w", path, err)
	}
	lbs, err := unix.IoctlGetInt(fd, unix.BLKSSZGET)
	if err != nil {
		return DiskInfo{}, fmt.Errorf("logical block size of %s: %w", path, err)
	}
	return DiskInfo{
		Path: path,
		Dev:  dmtable.Dev{Major: unix.Major(st.Rdev), Minor: unix.Minor(st.Rdev)},
		Size: Sectors(size / 512), LogicalBlockSize: uint32(lbs),
	}, nil
}

// directDisk is a block device opened with O_DIRECT. Go's slices are not
// aligned, so I/O goes through a page-aligned bounce buffer; a write that
// does not cover whole logical blocks is a read-modify-write of them.
type directDisk struct {
	fd     int
	path   string
	lbs    int64
	bounce []byte
}

const bounceSize = 1 << 20

// OpenDisk implements Host.
func (h OSHost) OpenDisk(path string) (Disk, error) {
	fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	lbs, err := unix.IoctlGetInt(fd, unix.BLKSSZGET)
	if err != nil || lbs < 512 {
		lbs = 512
	}
	b, err := unix.Mmap(-1, 0, bounceSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("allocating an aligned buffer: %w", err)
	}
	return &directDisk{fd: fd, path: path, lbs: int64(lbs), bounce: b}, nil
}

func (d *directDisk) rw(p []byte, off int64, write bool) (int, error) {
	if off%d.lbs != 0 || int64(len(p))%d.lbs != 0 {
		// Widen to whole logical blocks.
		start := off / d.lbs * d.lbs
		end := (off + int64(len(p)) + d.lbs - 1) / d.lbs * d.lbs
		buf := make([]byte, end-start)
		if _, err := d.rw(buf, start, false); err != nil {
			return 0, err
		}
		if !write {
			return copy(p, buf[off-start:]), nil
		}
		copy(buf[off-start:], p)
		if _, err := d.rw(buf, start, true); err != nil {
			return 0, err
		}
		return len(p), nil
	}
	done := 0
	for done < len(p) {
		n := min(len(p)-done, len(d.bounce))
		buf := d.bounce[:n]
		var err error
		var m int
		if write {
			copy(buf, p[done:done+n])
			m, err = unix.Pwrite(d.fd, buf, off+int64(done))
		} else {
			m, err = unix.Pread(d.fd, buf, off+int64(done))
			copy(p[done:], buf[:max(m, 0)])
		}
		if err != nil {
			return done, fmt.Errorf("%s at %d: %w", d.path, off+int64(done), err)
		}
		if m != n {
			return done + max(m, 0), fmt.Errorf("%s at %d: short transfer (%d of %d bytes)", d.path, off+int64(done), m, n)
		}
		done += n
	}
	return done, nil
}

func (d *directDisk) ReadAt(p []byte, off int64) (int, error)  { return d.rw(p, off, false) }
func (d *directDisk) WriteAt(p []byte, off int64) (int, error) { return d.rw(p, off, true) }

// Flush makes every completed write durable: fsync on a block device
// flushes the device's volatile cache.
func (d *directDisk) Flush() error {
	if err := unix.Fsync(d.fd); err != nil {
		return fmt.Errorf("flushing %s: %w", d.path, err)
	}
	return nil
}

func (d *directDisk) Close() error {
	unix.Munmap(d.bounce)
	return unix.Close(d.fd)
}

// FileDevice implements Host.
func (h OSHost) FileDevice(path string) (dmtable.Dev, error) {
	p := path
	for {
		var st unix.Stat_t
		err := unix.Stat(p, &st)
		if err == nil {
			d := dmtable.Dev{Major: unix.Major(st.Dev), Minor: unix.Minor(st.Dev)}
			if d.Major != 0 {
				return d, nil
			}
			mi, err := os.ReadFile("/proc/self/mountinfo")
			if err != nil {
				return dmtable.Dev{}, err
			}
			real, err := filepath.EvalSymlinks(p)
			if err == nil {
				real, err = filepath.Abs(real)
			}
			if err != nil {
				return dmtable.Dev{}, fmt.Errorf("resolving %s: %w", p, err)
			}
			return mountedFrom(string(mi), d, real, blockDevAt), nil
		}
		if !errors.Is(err, unix.ENOENT) {
			return dmtable.Dev{}, fmt.Errorf("stat %s: %w", p, err)
		}
		parent := filepath.Dir(p)
		if parent == p {
			return dmtable.Dev{}, fmt.Errorf("no existing parent of %s", path)
		}
		p = parent
	}
}

// MemoryFS implements Host.
func (OSHost) MemoryFS(path string) string {
	for p := path; ; p = filepath.Dir(p) {
		var st unix.Statfs_t
		if err := unix.Statfs(p, &st); err == nil {
			return memoryFSName(int64(st.Type))
		} else if !errors.Is(err, unix.ENOENT) || filepath.Dir(p) == p {
			return ""
		}
	}
}

// memoryFSName names the memory-backed file systems among statfs's
// f_type values.
func memoryFSName(magic int64) string {
	switch magic {
	case unix.TMPFS_MAGIC:
		return "tmpfs"
	case unix.RAMFS_MAGIC:
		return "ramfs"
	}
	return ""
}

// mountedFrom resolves the anonymous device number (major 0: btrfs,
// tmpfs, overlay, NFS, FUSE) of the file system holding path (absolute,
// symlinks resolved) through mountinfo: the mount whose mount point is
// the longest prefix of path (the later of equal ones: it covers the
// others). Mounted from a block device (btrfs: the device named at
// mount, the first of several), that device, as blockDev resolves the
// mount source; anything else (tmpfs, network, FUSE, overlay) keeps its
// anonymous number, which no disk's stack contains. Not by the number
// itself: a btrfs subvolume's files have their own, which mountinfo
// does not show.
func mountedFrom(mountinfo string, d dmtable.Dev, path string, blockDev func(string) (dmtable.Dev, bool)) dmtable.Dev {
	best, src := -1, ""
	for _, line := range strings.Split(mountinfo, "\n") {
		// id parent major:minor root mountpoint options [optional...] - fstype source superoptions
		pre, post, ok := strings.Cut(line, " - ")
		f := strings.Fields(pre)
		g := strings.Fields(post)
		if !ok || len(f) < 5 || len(g) < 2 {
			continue
		}
		mp := unescapeMountinfo(f[4])
		if mp != "/" && path != mp && !strings.HasPrefix(path, mp+"/") {
			continue
		}
		if len(mp) >= best {
			best, src = len(mp), unescapeMountinfo(g[1])
		}
	}
	if best >= 0 {
		if b, ok := blockDev(src); ok {
			return b
		}
	}
	return d
}

// blockDevAt returns the number of the block device at path, if path is
// one (symlinks followed).
func blockDevAt(path string) (dmtable.Dev, bool) {
	var st unix.Stat_t
	if unix.Stat(path, &st) != nil || st.Mode&unix.S_IFMT != unix.S_IFBLK {
		return dmtable.Dev{}, false
	}
	return dmtable.Dev{Major: unix.Major(st.Rdev), Minor: unix.Minor(st.Rdev)}, true
}

// unescapeMountinfo undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, "\\") {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// Users implements Host: mounts and swap on dev, and holders in sysfs that
// are not device-mapper devices (md, bcache, ...).
func (h OSHost) Users(dev dmtable.Dev) ([]string, error) {
	var out []string
	if f, err := os.Open("/proc/self/mountinfo"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fs := strings.Fields(sc.Text())
			if len(fs) > 4 && fs[2] == dev.String() {
				out = append(out, "mounted at "+fs[4])
			}
		}
		f.Close()
	}
	if f, err := os.Open("/proc/swaps"); err == nil {
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fs := strings.Fields(sc.Text())
			if len(fs) == 0 || fs[0] == "Filename" {
				continue
			}
			if d, ok := blockDevAt(fs[0]); ok && d == dev {
				out = append(out, "swap")
			}
		}
		f.Close()
	}
	holders, _ := filepath.Glob(fmt.Sprintf("/sys/dev/block/%s/holders/*", dev))
	for _, hp := range holders {
		n := filepath.Base(hp)
		if !strings.HasPrefix(n, "dm-") {
			out = append(out, "held by "+n)
		}
	}
	return out, nil
}

// ProcessExists implements Processes.
func (h OSHost) ProcessExists(pid int) bool {
	// EPERM: it exists, owned by someone else.
	return unix.Kill(pid, 0) != unix.ESRCH
}

// CryptoAlgorithms implements CryptoAlgorithms: the names in
// /proc/crypto (algorithms built in or loaded as modules, and template
// instances such as xts(aes) once something allocated them).
func (h OSHost) CryptoAlgorithms() (map[string]bool, error) {
	b, err := os.ReadFile("/proc/crypto")
	if err != nil {
		return nil, err
	}
	return parseProcCrypto(string(b)), nil
}

// parseProcCrypto returns the "name" fields of /proc/crypto's text.
func parseProcCrypto(s string) map[string]bool {
	names := map[string]bool{}
	for _, l := range strings.Split(s, "\n") {
		k, v, ok := strings.Cut(l, ":")
		if ok && strings.TrimSpace(k) == "name" {
			names[strings.TrimSpace(v)] = true
		}
	}
	return names
}

// NodePath implements Host.
func (h OSHost) NodePath(name string) string {
	d := h.DevDir
	if d == "" {
		d = "/dev/mapper"
	}
	return filepath.Join(d, name)
}

// Aliases implements DeviceAliases: /dev/<kernel name> and the links
// under /dev/disk/by-* that lead to dev.
func (h OSHost) Aliases(dev dmtable.Dev) []string {
	var out []string
	if p, err := h.DevicePath(dev); err == nil {
		out = append(out, p)
	}
	links, _ := filepath.Glob("/dev/disk/by-*/*")
	for _, l := range links {
		var st unix.Stat_t
		if unix.Stat(l, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK &&
			unix.Major(st.Rdev) == dev.Major && unix.Minor(st.Rdev) == dev.Minor {
			out = append(out, l)
		}
	}
	return out
}

// lockFile is the file whose flock is a disk's run lock.
func (h OSHost) lockFile(disk dmtable.Dev) string {
	dir := h.LockDir
	if dir == "" {
		dir = "/run/dmconvert"
	}
	return filepath.Join(dir, disk.String()+".lock")
}

// LockHolder implements DiskLocks from /proc/locks: it only reads, so a
// plan never makes a run starting at the same moment find the lock taken.
func (h OSHost) LockHolder(disk dmtable.Dev) (int, bool) {
	for _, l := range lvm.LockHolders(h.lockFile(disk)) {
		if l.Write {
			return l.PID, true
		}
	}
	return 0, false
}

// Lock implements Host: an flock on /run/dmconvert/<major>:<minor>.lock.
func (h OSHost) Lock(d DiskInfo) (func(), error) {
	p := h.lockFile(d.Dev)
	if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
		return nil, fmt.Errorf("creating %s: %w", filepath.Dir(p), err)
	}
	fd, err := unix.Open(p, unix.O_RDWR|unix.O_CREAT|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", p, err)
	}
	if err := unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB); err != nil {
		unix.Close(fd)
		if errors.Is(err, unix.EWOULDBLOCK) {
			return nil, busy(d.Path, "another dmconvert process is working on it")
		}
		return nil, fmt.Errorf("locking %s: %w", p, err)
	}
	return func() { unix.Close(fd) }, nil
}

// DevicePath implements Host: the DEVNAME sysfs gives the device (udev's
// /dev/block/M:m links may not exist). A device-mapper device (a
// multipath map, a partition mapping, a crypt mapping under this one) is
// named by its /dev/mapper path, the name its administrator knows,
// when that node is the device.
func (h OSHost) DevicePath(dev dmtable.Dev) (string, error) {
	b, err := os.ReadFile(fmt.Sprintf("/sys/dev/block/%s/uevent", dev))
	if err != nil {
		return "", fmt.Errorf("no block device %s: %w", dev, err)
	}
	if name, err := os.ReadFile(fmt.Sprintf("/sys/dev/block/%s/dm/name", dev)); err == nil {
		p := "/dev/mapper/" + strings.TrimSpace(string(name))
		if d, ok := blockDevAt(p); ok && d == dev {
			return p, nil
		}
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "DEVNAME="); ok {
			p := "/dev/" + v
			var st unix.Stat_t
			if unix.Stat(p, &st) == nil && unix.Major(st.Rdev) == dev.Major && unix.Minor(st.Rdev) == dev.Minor {
				return p, nil
			}
			return "", fmt.Errorf("%s is not block device %s", p, dev)
		}
	}
	return "", fmt.Errorf("sysfs names no device node for %s", dev)
}

func ioctlPtr(fd int, req uint, v *uint64) error {
	_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(req), uintptrOf(v))
	if e != 0 {
		return e
	}
	return nil
}

// DefaultRegionSize is the mirror region size used unless configured: 4
// MiB, one region's copy at the dm-crypt rate stalls a write to it for
// well under 200 ms (see README, benchmarks).
const DefaultRegionSize Sectors = 8192

// LockMemory pins the process's pages, current and future, as they are
// touched (MCL_ONFAULT keeps untouched reservations, such as Go's heap
// arenas, out of RSS): nothing the engine needs while a device is
// suspended can be paged out to, or in from, a disk behind it.
func LockMemory() error {
	return unix.Mlockall(unix.MCL_CURRENT | unix.MCL_FUTURE | unix.MCL_ONFAULT)
}

// NewSystem returns an Engine on the real machine and a function that
// releases it.
func NewSystem() (*Engine, func() error, error) {
	// Suspends run in a helper process, which a kill -9 of dmconvert
	// does not stop half-way (a mirror whose suspend is killed in its
	// wait for I/O can never be suspended again: dmtable's
	// suspendhelper_linux.go).
	c, err := dmtable.Open(dmtable.Options{SuspendHelper: true})
	if err != nil {
		return nil, nil, fmt.Errorf("opening device-mapper: %w", err)
	}
	e := &Engine{
		DM:           KernelDM{C: c},
		Host:         OSHost{},
		LVM:          &LVMTool{C: &lvm.Client{Trace: lvmTrace}},
		RegionSize:   DefaultRegionSize,
		PollInterval: 2 * time.Second,
		// Before the run suspends anything: the helper's program is read
		// now, not while a device it may live behind is suspended.
		Lock: func() error {
			if err := c.StartSuspendHelper(); err != nil {
				// Suspends then run in this process, as before the helper.
				fmt.Fprintf(os.Stderr, "dmconvert: warning: %v; suspends run in this process (a kill -9 inside one could leave a mirror that never suspends again until a reboot)\n", err)
			}
			return LockMemory()
		},
		// The header's copy of the position, about once a second (the
		// journal records every chunk): two writes and two flushes of
		// the disk fewer per chunk.
		CheckpointEvery: time.Second,
	}
	return e, c.Close, nil
}
