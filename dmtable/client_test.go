//go:build linux

package dmtable

import (
	"errors"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// The Client's failure modes that need no device-mapper: no control node,
// and a node that is not device-mapper's.
func TestOpenWithoutDeviceMapper(t *testing.T) {
	_, err := Open(Options{ControlPath: filepath.Join(t.TempDir(), "control"), Udev: UdevOff})
	if !errors.Is(err, ErrNoDeviceMapper) || !errors.Is(err, unix.ENOENT) {
		t.Fatalf("missing control node: %v", err)
	}
	var op *OpError
	if !errors.As(err, &op) || op.Op != "open" {
		t.Fatalf("not an open OpError: %#v", err)
	}
	// /dev/null answers the version ioctl with ENOTTY.
	_, err = Open(Options{ControlPath: "/dev/null", Udev: UdevOff})
	if !errors.Is(err, ErrNoDeviceMapper) || !errors.Is(err, unix.ENOTTY) {
		t.Fatalf("/dev/null as control node: %v", err)
	}
	if errors.As(err, &op) && op.Op != "version" {
		t.Fatalf("op %q, want version", op.Op)
	}
}
