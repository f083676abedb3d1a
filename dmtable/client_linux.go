//go:build linux

package dmtable

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// UdevMode says how the Client keeps /dev/mapper/<name> in step.
type UdevMode int

const (
	// UdevAuto uses UdevOn when udev is running (/run/udev/control exists)
	// and DM_DISABLE_UDEV is unset, UdevOff otherwise. This is what
	// libdevmapper decides, so dmsetup, lvm and we agree.
	UdevAuto UdevMode = iota
	// UdevOff: the Client creates, renames and removes the nodes itself and
	// tells any udev rules to keep out (DM_UDEV_DISABLE_DM_RULES_FLAG).
	UdevOff
	// UdevOn: udev creates the nodes; every operation that emits a uevent
	// carries a cookie and returns only once udev has processed it.
	UdevOn
)

// Options configure a Client. The zero value is the normal setting.
type Options struct {
	// ControlPath is the control node; default /dev/mapper/control.
	ControlPath string
	// DevDir is where device nodes live; default /dev/mapper.
	DevDir string
	// Udev selects node management; default UdevAuto.
	Udev UdevMode
	// UdevTimeout bounds the wait for udev to complete a cookie; after it
	// the Client checks the node itself and creates or removes it if udev
	// did not. Default 30 s.
	UdevTimeout time.Duration
	// SuspendHelper runs every Suspend in a helper process that a SIGKILL
	// of this one does not stop mid-way (see suspendhelper_linux.go: a
	// mirror whose suspend was killed can never be suspended again). The
	// helper is this program started again; it is started on the first
	// Suspend and ends with Close or with this process. If it cannot
	// run, suspends run in this process.
	SuspendHelper bool
}

// Client is a handle on the device-mapper control node. Every ioctl goes
// through one function (Client.ioctl). It holds no global state and is
// safe for concurrent use; close it when done.
type Client struct {
	ctl     *os.File
	ctlPath string
	devDir  string
	udev    bool
	udevTO  time.Duration
	kernel  [3]uint32
	helper  *suspendHelper // nil: suspends run in this process
}

// Open opens the control node and asks the kernel for its interface
// version.
func Open(o Options) (*Client, error) {
	c := &Client{
		ctlPath: o.ControlPath,
		devDir:  o.DevDir,
		udevTO:  o.UdevTimeout,
	}
	if c.ctlPath == "" {
		c.ctlPath = "/dev/mapper/control"
	}
	if c.devDir == "" {
		c.devDir = "/dev/mapper"
	}
	if c.udevTO <= 0 {
		c.udevTO = 30 * time.Second
	}
	switch o.Udev {
	case UdevOn:
		c.udev = true
		if err := semaphoresWork(); err != nil {
			return nil, &OpError{Op: "open", Device: c.ctlPath, Err: fmt.Errorf("udev synchronisation needs SysV semaphores: %w", err)}
		}
	case UdevOff:
		c.udev = false
	default:
		// Like libdevmapper: without working semaphores, no udev sync.
		c.udev = UdevRunning() && semaphoresWork() == nil
	}
	f, err := os.OpenFile(c.ctlPath, os.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		var errno unix.Errno
		if errors.As(err, &errno) {
			return nil, &OpError{Op: "open", Device: c.ctlPath, Err: errno}
		}
		return nil, &OpError{Op: "open", Device: c.ctlPath, Err: err}
	}
	c.ctl = f
	v, err := c.Version()
	if err != nil {
		f.Close()
		return nil, err
	}
	c.kernel = v
	if o.SuspendHelper {
		c.helper = &suspendHelper{}
	}
	return c, nil
}

// UdevRunning reports what UdevAuto decides: udev's control socket
// exists and DM_DISABLE_UDEV is not set.
func UdevRunning() bool {
	if os.Getenv("DM_DISABLE_UDEV") != "" {
		return false
	}
	_, err := os.Stat("/run/udev/control")
	return err == nil
}

