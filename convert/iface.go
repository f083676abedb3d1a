package convert

import (
	"context"
	"errors"
	"fmt"
	"io"
	"time"

	"github.com/dmconvert/dmconvert/dmtable"
)

// The engine owns these interfaces; dmconvert's real implementations live
// in system.go (kernel, LVM tools, block devices) and the unit tests use an
// in-memory fake that emulates linear, crypt and mirror over byte slices.

// ErrNoDevice is returned by DeviceMapper.Info for a name that does not
// exist. Implementations wrap their own not-found error with it (or return
// an error for which errors.Is(err, ErrNoDevice) holds).
var ErrNoDevice = errors.New("no such device-mapper device")

// DevInfo describes a device-mapper device.
type DevInfo struct {
	Name      string
	UUID      string
	Dev       dmtable.Dev
	Suspended bool
	EventNr   uint32
	OpenCount int32
	// Live reports a live table; Inactive a loaded, not yet active one.
	Live, Inactive bool
}

// DeviceMapper is what the engine needs from device-mapper.
type DeviceMapper interface {
	// Create makes a device with the table and activates it.
	Create(name, uuid string, t dmtable.Table) (DevInfo, error)
	// Load puts t in the inactive slot; Resume makes it live.
	Load(name string, t dmtable.Table) error
	// ClearInactive drops a table waiting in the inactive slot, if any
	// (the next Resume keeps the live one).
	ClearInactive(name string) error
	// Suspend with flush and file system freeze (the default).
	Suspend(name string) error
	// SuspendNoFlush suspends without flush or freeze: I/O that a
	// target holds back (a mirror with handle_errors holds each write a
	// leg failed) is requeued, and goes to the table live after the
	// resume instead of failing. In-flight I/O is still waited for.
	SuspendNoFlush(name string) error
	Resume(name string) error
	Remove(name string) error
	// RemoveDeferred removes the device now if nothing has it open, else
	// has the kernel remove it when the last opener closes it (removed
	// says which).
	RemoveDeferred(name string) (removed bool, err error)
	Info(name string) (DevInfo, error)
	// Table returns the live table, keys included.
	Table(name string) (dmtable.Table, error)
	// Status returns the status of every target of the live table, in
	// order.
	Status(name string) ([]dmtable.TargetStatus, error)
	// WaitEvent blocks until the device's event counter passes after, ctx
	// ends or timeout passes; it returns the counter seen.
	WaitEvent(ctx context.Context, name string, after uint32, timeout time.Duration) (uint32, error)
	// List returns every device.
	List() ([]DevInfo, error)
	// Deps returns the devices the live table of name uses.
	Deps(name string) ([]dmtable.Dev, error)
	// SetUUID gives a device without a UUID its UUID.
	SetUUID(name, uuid string) error
}

// Disk is direct (uncached) access to the disk being converted, for the
// header region. Writes are durable only after Flush.
type Disk interface {
	io.ReaderAt
	io.WriterAt
	Flush() error
	Close() error
}

// DiskInfo describes a block device.
type DiskInfo struct {
	Path             string
	Dev              dmtable.Dev
	Size             Sectors
	LogicalBlockSize uint32
}

// Host is the machine around the engine: block devices, mounts, users of
// a device.
type Host interface {
	// Stat describes the block device at path.
	Stat(path string) (DiskInfo, error)
	// OpenDisk opens the block device for direct I/O.
	OpenDisk(path string) (Disk, error)
	// FileDevice returns the block device holding the file system that
	// contains path (the nearest existing parent if path does not exist):
	// for a file system whose own device number is anonymous (btrfs)
	// the block device it was mounted from.
	FileDevice(path string) (dmtable.Dev, error)
	// MemoryFS names the memory-backed file system (tmpfs, ramfs)
	// holding path (the nearest existing parent if path does not
	// exist), "" for any other or when it cannot tell. A reboot or power
	// cut empties such a file system: a journal there does not outlive
	// the crash it exists for.
	MemoryFS(path string) string
	// Users lists what uses dev other than device-mapper: mount points,
	// swap, md arrays, holders that are not dm devices.
	Users(dev dmtable.Dev) ([]string, error)
	// NodePath is the path of a dm device's node (/dev/mapper/<name>).
	NodePath(name string) string
	// Lock takes an exclusive, non-blocking lock on the disk so two
	// dmconvert processes never work on it at once.
	Lock(d DiskInfo) (unlock func(), err error)
	// DevicePath finds a /dev path for a block device number.
	DevicePath(dev dmtable.Dev) (string, error)
}

