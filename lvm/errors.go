package lvm

import (
	"errors"
	"fmt"
	"strings"

	"github.com/dmconvert/dmconvert/dmtable"
	"golang.org/x/sys/unix"
)

// Sentinels. Every error this package returns that has one of these
// meanings matches it with errors.Is; the typed errors below carry the
// details (device, VG, LV, sizes).
var (
	// ErrNotPV: the device is not an LVM physical volume (no label), or
	// LVM does not report it (filtered out, not in the devices file).
	ErrNotPV = errors.New("not an LVM physical volume")
	// ErrNoVG: the device is a PV that belongs to no volume group.
	ErrNoVG = errors.New("physical volume is in no volume group")
	// ErrDuplicatePV: LVM sees the PV's label on more than one device and
	// did not choose the one asked about.
	ErrDuplicatePV = errors.New("duplicate physical volume")
	// ErrNoSuchVG: no volume group of that name.
	ErrNoSuchVG = errors.New("no such volume group")
	// ErrUnsupportedVG: a VG the engine must not touch (shared/lvmlockd,
	// clustered, exported, partial, a foreign system ID).
	ErrUnsupportedVG = errors.New("unsupported volume group")
	// ErrExtentsInUse: a shrink would cut allocated extents.
	ErrExtentsInUse = errors.New("extents in use")
	// ErrLockTimeout: the VG lock could not be taken in time; it also
	// matches unix.EWOULDBLOCK.
	ErrLockTimeout = errors.New("lvm lock busy")
	// ErrFenceReleased: a fenced operation after Release.
	ErrFenceReleased = errors.New("lvm fence already released")
	// ErrCommandFailed: an lvm command exited non-zero (see CommandError).
	ErrCommandFailed = errors.New("lvm command failed")
	// ErrBadReport: lvm's JSON output was not what this package expects.
	ErrBadReport = errors.New("unexpected lvm report")
)

// LVM's exit codes (tools/errors.h). lvm prints the reason in English on
// stderr; we keep the text for humans but decide only on the code.
const (
	ExitOK             = 0
	ExitNoSuchCommand  = 2 // ENO_SUCH_CMD
	ExitInvalidCmdLine = 3 // EINVALID_CMD_LINE: unknown option, bad value
	ExitInitFailed     = 4 // EINIT_FAILED
	ExitFailed         = 5 // ECMD_FAILED: the command ran and failed
)

// CommandError is a non-zero exit of an lvm command. Stderr is what lvm
// printed (trimmed), for the user; code never inspects it.
type CommandError struct {
	Args     []string // the full argv, lvm binary first
	ExitCode int      // -1 when the process did not exit normally
	Stderr   string
	Err      error // the exec error (exit status, signal, not found)
}

func (e *CommandError) Error() string {
	s := fmt.Sprintf("%s: exit status %d", strings.Join(e.Args, " "), e.ExitCode)
	if e.ExitCode < 0 && e.Err != nil {
		s = fmt.Sprintf("%s: %v", strings.Join(e.Args, " "), e.Err)
	}
	if e.Stderr != "" {
		s += ": " + e.Stderr
	}
	return s
}

func (e *CommandError) Unwrap() error { return e.Err }

// Is matches ErrCommandFailed.
func (e *CommandError) Is(target error) bool { return target == ErrCommandFailed }

// NotPVError: Device is not (reported as) a PV.
type NotPVError struct {
	Device string
	// Labelled: the device carries a valid LVM label in sectors 0-3, yet
	// lvm does not report it: it is filtered out (devices/filter,
	// global_filter), missing from the devices file, or hidden by --devices.
	Labelled bool
	// Err is lvm's failure, when it failed (nil when it just listed nothing).
	Err error
}

func (e *NotPVError) Error() string {
	if e.Labelled {
		s := fmt.Sprintf("%s carries an LVM label but lvm does not report it as a physical volume "+
			"(rejected by the lvm.conf filter, missing from the devices file, or not in --devices)", e.Device)
		if e.Err != nil {
			s += ": " + e.Err.Error()
		}
		return s
	}
	return fmt.Sprintf("%s is not an LVM physical volume (no LVM label in its first 4 sectors)", e.Device)
}