// Close closes the control node.
func (c *Client) Close() error {
	if c.helper != nil {
		c.helper.mu.Lock()
		c.helper.stop()
		c.helper.broken = errors.New("closed")
		c.helper.mu.Unlock()
	}
	return c.ctl.Close()
}

// UsesUdev reports whether the Client synchronises with udev (UdevOn).
func (c *Client) UsesUdev() bool { return c.udev }

// KernelVersion is the kernel's dm ioctl interface version (e.g. 4.47.0).
func (c *Client) KernelVersion() [3]uint32 { return c.kernel }

// call describes one ioctl for the choke point.
type call struct {
	// uninterruptible: the ioctl runs with every signal blocked on its
	// thread (suspend: see Suspend).
	uninterruptible bool
	op              string
	dev             string // device name for errors
	cmd             uint
	req             request
	out             int  // initial room for the answer, bytes
	regrow          bool // the command is idempotent: retry with a bigger buffer on DM_BUFFER_FULL_FLAG
	secure          bool // DM_SECURE_DATA_FLAG, and wipe our buffers
	uevent          bool // the command emits a uevent (resume, remove, rename)
	// udevFlags are added to the uevent's udev flags (private devices).
	udevFlags uint16
}

// result is what the choke point returns: the reply header, a copy of the
// answer's data area, and whether udev confirmed the uevent.
type result struct {
	h        header
	data     []byte
	udevDone bool
}

const maxBuffer = 64 << 20

// ioctl is the one function every device-mapper ioctl goes through. It
// builds the struct dm_ioctl buffer (interface version, data_start after
// the header), sets the flags (secure data, udev flags and cookie),
// retries on EINTR, regrows the buffer when the kernel says
// DM_BUFFER_FULL_FLAG and the command may be repeated, waits for udev when
// a cookie was used, and wraps every failure in an *OpError.
func (c *Client) ioctl(fd int, cl *call) (result, error) {
	if err := checkNames(cl.req.name, cl.req.uuid); err != nil {
		return result{}, &OpError{Op: cl.op, Device: cl.dev, Err: fmt.Errorf("%v: %w", err, unix.EINVAL)}
	}
	req := cl.req
	if cl.secure {
		req.flags |= flagSecureData
	}
	var ck *cookie
	if cl.uevent {
		if c.udev {
			var err error
			if ck, err = newCookie(); err != nil {
				return result{}, &OpError{Op: cl.op, Device: cl.dev, Err: fmt.Errorf("udev cookie: %w", err)}
			}
			defer ck.destroy()
			req.eventNr = ck.eventNr(udevPrimarySource | cl.udevFlags)
		} else {
			// Tell udev rules, if any run, to leave the nodes to us
			// (what libdevmapper does when DM_DISABLE_UDEV is set).
			req.eventNr = uint32(udevPrimarySource|udevDisableDMRules|udevDisableSubsystemRules|cl.udevFlags) << 16
		}
	}
	size := dmIoctlSize + len(req.data) + cl.out
	if cl.uninterruptible {
		restore, err := blockSignals()
		if err != nil {
			return result{}, &OpError{Op: cl.op, Device: cl.dev, Err: err}
		}
		defer restore()
	}
	for {
		buf := req.encode(size)
		_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), uintptr(ioctlNumber(cl.cmd)), uintptr(unsafe.Pointer(&buf[0])))
		if e == unix.EINTR {
			if cl.secure {
				clear(buf)
			}
			continue
		}
		h := decodeHeader(buf)
		var res result
		res.h = h
		if e == 0 {
			if d := replyData(buf, h); len(d) > 0 {
				res.data = append([]byte(nil), d...)
			}
		}
		if cl.secure {
			clear(buf)
		}
		if e != 0 {
			if ck != nil {
				// No uevent will come: complete our own cookie.
				ck.complete()
			}
			return res, &OpError{Op: cl.op, Device: cl.dev, Err: e}
		}
		if h.flags&flagBufferFull != 0 && cl.regrow {
			if cl.secure {
				clear(res.data)
			}
			if size >= maxBuffer {
				return res, &OpError{Op: cl.op, Device: cl.dev, Err: fmt.Errorf("answer larger than %d bytes: %w", maxBuffer, unix.ENOBUFS)}
			}
			size *= 2
			continue
		}
		if ck != nil {
			// Without a uevent udev will not touch the node: account for
			// it ourselves, and leave the node to the caller (udevDone
			// false).
			generated := h.flags&flagUeventGenerated != 0
			if !generated {
				ck.complete()
			}
			done, err := ck.wait(c.udevTO)
			if err != nil {
				return res, &OpError{Op: cl.op, Device: cl.dev, Err: fmt.Errorf("waiting for udev: %w", err)}
			}
			res.udevDone = generated && done
		}
		return res, nil
	}
}

