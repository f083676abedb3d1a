package dmtable

import (
	"errors"

	"golang.org/x/sys/unix"
)

// Sentinel errors. An *OpError matches the sentinel of its errno through
// errors.Is, and the errno itself too:
//
//	errors.Is(err, dmtable.ErrBusy) && errors.Is(err, unix.EBUSY)
//
// The kernel answers EBUSY both for "device is open" and for "that name
// or UUID is already taken"; the operation tells them apart: EBUSY from
// create, rename or set-uuid is ErrExists, from anything else ErrBusy.
var (
	// ErrBusy: the device is in use (open, or held by another device); EBUSY.
	ErrBusy = errors.New("device busy")
	// ErrNotFound: no such device; ENXIO (or ENODEV).
	ErrNotFound = errors.New("no such device")
	// ErrExists: the name or UUID is already taken; EBUSY from create and
	// rename (the kernel's answer for a duplicate), or EEXIST.
	ErrExists = errors.New("device already exists")
	// ErrInvalid: the kernel refused the request (a bad table, a bad
	// name, a UUID that is already set); EINVAL. dmesg says why.
	ErrInvalid = errors.New("invalid request")
	// ErrPermission: not allowed (device-mapper needs CAP_SYS_ADMIN);
	// EACCES or EPERM.
	ErrPermission = errors.New("permission denied")
	// ErrNoDeviceMapper: the kernel has no device-mapper control node
	// (ENOENT on /dev/mapper/control) or it does not answer dm ioctls
	// (ENOTTY).
	ErrNoDeviceMapper = errors.New("device-mapper not available")
	// ErrNoMemory: the kernel could not allocate; ENOMEM.
	ErrNoMemory = errors.New("out of kernel memory")
	// ErrKeyNotSet: resuming a crypt target whose key is not set; EAGAIN.
	ErrKeyNotSet = errors.New("crypt key not set")
	// ErrMissingDevice: loading a table that refers to a block device the
	// kernel cannot open (ENXIO or ENODEV from load while the device
	// being loaded exists): no such device, or a device-mapper device
	// that has no table yet (the kernel adds its block device with its
	// first table). It also matches ErrNotFound.
	ErrMissingDevice = errors.New("a device the table refers to does not exist (or is a device-mapper device with no table yet)")
	// ErrUnsupported: loading a table the kernel has no code for, such as
	// a crypto algorithm that is neither built in nor loadable (ENOENT
	// from load).
	ErrUnsupported = errors.New("not supported by this kernel")
)

// OpError is the error of one device-mapper operation: which operation,
// on which device, and the reason (normally a unix.Errno, possibly
// wrapped with detail).
type OpError struct {
	// Op names the operation: "create", "load", "suspend", "resume",
	// "remove", "rename", "set-uuid", "info", "table", "status", "deps",
	// "wait", "list", "version", "target-versions", "message", "mknod", ...
	Op string
	// Device is the device name ("" for operations on no device).
	Device string
	// Err is the reason; errors.Is(err, unix.EBUSY) and the like see
	// through it.
	Err error
}

func (e *OpError) Error() string {
	s := "dm " + e.Op
	if e.Device != "" {
		s += " " + e.Device
	}
	if e.Err != nil {
		s += ": " + e.Err.Error()
	}
	return s
}

func (e *OpError) Unwrap() error { return e.Err }

// Is matches the sentinel that Errno and Op map to.
func (e *OpError) Is(target error) bool {
	s := e.sentinel()
	return s != nil && s == target
}

func (e *OpError) sentinel() error {
	var errno unix.Errno
	if !errors.As(e.Err, &errno) {
		return nil
	}
	return sentinelFor(e.Op, errno)
}

// sentinelFor maps an operation's errno to its sentinel (nil if none).
func sentinelFor(op string, errno unix.Errno) error {
	switch errno {
	case unix.EBUSY:
		switch op {
		case "create", "rename", "set-uuid":
			return ErrExists
		}
		return ErrBusy
	case unix.EEXIST:
		return ErrExists
	case unix.ENXIO, unix.ENODEV:
		return ErrNotFound
	case unix.EINVAL:
		return ErrInvalid
	case unix.EACCES, unix.EPERM:
		return ErrPermission
	case unix.ENOTTY:
		return ErrNoDeviceMapper
	case unix.ENOENT:
		switch op {
		case "open":
			return ErrNoDeviceMapper
		case "load":
			return ErrUnsupported
		}
		return nil
	case unix.ENOMEM:
		return ErrNoMemory
	case unix.EAGAIN:
		if op == "resume" {
			return ErrKeyNotSet
		}
		return nil
	}
	return nil
}

func opErr(op, dev string, err error) error {
	if err == nil {
		return nil
	}
	return &OpError{Op: op, Device: dev, Err: err}
}
