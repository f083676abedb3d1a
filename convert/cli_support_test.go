package convert

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/dmtable"
	"github.com/dmconvert/dmconvert/journal"
	"github.com/dmconvert/dmconvert/luks"
)

var cheapKDF = luks.PBKDF{Type: luks.KDFPBKDF2, Iterations: luks.MinPBKDF2Iterations}

// diskImage is an in-memory disk for DiskCheckpoint.
type diskImage []byte

func (d diskImage) ReadAt(p []byte, off int64) (int, error) {
	if off >= int64(len(d)) {
		return 0, errors.New("read past the end")
	}
	n := copy(p, d[off:])
	if n < len(p) {
		return n, errors.New("short read")
	}
	return n, nil
}

func inProgressImage(t *testing.T, version int, hs int64, cp Checkpoint) diskImage {
	t.Helper()
	vk, err := luks.NewVolumeKey(64)
	if err != nil {
		t.Fatal(err)
	}
	defer vk.Wipe()
	h, err := luks.Create(luks.Options{Version: version, HeaderSize: hs, PBKDF: cheapKDF}, vk, []byte("pass"))
	if err != nil {
		t.Fatal(err)
	}
	lh, err := NewLUKSHeader(h)
	if err != nil {
		t.Fatal(err)
	}
	img, err := lh.Image(cp)
	if err != nil {
		t.Fatal(err)
	}
	d := make(diskImage, hs+1<<20)
	copy(d, img)
	return d
}

func TestDiskCheckpoint(t *testing.T) {
	cp := Checkpoint{Run: "0123456789abcdef", Op: "encrypt", Plan: "forward", Phase: 4, Boundary: 12345, Journal: "/var/lib/dmconvert/x.journal"}
	for _, tc := range []struct {
		version int
		hs      int64
		id      Identity
	}{{2, 1 << 20, IdentityLUKS}, {1, 2 << 20, IdentityDisguisedLUKS1}} {
		d := inProgressImage(t, tc.version, tc.hs, cp)
		got, id, err := DiskCheckpoint(d)
		if err != nil {
			t.Fatalf("LUKS%d: %v", tc.version, err)
		}
		if id != tc.id || got != cp {
			t.Fatalf("LUKS%d: got %v %+v, want %v %+v", tc.version, id, got, tc.id, cp)
		}
	}

	// A finished LUKS2 header (no token) has no checkpoint.
	vk, _ := luks.NewVolumeKey(64)
	defer vk.Wipe()
	h, err := luks.Create(luks.Options{HeaderSize: 1 << 20, PBKDF: cheapKDF}, vk, []byte("pass"))
	if err != nil {
		t.Fatal(err)
	}
	img, err := h.Image()
	if err != nil {
		t.Fatal(err)
	}
	if _, id, err := DiskCheckpoint(diskImage(append(img, make([]byte, 4096)...))); !errors.Is(err, ErrNoCheckpoint) || id != IdentityLUKS {
		t.Fatalf("plain LUKS2: %v %v", id, err)
	}

	// An LVM label: identified, no checkpoint.
	label, err := os.ReadFile("testdata/pv-head-4k.bin")
	if err != nil {
		t.Fatal(err)
	}
	if _, id, err := DiskCheckpoint(diskImage(label)); !errors.Is(err, ErrNoCheckpoint) || id != IdentityLVM {
		t.Fatalf("LVM label: %v %v", id, err)
	}
	if _, id, err := DiskCheckpoint(diskImage(make([]byte, 8192))); !errors.Is(err, ErrNoCheckpoint) || id != IdentityUnknown {
		t.Fatalf("zeros: %v %v", id, err)
	}
}