func (c *Client) do(cl *call) (result, error) { return c.ioctl(int(c.ctl.Fd()), cl) }

// Info is the state of a device as DM_DEV_STATUS (and most replies)
// report it.
type Info struct {
	Name string
	UUID string
	Dev  Dev
	// OpenCount is the number of openers of the device.
	OpenCount int32
	// EventNr counts the device's events (WaitEvent waits for a change).
	EventNr uint32
	// TargetCount is the number of targets of the live table.
	TargetCount       uint32
	Suspended         bool
	LivePresent       bool // a live (active) table is loaded
	InactivePresent   bool // an inactive table waits for Resume
	ReadOnly          bool
	DeferredRemove    bool
	InternalSuspended bool
}

func infoFrom(h header) Info {
	return Info{
		Name:              h.name,
		UUID:              h.uuid,
		Dev:               decodeDev(h.dev),
		OpenCount:         h.openCount,
		EventNr:           h.eventNr,
		TargetCount:       h.targetCount,
		Suspended:         h.flags&flagSuspend != 0,
		LivePresent:       h.flags&flagActivePresent != 0,
		InactivePresent:   h.flags&flagInactivePresent != 0,
		ReadOnly:          h.flags&flagReadonly != 0,
		DeferredRemove:    h.flags&flagDeferredRemove != 0,
		InternalSuspended: h.flags&flagInternalSuspend != 0,
	}
}

// Version asks the kernel for its dm ioctl interface version.
func (c *Client) Version() ([3]uint32, error) {
	r, err := c.do(&call{op: "version", cmd: cmdVersion})
	if err != nil {
		return [3]uint32{}, err
	}
	return r.h.version, nil
}

// List lists every device-mapper device, with UUIDs and event numbers
// when the kernel reports them.
func (c *Client) List() ([]DeviceEntry, error) {
	r, err := c.do(&call{op: "list", cmd: cmdListDevices, req: request{flags: flagUUID}, out: 16 << 10, regrow: true})
	if err != nil {
		return nil, err
	}
	l, err := decodeNameList(r.data, r.h.version[1])
	if err != nil {
		return nil, &OpError{Op: "list", Err: err}
	}
	return l, nil
}

// Create creates a device with no table (suspended; I/O to it fails until
// a table is loaded and resumed). uuid may be empty. Without udev the
// Client creates /dev/mapper/<name>.
func (c *Client) Create(name, uuid string) (Info, error) {
	r, err := c.do(&call{op: "create", dev: name, cmd: cmdDevCreate, req: request{name: name, uuid: uuid}})
	if err != nil {
		return Info{}, err
	}
	info := infoFrom(r.h)
	if !c.udev {
		if err := c.makeNode(name, info.Dev); err != nil {
			return info, &OpError{Op: "create", Device: name, Err: err}
		}
	}
	return info, nil
}

// CreateWithTable creates a device, loads t and resumes it: the device
// is live when it returns. On failure after the create it removes the
// device again.
func (c *Client) CreateWithTable(name, uuid string, t Table) (Info, error) {
	return c.createWithTable(name, uuid, t, 0)
}