// PV is what the engine needs to know about an LVM physical volume.
type PV struct {
	Device string
	UUID   string
	VG     string
	// Size is the PV size LVM records (sectors); every sector LVM may
	// use lies below it.
	Size Sectors
	// UsedEnd is the end of the last allocated extent.
	UsedEnd Sectors
	// PEStart, ExtentSize in sectors.
	PEStart, ExtentSize Sectors
	// VGDevices are the devices of every PV of the VG, VGPVUUIDs their
	// PV UUIDs (same order).
	VGDevices []string
	VGPVUUIDs []string
	// VGSeqno is the VG's metadata sequence number (lvm bumps it at
	// every change of the VG).
	VGSeqno uint64
	// Refusal, when not empty, says why LVM's state forbids converting
	// (shared VG, exported VG, missing PVs, ...).
	Refusal string
	// LVs of the VG on this PV (for the plan's description).
	LVs []LVInfo
	// FitSize returns the largest PV size not above limit that keeps
	// whole extents and every allocated one, or an error naming the LV
	// in the way. Nil when unknown.
	FitSize func(limit Sectors) (Sectors, error) `json:"-"`
}

// shrinkTarget is the size (sectors) to shrink the PV on dev to so that
// it fits in room: whole extents, never below an allocated one. When the
// PV can shrink that far, free is true and hint says how to do it by
// hand; when it cannot, hint says what is in the way.
func (pv *PV) shrinkTarget(room Sectors, dev string) (target Sectors, hint string, free bool) {
	target = room
	if pv.ExtentSize > 0 && target > pv.PEStart {
		target = pv.PEStart + (target-pv.PEStart)/pv.ExtentSize*pv.ExtentSize
	}
	free = pv.UsedEnd <= target
	var fitErr error
	if pv.FitSize != nil {
		if t, err := pv.FitSize(room); err == nil {
			target = t
		} else {
			free, fitErr = false, err
		}
	}
	if free {
		return target, fmt.Sprintf("make room: pvresize --setphysicalvolumesize %ds %s, or rerun with --shrink-pv", target, dev), true
	}
	if fitErr != nil {
		// FitSize's error names the LV in the way and what to do with it.
		return target, fmt.Sprintf("%v; then rerun with --shrink-pv", fitErr), false
	}
	return target, fmt.Sprintf("the PV's extents up to sector %d are in use, so it cannot shrink to %d sectors: move or reduce the LVs at its end (pvmove, lvreduce), then rerun with --shrink-pv", pv.UsedEnd, room), false
}

// LVInfo describes a logical volume for the plan's description.
type LVInfo struct {
	Name   string   `json:"name"`
	Active bool     `json:"active"`
	Public bool     `json:"public"`
	Layout []string `json:"layout,omitempty"`
}

// LayoutDiscoverer is implemented by a VolumeManager that can discover a
// PV more cheaply when the run leaves the PV's device and its size as they
// are (a rekey): DiscoverLayout is Discover without the PV size LVM's
// metadata records (one lvm command fewer), so PV.Size is the end of what
// LVM keeps on the PV.
type LayoutDiscoverer interface {
	DiscoverLayout(ctx context.Context, device string) (*PV, error)
}

// discoverInPlace discovers the PV on device for a run that does not move
// or resize it.
func (e *Engine) discoverInPlace(ctx context.Context, device string) (*PV, error) {
	if l, ok := e.LVM.(LayoutDiscoverer); ok {
		return l.DiscoverLayout(ctx, device)
	}
	return e.LVM.Discover(ctx, device)
}

// VolumeManager is what the engine needs from LVM.
type VolumeManager interface {
	Discover(ctx context.Context, device string) (*PV, error)
	// Fence keeps LVM from changing the VG until release is called.
	Fence(ctx context.Context, vg string) (release func() error, err error)
	// ShrinkPV sets the PV size LVM records.
	ShrinkPV(ctx context.Context, device string, size Sectors) error
	// Activate activates the VG's LVs using only the given devices.
	Activate(ctx context.Context, vg string, devices []string) error
	// Refresh tells LVM the PV moved from oldDev to newDev.
	Refresh(ctx context.Context, oldDev, newDev string) error
	// LocatePV finds the device that carries PV uuid now (hint: where it
	// was); "" when none does.
	LocatePV(ctx context.Context, uuid, hint string) string
	// State is a cheap look at the PV on device: its UUID, VG and the
	// VG's metadata sequence number.
	State(ctx context.Context, device string) (uuid, vg string, seqno uint64, err error)
}

// EventKind classifies progress events.
type EventKind string

// Progress event kinds.
const (
	EventPhase   EventKind = "phase"   // a phase begins
	EventChunk   EventKind = "chunk"   // a chunk is committed
	EventMessage EventKind = "message" // something the user should know
	EventDone    EventKind = "done"    // the run completed
)

// Event is one progress report.
type Event struct {
	Kind    EventKind `json:"event"`
	Phase   string    `json:"phase,omitempty"`
	Done    uint64    `json:"done_bytes"`
	Total   uint64    `json:"total_bytes"`
	Message string    `json:"message,omitempty"`
	// Stall is how long F was suspended for this step.
	Stall time.Duration `json:"stall_ns,omitempty"`
	Time  time.Time     `json:"time"`
}

// Progress receives events. It is called from the engine's goroutine,
// never while a device is suspended.
type Progress interface {
	Event(Event)
}

// NoProgress discards events.
type NoProgress struct{}

// Event implements Progress.
func (NoProgress) Event(Event) {}
