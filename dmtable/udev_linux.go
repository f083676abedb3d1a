//go:build linux

package dmtable

// Device nodes and udev synchronisation.
//
// Without udev (UdevOff) the Client makes /dev/mapper/<name> itself: a
// block node with the device number from the kernel's answer, created on
// Create (and checked on Resume), renamed on Rename, removed on Remove.
//
// With udev (UdevOn) the Client speaks libdevmapper's cookie protocol, so
// the stock udev rules (10-dm.rules, 95-dm-notify.rules) work unchanged:
//
//  1. Before an ioctl that emits a uevent (resume, remove, rename) it
//     creates a SysV semaphore with key 0x0D4D<<16 | base (base a random
//     non-zero 16-bit value) and value 1: one uevent outstanding.
//  2. It passes (udev flags << 16) | base in dm_ioctl.event_nr; the kernel
//     puts that value in the uevent's DM_COOKIE variable.
//  3. udev processes the event and its last rule runs `dmsetup
//     udevcomplete $DM_COOKIE`, which decrements the semaphore.
//  4. If the kernel's answer lacks DM_UEVENT_GENERATED_FLAG (or the ioctl
//     failed), no uevent will come and the Client decrements it itself.
//  5. The Client waits for zero (semtimedop), then removes the semaphore.
//
// Waiting for udev's own confirmation, not polling for the node, is what
// makes the node's state certain when the call returns. The wait is
// bounded (Options.UdevTimeout): if udev never answers (rules missing,
// udev stuck) the Client falls back to managing the node itself.

import (
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// udev flags (libdevmapper.h), passed in the upper 16 bits of event_nr.
const (
	cookieMagic = 0x0D4D

	udevDisableDMRules        = 0x0001
	udevDisableSubsystemRules = 0x0002
	udevDisableDiskRules      = 0x0004
	udevDisableOtherRules     = 0x0008
	udevLowPriority           = 0x0010
	udevDisableLibraryFallbk  = 0x0020
	udevPrimarySource         = 0x0040

	// udevPrivate: what cryptsetup's temporary devices carry; udev
	// skips the disk and other rules (no probing, links, scans).
	udevPrivate = udevDisableDiskRules | udevDisableOtherRules
)

// SysV semaphore constants (linux/ipc.h, linux/sem.h).
const (
	ipcCreat  = 0o1000
	ipcExcl   = 0o2000
	ipcNowait = 0o4000
	ipcRmid   = 0
	semGetval = 12
	semSetval = 16
)

type sembuf struct {
	num uint16
	op  int16
	flg int16
}

// cookie is one udev notification semaphore.
type cookie struct {
	base  uint16
	semid int
}

func semget(key uint32, flags int) (int, error) {
	id, _, e := unix.Syscall(unix.SYS_SEMGET, uintptr(int32(key)), 1, uintptr(flags))
	if e != 0 {
		return -1, e
	}
	return int(id), nil
}

func semctl(id, cmd, val int) (int, error) {
	r, _, e := unix.Syscall6(unix.SYS_SEMCTL, uintptr(id), 0, uintptr(cmd), uintptr(val), 0, 0)
	if e != 0 {
		return -1, e
	}
	return int(r), nil
}

func semop(id int, op int16, flg int16, timeout *unix.Timespec) error {
	sb := sembuf{num: 0, op: op, flg: flg}
	_, _, e := unix.Syscall6(unix.SYS_SEMTIMEDOP, uintptr(id), uintptr(unsafe.Pointer(&sb)), 1, uintptr(unsafe.Pointer(timeout)), 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// newCookie creates a semaphore under a fresh random cookie, value 1.
func newCookie() (*cookie, error) {
	for tries := 0; tries < 100; tries++ {
		var b [2]byte
		if _, err := rand.Read(b[:]); err != nil {
			return nil, err
		}
		base := binary.LittleEndian.Uint16(b[:])
		if base == 0 {
			continue
		}
		id, err := semget(cookieMagic<<16|uint32(base), 0o600|ipcCreat|ipcExcl)
		if err == unix.EEXIST {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("creating semaphore: %w", err)
		}
		if _, err := semctl(id, semSetval, 1); err != nil {
			semctl(id, ipcRmid, 0)
			return nil, fmt.Errorf("setting semaphore: %w", err)
		}
		return &cookie{base: base, semid: id}, nil
	}
	return nil, errors.New("no free cookie value")
}

// semaphoresWork checks that SysV semaphores can be created here.
func semaphoresWork() error {
	ck, err := newCookie()
	if err != nil {
		return err
	}
	ck.destroy()
	return nil
}

// value is the cookie as `dmsetup udevcomplete` and `dmsetup udevcookies`
// show it: magic in the upper half.
func (c *cookie) value() uint32 { return cookieMagic<<16 | uint32(c.base) }

// eventNr is what goes into dm_ioctl.event_nr: flags in the upper half.
func (c *cookie) eventNr(flags uint16) uint32 { return uint32(flags)<<16 | uint32(c.base) }

// complete decrements the semaphore: one uevent accounted for.
func (c *cookie) complete() error {
	return semop(c.semid, -1, ipcNowait, nil)
}

// wait waits until the semaphore is zero. done is false when the timeout
// passed first.
func (c *cookie) wait(timeout time.Duration) (done bool, err error) {
	deadline := time.Now().Add(timeout)
	for {
		left := time.Until(deadline)
		if left <= 0 {
			return false, nil
		}
		ts := unix.NsecToTimespec(left.Nanoseconds())
		err := semop(c.semid, 0, 0, &ts)
		switch err {
		case nil, unix.EIDRM:
			return true, nil
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false, nil
		default:
			return false, err
		}
	}
}

func (c *cookie) destroy() { semctl(c.semid, ipcRmid, 0) }

// udevComplete does what `dmsetup udevcomplete <cookie>` does: decrement
// the semaphore named by a cookie value (flags in the upper half are
// replaced by the magic). Tests use it to play udev.
func udevComplete(v uint32) error {
	base := v & 0xffff
	if base == 0 {
		return nil
	}
	id, err := semget(cookieMagic<<16|base, 0)
	if err != nil {
		return fmt.Errorf("cookie %#x: %w", v, err)
	}
	return semop(id, -1, ipcNowait, nil)
}

// makeNode makes sure path is a block node for d.
func (c *Client) makeNode(name string, d Dev) error {
	if name == "" || name == "." || name == ".." || name == "control" {
		return fmt.Errorf("refusing node name %q", name)
	}
	if err := os.MkdirAll(c.devDir, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", c.devDir, err)
	}
	p := c.NodePath(name)
	want := unix.Mkdev(d.Major, d.Minor)
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err == nil {
		if st.Mode&unix.S_IFMT == unix.S_IFBLK && st.Rdev == want {
			return nil
		}
		if err := unix.Unlink(p); err != nil && err != unix.ENOENT {
			return fmt.Errorf("replacing stale node %s: %w", p, err)
		}
	}
	if err := unix.Mknod(p, unix.S_IFBLK|0o600, int(want)); err != nil && err != unix.EEXIST {
		return fmt.Errorf("mknod %s %s: %w", p, d, err)
	}
	return nil
}

func (c *Client) removeNode(name string) error {
	if name == "" || name == "control" {
		return nil
	}
	if err := unix.Unlink(c.NodePath(name)); err != nil && err != unix.ENOENT {
		return fmt.Errorf("removing node %s: %w", c.NodePath(name), err)
	}
	return nil
}

func (c *Client) renameNode(oldName, newName string, d Dev) error {
	if err := c.removeNode(oldName); err != nil {
		return err
	}
	return c.makeNode(newName, d)
}