// CreatePrivate is CreateWithTable for a device only its creator uses (a
// converter's helper, as cryptsetup's temporary devices): its uevents
// tell udev rules to skip the disk and other rules, so nothing probes
// it (no blkid, no /dev/disk links, no LVM scan, no systemd unit); the
// /dev/mapper node is still made. Events not sent by this package (a
// change after the device is closed) keep the flags, which the rules
// read back from udev's database; a later resume must be ResumePrivate.
func (c *Client) CreatePrivate(name, uuid string, t Table) (Info, error) {
	return c.createWithTable(name, uuid, t, udevPrivate)
}

func (c *Client) createWithTable(name, uuid string, t Table, udevFlags uint16) (Info, error) {
	if _, err := c.Create(name, uuid); err != nil {
		return Info{}, err
	}
	if _, err := c.Load(name, t); err != nil {
		c.Remove(name)
		return Info{}, err
	}
	info, err := c.resume(name, udevFlags)
	if err != nil {
		c.Remove(name)
		return Info{}, err
	}
	return info, nil
}

// needsSecure reports whether a table may carry secrets (anything but the
// key-less targets), so that the kernel wipes its copy of the buffer.
func needsSecure(t Table) bool {
	for _, tg := range t {
		switch tg.Params.(type) {
		case *Linear, *Striped, *Mirror, *Error, *Zero:
		default:
			return true
		}
	}
	return false
}

// Load loads t into the device's inactive slot; Resume makes it live. Load
// sends t as it is: call t.Validate first if you want the model's checks;
// the kernel's verdict is in the error (ErrInvalid, with the reason in
// dmesg). Keys go to the kernel here, with DM_SECURE_DATA_FLAG.
// The table is read-write; LoadReadOnly loads a read-only one.
func (c *Client) Load(name string, t Table) (Info, error) { return c.load(name, t, false) }

// LoadReadOnly is Load for a read-only table (DM_READONLY_FLAG): once
// live, the device refuses writes, as one opened with cryptsetup open
// --readonly or an LV of permission r does. A device keeps the mode of
// the table that is live, so a reload that must keep a read-only device
// read-only uses this.
func (c *Client) LoadReadOnly(name string, t Table) (Info, error) { return c.load(name, t, true) }

func (c *Client) load(name string, t Table, readOnly bool) (Info, error) {
	if len(t) == 0 {
		return Info{}, &OpError{Op: "load", Device: name, Err: fmt.Errorf("empty table: %w", unix.EINVAL)}
	}
	for i, tg := range t {
		if tg.Params == nil {
			return Info{}, &OpError{Op: "load", Device: name, Err: fmt.Errorf("target %d has no parameters: %w", i, unix.EINVAL)}
		}
	}
	data, err := encodeTargets(t)
	if err != nil {
		return Info{}, &OpError{Op: "load", Device: name, Err: fmt.Errorf("%v: %w", err, unix.EINVAL)}
	}
	defer clear(data)
	var flags uint32
	if readOnly {
		flags |= flagReadonly
	}
	r, err := c.do(&call{op: "load", dev: name, cmd: cmdTableLoad, secure: needsSecure(t),
		req: request{name: name, targetCount: uint32(len(t)), data: data, flags: flags}})
	if err != nil {
		var errno unix.Errno
		if errors.As(err, &errno) && (errno == unix.ENXIO || errno == unix.ENODEV) {
			// The same errno says the device itself is missing; if it
			// exists, a device its table refers to is.
			if _, ierr := c.Info(name); ierr == nil {
				return Info{}, &OpError{Op: "load", Device: name, Err: fmt.Errorf("%w: %w", ErrMissingDevice, errno)}
			}
		}
		return Info{}, err
	}
	return infoFrom(r.h), nil
}

// ClearInactive drops the inactive table, if any.
func (c *Client) ClearInactive(name string) (Info, error) {
	r, err := c.do(&call{op: "clear", dev: name, cmd: cmdTableClear, req: request{name: name}})
	if err != nil {
		return Info{}, err
	}
	return infoFrom(r.h), nil
}

