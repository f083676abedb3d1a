package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/convert"
	"github.com/dmconvert/dmconvert/dmtable"
)

// testApp is an app around buffers, a temporary journal directory and a
// fake machine: the commands run in-process, as main would run them.
type testApp struct {
	t      *testing.T
	a      *app
	out    bytes.Buffer
	err    bytes.Buffer
	dir    string
	sys    *fakeSys
	signal []os.Signal // delivered as soon as a run installs its handler
}

func newTestApp(t *testing.T) *testApp {
	t.Helper()
	ta := &testApp{t: t, dir: t.TempDir()}
	null, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { null.Close() })
	ta.a = &app{
		stdin:             null,
		stdout:            &ta.out,
		stderr:            &ta.err,
		journalDir:        filepath.Join(ta.dir, "journals"),
		liveDir:           filepath.Join(ta.dir, "live"),
		crypttab:          filepath.Join(ta.dir, "crypttab"),
		statusLockTimeout: 50 * time.Millisecond,
		newEngine: func() (*convert.Engine, func() error, error) {
			if ta.sys == nil {
				return nil, nil, errors.New("no device-mapper in this test")
			}
			return ta.sys.engine()
		},
		notify: func(c chan<- os.Signal, subscribed ...os.Signal) {
			for _, s := range ta.signal {
				if slices.Contains(subscribed, s) {
					c <- s
				}
			}
		},
		stopNotify: func(chan<- os.Signal) {},
	}
	if err := os.MkdirAll(ta.a.journalDir, 0o700); err != nil {
		t.Fatal(err)
	}
	return ta
}

// run runs a command line and returns its exit code; out and err hold
// what it printed.
func (ta *testApp) run(args ...string) int {
	ta.out.Reset()
	ta.err.Reset()
	return ta.a.main(args)
}

// mustRun runs a command line that must exit with want.
func (ta *testApp) mustRun(want int, args ...string) {
	ta.t.Helper()
	if got := ta.run(args...); got != want {
		ta.t.Fatalf("dmconvert %s: exit %d, want %d\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), got, want, ta.out.String(), ta.err.String())
	}
}

// jsonResult returns the {"result": ...} line of the output.
func (ta *testApp) jsonResult() map[string]any {
	ta.t.Helper()
	lines := strings.Split(strings.TrimSpace(ta.out.String()), "\n")
	last := lines[len(lines)-1]
	var m map[string]map[string]any
	if err := json.Unmarshal([]byte(last), &m); err != nil {
		ta.t.Fatalf("last line %q is not JSON: %v", last, err)
	}
	r, ok := m["result"]
	if !ok {
		ta.t.Fatalf("last line %q has no result", last)
	}
	return r
}

// keyFile writes a key file and returns its path.
func (ta *testApp) keyFile(content string) string {
	p := filepath.Join(ta.dir, "key-"+strings.ReplaceAll(content, "/", "_"))
	if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
		ta.t.Fatal(err)
	}
	return p
}

// fakeSys is a machine without device-mapper: a disk image file with a
// real PV label, an LVM that reports a PV on it, and a device mapper on
// which nothing exists and nothing can be created. Planning works on it;
// a run stops at its first device-mapper call (or earlier, at a stop
// request).
type fakeSys struct {
	t       *testing.T
	disk    string
	size    convert.Sectors
	lbs     uint32 // logical block size
	dev     dmtable.Dev
	pv      convert.PV
	lockDir string
	// created counts Create calls (nothing may be created in tests that
	// must write nothing).
	created int
	// memoryFS is what MemoryFS says of every path.
	memoryFS string
}

const (
	fakeDiskSectors = 65536 // 32 MiB
	fakePVSectors   = 40960 // 20 MiB
)

func (ta *testApp) withDisk() *fakeSys {
	t := ta.t
	disk := filepath.Join(ta.dir, "vda.img")
	label, err := os.ReadFile("../../convert/testdata/pv-head-4k.bin")
	if err != nil {
		t.Fatal(err)
	}
	img := make([]byte, fakeDiskSectors*512)
	copy(img, label)
	if err := os.WriteFile(disk, img, 0o600); err != nil {
		t.Fatal(err)
	}
	ta.sys = &fakeSys{
		t: t, disk: disk, size: fakeDiskSectors, lbs: 512, dev: dmtable.Dev{Major: 252, Minor: 0},
		pv: convert.PV{
			Device: disk, UUID: "TYHR1B-XcRp-K5Nz-Du3y-30GV-eqTw-35q5ki", VG: "vg0",
			Size: fakePVSectors, UsedEnd: fakePVSectors, PEStart: 2048, ExtentSize: 2048,
			VGDevices: []string{disk},
			LVs:       []convert.LVInfo{{Name: "vg0/root", Active: true, Public: true}},
		},
		lockDir: filepath.Join(ta.dir, "locks"),
	}
	return ta.sys
}