func TestDescribePhaseString(t *testing.T) {
	p, err := BuildEncrypt(EncryptGeometry{DiskSize: 4096, Payload: 3800, Header: 128, Align: 8})
	if err != nil {
		t.Fatal(err)
	}
	ab, err := p.BuildAbort(State{Phase: p.PhaseIndex(PhaseFinalize)})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		"setting up the mappings", "moving the logical volumes onto the new mapping",
		"copying the start of the disk to its end", "writing the LUKS header", "encrypting",
		"encrypting the start of the disk", "finalizing",
		// abort from just before finalize
		"decrypting the start of the disk", "decrypting", "copying the start of the disk back in place",
		"writing back the disk's first 4 KiB (the LVM label or the file system's start)", "moving the logical volumes back onto the disk",
	}
	var got []string
	for _, ph := range append(append([]Phase(nil), p.Phases...), ab.Phases...) {
		// The event carries the kind, or String() for a move.
		s := string(ph.Kind)
		if ph.Kind == PhaseMove {
			s = ph.String()
		}
		d := DescribePhaseString(s)
		if d != DescribePhase(ph) {
			t.Errorf("%q: from the string %q, from the phase %q", s, d, DescribePhase(ph))
		}
		got = append(got, d)
	}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("phases:\n got %q\nwant %q", got, want)
	}
	// Every kind a plan uses is described, not shown by its internal name.
	for _, k := range []PhaseKind{PhaseSetup, PhaseRestack, PhaseToLUKS, PhaseToLabel, PhaseFinalize, PhaseUnstack, PhaseMark} {
		if d := DescribePhaseString(string(k)); d == string(k) || d == "" {
			t.Errorf("phase kind %q has no description", k)
		}
	}
	if s := DescribePhaseString("something new"); s != "something new" {
		t.Fatalf("unknown phase text changed: %q", s)
	}
}

func TestIsBusy(t *testing.T) {
	h := OSHost{LockDir: t.TempDir()}
	d := DiskInfo{Path: "/dev/vda", Dev: dmtable.Dev{Major: 254, Minor: 0}}
	unlock, err := h.Lock(d)
	if err != nil {
		t.Fatal(err)
	}
	_, err = h.Lock(d)
	unlock()
	if err == nil || !IsBusy(err) {
		t.Fatalf("second lock of the disk: %v, IsBusy false", err)
	}

	jp := filepath.Join(t.TempDir(), "j.journal")
	j, err := journal.Open(jp, journal.Options{Create: true})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	_, err = journal.Open(jp, journal.Options{LockTimeout: 10 * time.Millisecond})
	if !IsBusy(err) {
		t.Fatalf("journal held elsewhere: %v, IsBusy false", err)
	}
	_, err = InspectJournal(jp, 10*time.Millisecond)
	if !errors.Is(err, journal.ErrLocked) {
		t.Fatalf("InspectJournal of a held journal: %v", err)
	}
	for _, e := range []error{errors.New("x"), &RefusalError{Device: "/dev/vda", Reason: "too small"}, ErrInterrupted} {
		if IsBusy(e) {
			t.Fatalf("IsBusy(%v) = true", e)
		}
	}
}

func TestInspectJournal(t *testing.T) {
	sc := newScenario(t, 3)
	w := sc.world()
	e := sc.engine(w)
	ep, err := e.PlanEncrypt(context.Background(), sc.options())
	if err != nil {
		t.Fatal(err)
	}
	steps := 0
	err = e.Execute(context.Background(), ep, RunOptions{Stop: func() bool { steps++; return steps > 6 }})
	if !errors.Is(err, ErrInterrupted) {
		t.Fatalf("stopped run: %v", err)
	}
	ri, err := InspectJournal(sc.journal, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if ri.Status != journal.StatusInterrupted || ri.Finished() || ri.Aborting {
		t.Fatalf("status %q finished %v aborting %v", ri.Status, ri.Finished(), ri.Aborting)
	}
	if ri.Device != fakeDiskPath || ri.Name != "vda_crypt" || ri.Op != "encrypt" || ri.ID != ep.Spec.ID || ri.VG != "vg" {
		t.Fatalf("run facts: %+v", ri)
	}
	p := ep.Spec.Forward
	if ri.Phases != len(p.Phases) || ri.TotalBytes != p.BytesTotal() {
		t.Fatalf("phases %d total %d, want %d %d", ri.Phases, ri.TotalBytes, len(p.Phases), p.BytesTotal())
	}
	// Six steps: setup, restack, the head (one chunk), the switch, two
	// body chunks.
	if ri.Phase != 4 || ri.PhaseName != "encrypting" {
		t.Fatalf("phase %d %q", ri.Phase, ri.PhaseName)
	}
	if want := uint64(3 * sc.H * 512); ri.DoneBytes != want {
		t.Fatalf("done %d bytes, want %d", ri.DoneBytes, want)
	}
	if !filepath.IsAbs(ri.Journal) {
		t.Fatalf("journal path %q is not absolute", ri.Journal)
	}
}