// SuspendFlags modify Suspend.
type SuspendFlags uint32

const (
	// NoFlush suspends without flushing I/O queued in targets (the
	// queued I/O is kept and resubmitted on resume).
	NoFlush SuspendFlags = 1 << iota
	// SkipLockfs does not freeze a file system mounted on the device.
	SkipLockfs
)

// Suspend suspends the device: it returns once in-flight I/O has
// completed; new I/O waits until Resume. Suspending a suspended device is
// not an error.
//
// The ioctl runs with every signal blocked on its thread. The kernel waits
// for in-flight I/O interruptibly; a signal (for a Go program, the
// runtime's SIGURG preemption alone suffices) ends the wait with EINTR,
// after the targets' presuspend hooks ran, and only targets with a
// presuspend_undo hook are undone. dm-raid1 (the mirror target) has none:
// its presuspend took every region-recovery slot, so the next suspend of
// the same table (the retry) blocks for ever in dm_rh_stop_recovery with
// no I/O in flight. A blocked signal waits until the ioctl returns.
// SIGKILL cannot be blocked: with Options.SuspendHelper the ioctl runs in
// a helper process that outlives a kill of this one.
func (c *Client) Suspend(name string, flags SuspendFlags) (Info, error) {
	if c.helper != nil {
		if info, err, ok := c.helper.suspend(name, flags); ok {
			return info, err
		}
	}
	return c.suspendHere(name, flags)
}

// suspendHere is Suspend in this process.
func (c *Client) suspendHere(name string, flags SuspendFlags) (Info, error) {
	f := uint32(flagSuspend)
	if flags&NoFlush != 0 {
		f |= flagNoflush
	}
	if flags&SkipLockfs != 0 {
		f |= flagSkipLockfs
	}
	r, err := c.do(&call{op: "suspend", dev: name, cmd: cmdDevSuspend, req: request{name: name, flags: f}, uninterruptible: true})
	if err != nil {
		return Info{}, err
	}
	return infoFrom(r.h), nil
}

// Resume makes the inactive table live, if one is loaded, and resumes
// I/O. Without udev it makes sure /dev/mapper/<name> exists; with udev it
// returns once udev has processed the change event.
func (c *Client) Resume(name string) (Info, error) { return c.resume(name, 0) }

// ResumePrivate is Resume for a device made by CreatePrivate: its
// uevent carries the same udev flags.
func (c *Client) ResumePrivate(name string) (Info, error) {
	return c.resume(name, udevPrivate)
}

func (c *Client) resume(name string, udevFlags uint16) (Info, error) {
	r, err := c.do(&call{op: "resume", dev: name, cmd: cmdDevSuspend, uevent: true, udevFlags: udevFlags, req: request{name: name}})
	if err != nil {
		return Info{}, err
	}
	info := infoFrom(r.h)
	if !c.udev || !r.udevDone {
		if err := c.makeNode(name, info.Dev); err != nil {
			return info, &OpError{Op: "resume", Device: name, Err: err}
		}
	}
	return info, nil
}

// Remove removes the device (it must not be open) and its node.
func (c *Client) Remove(name string) error {
	remove := &call{op: "remove", dev: name, cmd: cmdDevRemove, uevent: true, req: request{name: name}}
	r, err := c.do(remove)
	// A device can be open for a moment when it is removed: with udev
	// running, closing a device that was open for writing makes udev
	// probe it (the rules' inotify watch: blkid opens it); with or
	// without udev, any lvm command scanning devices at that moment
	// opens it to look for a label (seen in the VM: a resume's removal
	// of its helper failed with EBUSY while another dmconvert's lvm
	// scan ran). As libdevmapper's removal retry does, try again for a
	// while.
	for try := 0; err != nil && errors.Is(err, unix.EBUSY) && try < removeRetries; try++ {
		time.Sleep(removeRetryWait)
		r, err = c.do(remove)
	}
	if err != nil {
		return err
	}
	if !c.udev || !r.udevDone {
		if err := c.removeNode(name); err != nil {
			return &OpError{Op: "remove", Device: name, Err: err}
		}
	}
	return nil
}