func (s *fakeSys) engine() (*convert.Engine, func() error, error) {
	e := &convert.Engine{
		DM: fakeDM{s}, Host: fakeHost{s}, LVM: fakeLVM{s},
		RegionSize: convert.DefaultRegionSize, PollInterval: time.Millisecond,
	}
	return e, func() error { return nil }, nil
}

var errNoDM = errors.New("fake device-mapper: not available")

type fakeDM struct{ s *fakeSys }

func (f fakeDM) Create(name, uuid string, t dmtable.Table) (convert.DevInfo, error) {
	f.s.created++
	return convert.DevInfo{}, errNoDM
}
func (fakeDM) Load(string, dmtable.Table) error    { return errNoDM }
func (fakeDM) ClearInactive(string) error          { return errNoDM }
func (fakeDM) Suspend(string) error                { return errNoDM }
func (fakeDM) SuspendNoFlush(string) error         { return errNoDM }
func (fakeDM) Resume(string) error                 { return errNoDM }
func (fakeDM) Remove(string) error                 { return errNoDM }
func (fakeDM) RemoveDeferred(string) (bool, error) { return false, errNoDM }
func (fakeDM) Info(string) (convert.DevInfo, error) {
	return convert.DevInfo{}, convert.ErrNoDevice
}
func (fakeDM) Table(string) (dmtable.Table, error)           { return nil, errNoDM }
func (fakeDM) Status(string) ([]dmtable.TargetStatus, error) { return nil, errNoDM }
func (fakeDM) List() ([]convert.DevInfo, error)              { return nil, nil }
func (fakeDM) Deps(string) ([]dmtable.Dev, error)            { return nil, errNoDM }
func (fakeDM) SetUUID(string, string) error                  { return errNoDM }
func (fakeDM) WaitEvent(context.Context, string, uint32, time.Duration) (uint32, error) {
	return 0, errNoDM
}

type fakeHost struct{ s *fakeSys }

func (h fakeHost) Stat(path string) (convert.DiskInfo, error) {
	if path != h.s.disk {
		return convert.DiskInfo{}, errors.New("stat " + path + ": no such block device")
	}
	return convert.DiskInfo{Path: path, Dev: h.s.dev, Size: h.s.size, LogicalBlockSize: h.s.lbs}, nil
}

type fileDisk struct{ *os.File }

func (d fileDisk) Flush() error { return d.Sync() }

func (h fakeHost) OpenDisk(path string) (convert.Disk, error) {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	return fileDisk{f}, nil
}
func (fakeHost) FileDevice(string) (dmtable.Dev, error) { return dmtable.Dev{Major: 8, Minor: 1}, nil }
func (h fakeHost) MemoryFS(string) string               { return h.s.memoryFS }
func (fakeHost) Users(dmtable.Dev) ([]string, error)    { return nil, nil }
func (fakeHost) NodePath(name string) string            { return "/dev/mapper/" + name }
func (h fakeHost) DevicePath(dev dmtable.Dev) (string, error) {
	return "", fmt.Errorf("fake host: no path for %v", dev)
}

func (h fakeHost) Lock(d convert.DiskInfo) (func(), error) {
	return convert.OSHost{LockDir: h.s.lockDir}.Lock(d)
}

type fakeLVM struct{ s *fakeSys }

func (l fakeLVM) Discover(ctx context.Context, device string) (*convert.PV, error) {
	pv := l.s.pv
	return &pv, nil
}
func (fakeLVM) Fence(context.Context, string) (func() error, error) {
	return func() error { return nil }, nil
}
func (fakeLVM) ShrinkPV(context.Context, string, convert.Sectors) error { return errNoDM }
func (fakeLVM) Activate(context.Context, string, []string) error        { return errNoDM }
func (fakeLVM) Refresh(context.Context, string, string) error           { return errNoDM }
func (fakeLVM) State(context.Context, string) (string, string, uint64, error) {
	return "", "", 0, errNoDM
}
func (fakeLVM) LocatePV(_ context.Context, _, hint string) string { return hint }