func (e *NotPVError) Unwrap() error { return e.Err }

// Is matches ErrNotPV.
func (e *NotPVError) Is(target error) bool { return target == ErrNotPV }

// DuplicateError: LVM sees PV UUID on several devices and uses Chosen, not
// Device. This is what happens while a conversion stacks a device that
// carries a copy of the PV label over the disk.
type DuplicateError struct {
	Device string
	UUID   string
	Chosen string // the device LVM uses for the PV ("" if unknown)
}

func (e *DuplicateError) Error() string {
	if e.Chosen == "" {
		return fmt.Sprintf("%s: PV %s is a duplicate that lvm does not use", e.Device, e.UUID)
	}
	return fmt.Sprintf("%s: PV %s is also on %s, and lvm uses %s (restrict lvm to one of them with --devices)",
		e.Device, e.UUID, e.Chosen, e.Chosen)
}

// Is matches ErrDuplicatePV.
func (e *DuplicateError) Is(target error) bool { return target == ErrDuplicatePV }

// VGError: a VG that the engine must refuse, and why.
type VGError struct {
	VG     string
	Reason string // "shared (lvmlockd lock type sanlock)", "exported", ...
}

func (e *VGError) Error() string {
	return fmt.Sprintf("volume group %s is %s; dmconvert only converts local, complete, writeable VGs", e.VG, e.Reason)
}

// Is matches ErrUnsupportedVG.
func (e *VGError) Is(target error) bool { return target == ErrUnsupportedVG }

// ShrinkError: a PV cannot shrink to Requested sectors because extents
// beyond it are allocated (to LV, the holder of the last allocated extent).
type ShrinkError struct {
	Device    string
	Requested dmtable.Sectors // the size asked for
	Minimum   dmtable.Sectors // the smallest size that keeps every allocated extent
	LV        string          // "vg/lv" holding the last allocated extent ("" if none)
	Extent    uint64          // that LV's last extent on the PV (PE number)
}

func (e *ShrinkError) Error() string {
	return fmt.Sprintf("cannot shrink PV %s to %d sectors: extent %d, the last allocated one, belongs to LV %s; "+
		"the PV cannot be smaller than %d sectors unless that LV is moved (pvmove) or reduced",
		e.Device, uint64(e.Requested), e.Extent, e.LV, uint64(e.Minimum))
}

// Is matches ErrExtentsInUse.
func (e *ShrinkError) Is(target error) bool { return target == ErrExtentsInUse }

// LockHolder is a process holding (not waiting for) a lock file, as
// /proc/locks shows it.
type LockHolder struct {
	PID     int
	Command string // /proc/<pid>/comm, "" if unreadable
	Write   bool   // exclusive
}

func (h LockHolder) String() string {
	mode := "shared"
	if h.Write {
		mode = "exclusive"
	}
	if h.Command != "" {
		return fmt.Sprintf("pid %d (%s, %s)", h.PID, h.Command, mode)
	}
	return fmt.Sprintf("pid %d (%s)", h.PID, mode)
}

// LockError: the VG lock file could not be taken.
type LockError struct {
	VG      string
	Path    string
	Holders []LockHolder // who held it when we gave up (best effort)
	Err     error        // unix.EWOULDBLOCK on timeout, the context error, or the open/flock error
}

func (e *LockError) Error() string {
	s := fmt.Sprintf("locking volume group %s (%s): %v", e.VG, e.Path, e.Err)
	if len(e.Holders) > 0 {
		hs := make([]string, len(e.Holders))
		for i, h := range e.Holders {
			hs[i] = h.String()
		}
		s += "; held by " + strings.Join(hs, ", ")
	}
	return s
}

func (e *LockError) Unwrap() error { return e.Err }

// Is matches ErrLockTimeout when the lock was busy until the deadline.
func (e *LockError) Is(target error) bool {
	return target == ErrLockTimeout && errors.Is(e.Err, unix.EWOULDBLOCK)
}