// removeRetries and removeRetryWait bound Remove's retries of a device
// found open (libdevmapper's: 25 times, 200 ms apart).
const (
	removeRetries   = 25
	removeRetryWait = 200 * time.Millisecond
)

// RemoveDeferred removes the device now if it is not open, otherwise
// marks it to be removed by the kernel when its last opener closes it.
// removed reports whether it is gone already (its node is then removed).
func (c *Client) RemoveDeferred(name string) (removed bool, err error) {
	r, err := c.do(&call{op: "remove", dev: name, cmd: cmdDevRemove, uevent: true, req: request{name: name, flags: flagDeferredRemove}})
	if err != nil {
		return false, err
	}
	// The kernel clears DM_DEFERRED_REMOVE in the answer when it removed
	// the device at once and leaves it set when it only marked it.
	if r.h.flags&flagDeferredRemove != 0 {
		return false, nil
	}
	if !c.udev || !r.udevDone {
		if err := c.removeNode(name); err != nil {
			return true, &OpError{Op: "remove", Device: name, Err: err}
		}
	}
	return true, nil
}

// Rename renames the device (and its node).
func (c *Client) Rename(name, newName string) error {
	if err := checkNames(newName, ""); err != nil {
		return &OpError{Op: "rename", Device: name, Err: fmt.Errorf("new name: %v: %w", err, unix.EINVAL)}
	}
	r, err := c.do(&call{op: "rename", dev: name, cmd: cmdDevRename, uevent: true,
		req: request{name: name, data: encodeString(newName)}})
	if err != nil {
		return err
	}
	if !c.udev || !r.udevDone {
		if err := c.renameNode(name, newName, decodeDev(r.h.dev)); err != nil {
			return &OpError{Op: "rename", Device: name, Err: err}
		}
	}
	return nil
}

// SetUUID sets the UUID of a device that has none (the kernel refuses to
// change a UUID once set: ErrInvalid).
func (c *Client) SetUUID(name, uuid string) error {
	if err := checkNames("", uuid); err != nil || uuid == "" {
		return &OpError{Op: "set-uuid", Device: name, Err: fmt.Errorf("bad uuid %q: %w", uuid, unix.EINVAL)}
	}
	_, err := c.do(&call{op: "set-uuid", dev: name, cmd: cmdDevRename, uevent: true,
		req: request{name: name, flags: flagUUID, data: encodeString(uuid)}})
	return err
}

// Info reports the device's state.
func (c *Client) Info(name string) (Info, error) {
	r, err := c.do(&call{op: "info", dev: name, cmd: cmdDevStatus, req: request{name: name}})
	if err != nil {
		return Info{}, err
	}
	return infoFrom(r.h), nil
}

// Table returns the live table, keys included (it asks with
// DM_SECURE_DATA_FLAG and wipes its buffers; the parsed Keys hold the
// material).
func (c *Client) Table(name string) (Table, error) {
	t, _, err := c.table(name, false)
	return t, err
}

// InactiveTable returns the inactive table, nil if none is loaded.
func (c *Client) InactiveTable(name string) (Table, error) {
	t, present, err := c.table(name, true)
	if err != nil || !present {
		return nil, err
	}
	return t, nil
}

func (c *Client) table(name string, inactive bool) (Table, bool, error) {
	f := uint32(flagStatusTable)
	if inactive {
		f |= flagQueryInactive
	}
	r, err := c.do(&call{op: "table", dev: name, cmd: cmdTableStatus, out: 16 << 10, regrow: true, secure: true,
		req: request{name: name, flags: f}})
	if err != nil {
		return nil, false, err
	}
	defer clear(r.data)
	present := r.h.flags&flagActivePresent != 0
	if inactive {
		present = r.h.flags&flagInactivePresent != 0
	}
	if !present {
		return nil, false, nil
	}
	raw, err := decodeTargets(r.data, r.h.targetCount)
	if err != nil {
		return nil, true, &OpError{Op: "table", Device: name, Err: err}
	}
	t := make(Table, 0, len(raw))
	for _, rt := range raw {
		p, err := ParseParams(rt.typ, strings.Fields(rt.params))
		if err != nil {
			return nil, true, &OpError{Op: "table", Device: name, Err: fmt.Errorf("target at %d (%s): %w", rt.start, rt.typ, err)}
		}
		t = append(t, Target{Start: rt.start, Length: rt.length, Params: p})
	}
	return t, true, nil
}

// Status returns the status of every target of the live table.
func (c *Client) Status(name string) ([]TargetStatus, error) {
	r, err := c.do(&call{op: "status", dev: name, cmd: cmdTableStatus, out: 16 << 10, regrow: true,
		req: request{name: name}})
	if err != nil {
		return nil, err
	}
	if r.h.flags&flagActivePresent == 0 {
		return nil, nil
	}
	raw, err := decodeTargets(r.data, r.h.targetCount)
	if err != nil {
		return nil, &OpError{Op: "status", Device: name, Err: err}
	}
	out := make([]TargetStatus, 0, len(raw))
	for _, rt := range raw {
		s, err := newTargetStatus(rt.start, rt.length, rt.typ, rt.params)
		if err != nil {
			return nil, &OpError{Op: "status", Device: name, Err: err}
		}
		out = append(out, s)
	}
	return out, nil
}

// Deps lists the devices the live table uses.
func (c *Client) Deps(name string) ([]Dev, error) {
	r, err := c.do(&call{op: "deps", dev: name, cmd: cmdTableDeps, out: 4 << 10, regrow: true, req: request{name: name}})
	if err != nil {
		return nil, err
	}
	d, err := decodeDeps(r.data)
	if err != nil {
		return nil, &OpError{Op: "deps", Device: name, Err: err}
	}
	return d, nil
}

// Wait blocks in the kernel (DM_DEV_WAIT) until the device's event number
// differs from eventNr, and returns the device's state then. It cannot be
// cancelled; WaitEvent can.
func (c *Client) Wait(name string, eventNr uint32) (Info, error) {
	// The kernel would append the status after the wait; we do not need it
	// and must not repeat the wait on DM_BUFFER_FULL_FLAG, so no regrow.
	r, err := c.do(&call{op: "wait", dev: name, cmd: cmdDevWait, req: request{name: name, eventNr: eventNr}})
	if err != nil {
		return Info{}, err
	}
	return infoFrom(r.h), nil
}

// WaitEvent waits until the device's event number differs from eventNr
// (a mirror finishing its resynchronisation raises an event), or ctx is
// done. It arms DM_DEV_ARM_POLL on a control handle of its own, checks the
// event number, and poll()s the handle: the kernel marks it readable on
// every device-mapper event, so no event between the check and the poll
// is lost.
func (c *Client) WaitEvent(ctx context.Context, name string, eventNr uint32) (Info, error) {
	fd, err := unix.Open(c.ctlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return Info{}, &OpError{Op: "wait", Device: name, Err: err}
	}
	defer unix.Close(fd)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return Info{}, &OpError{Op: "wait", Device: name, Err: err}
	}
	// The cancellation callback may still be running when we return (stop
	// does not wait for it): it writes only while the pipe is open, under
	// the mutex we hold to close it.
	var mu sync.Mutex
	closed := false
	defer func() {
		mu.Lock()
		closed = true
		unix.Close(p[0])
		unix.Close(p[1])
		mu.Unlock()
	}()
	stop := context.AfterFunc(ctx, func() {
		mu.Lock()
		if !closed {
			unix.Write(p[1], []byte{0})
		}
		mu.Unlock()
	})
	defer stop()
	for {
		if _, err := c.ioctl(fd, &call{op: "wait", dev: name, cmd: cmdDevArmPoll}); err != nil {
			return Info{}, err
		}
		info, err := c.Info(name)
		if err != nil {
			return info, err
		}
		if info.EventNr != eventNr {
			return info, nil
		}
		if err := ctx.Err(); err != nil {
			return info, &OpError{Op: "wait", Device: name, Err: err}
		}
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}, {Fd: int32(p[0]), Events: unix.POLLIN}}
		for {
			_, err := unix.Poll(fds, -1)
			if err == unix.EINTR {
				continue
			}
			if err != nil {
				return info, &OpError{Op: "wait", Device: name, Err: err}
			}
			break
		}
		if fds[1].Revents != 0 {
			return info, &OpError{Op: "wait", Device: name, Err: ctx.Err()}
		}
	}
}

// TargetVersions lists the target types the kernel has loaded.
func (c *Client) TargetVersions() ([]TargetVersion, error) {
	r, err := c.do(&call{op: "target-versions", cmd: cmdListVersions, out: 8 << 10, regrow: true})
	if err != nil {
		return nil, err
	}
	v, err := decodeVersions(r.data)
	if err != nil {
		return nil, &OpError{Op: "target-versions", Err: err}
	}
	return v, nil
}

// TargetVersion asks for one target type (DM_GET_TARGET_VERSION), which
// makes the kernel load its module if needed. ErrInvalid: no such type.
func (c *Client) TargetVersion(typ string) (TargetVersion, error) {
	r, err := c.do(&call{op: "target-version", dev: typ, cmd: cmdGetTargetVersion, out: 512, regrow: true,
		req: request{name: typ}})
	if err != nil {
		return TargetVersion{}, err
	}
	v, err := decodeVersions(r.data)
	if err != nil || len(v) != 1 {
		return TargetVersion{}, &OpError{Op: "target-version", Device: typ, Err: fmt.Errorf("bad answer: %v", err)}
	}
	return v[0], nil
}

// Message sends a message to the target at sector (e.g. "@cancel_deferred_remove"
// to the device, or a target-specific message) and returns the target's
// answer, if any. The message may hold a key (dm-crypt "key set"): it is
// sent with DM_SECURE_DATA_FLAG.
func (c *Client) Message(name string, sector Sectors, msg string) (string, error) {
	data := encodeMessage(sector, msg)
	defer clear(data)
	// Not idempotent: no regrow; a truncated answer is an error.
	r, err := c.do(&call{op: "message", dev: name, cmd: cmdTargetMsg, out: 16 << 10, secure: true,
		req: request{name: name, data: data}})
	if err != nil {
		return "", err
	}
	if r.h.flags&flagBufferFull != 0 {
		return "", &OpError{Op: "message", Device: name, Err: fmt.Errorf("answer truncated: %w", unix.ENOBUFS)}
	}
	if r.h.flags&flagDataOut == 0 {
		return "", nil
	}
	return cString(r.data), nil
}

// NodePath is the path of the device's node, /dev/mapper/<name>.
func (c *Client) NodePath(name string) string { return filepath.Join(c.devDir, name) }

// blockSignals locks the calling goroutine to its thread and blocks every
// signal on it; restore unblocks them (pending ones are then delivered)
// and unlocks. Process-directed signals go to other threads meanwhile.
func blockSignals() (restore func(), err error) {
	runtime.LockOSThread()
	var all, old unix.Sigset_t
	for i := range all.Val {
		all.Val[i] = ^all.Val[i]
	}
	if err := unix.PthreadSigmask(unix.SIG_SETMASK, &all, &old); err != nil {
		runtime.UnlockOSThread()
		return nil, fmt.Errorf("blocking signals: %w", err)
	}
	return func() {
		unix.PthreadSigmask(unix.SIG_SETMASK, &old, nil)
		runtime.UnlockOSThread()
	}, nil
}
