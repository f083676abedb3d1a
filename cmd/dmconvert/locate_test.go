package main

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/dmconvert/dmconvert/convert"
	"github.com/dmconvert/dmconvert/journal"
	"github.com/dmconvert/dmconvert/luks"
)

// luksImage writes a disk image whose header region is a LUKS header made
// by the luks package: in progress with checkpoint cp (cp != nil), or
// finished (no token).
func luksImage(t *testing.T, path string, version int, cp *convert.Checkpoint) {
	t.Helper()
	vk, err := luks.NewVolumeKey(64)
	if err != nil {
		t.Fatal(err)
	}
	defer vk.Wipe()
	hs := int64(1 << 20)
	if version == 1 {
		hs = 2 << 20
	}
	h, err := luks.Create(luks.Options{Version: version, HeaderSize: hs, PBKDF: luks.PBKDF{Type: luks.KDFPBKDF2, Iterations: 1000}}, vk, []byte("secret"))
	if err != nil {
		t.Fatal(err)
	}
	var img []byte
	if cp != nil {
		lh, err := convert.NewLUKSHeader(h)
		if err != nil {
			t.Fatal(err)
		}
		if img, err = lh.Image(*cp); err != nil {
			t.Fatal(err)
		}
	} else if img, err = h.Image(); err != nil {
		t.Fatal(err)
	}
	disk := make([]byte, hs+4<<20)
	copy(disk, img)
	if err := os.WriteFile(path, disk, 0o600); err != nil {
		t.Fatal(err)
	}
}

func touchJournal(t *testing.T, p string) {
	t.Helper()
	j, err := journal.Open(p, journal.Options{Create: true})
	if err != nil {
		t.Fatal(err)
	}
	j.Close()
}

func TestJournalFromLUKSCheckpoint(t *testing.T) {
	for _, version := range []int{2, 1} {
		ta := newTestApp(t)
		jp := filepath.Join(ta.dir, "elsewhere", "run.journal")
		touchJournal(t, jp)
		img := filepath.Join(ta.dir, "disk.img")
		cp := &convert.Checkpoint{Run: "00112233aabbccdd", Op: "encrypt", Plan: "forward", Phase: 4, Boundary: 4096, Journal: jp}
		luksImage(t, img, version, cp)
		dv, err := ta.a.readDisk(img)
		if err != nil {
			t.Fatal(err)
		}
		wantID := convert.IdentityLUKS
		if version == 1 {
			wantID = convert.IdentityDisguisedLUKS1
		}
		if dv.Identity != wantID.String() || dv.Checkpoint == nil || *dv.Checkpoint != *cp || dv.journal != jp {
			t.Fatalf("LUKS%d: %+v", version, dv)
		}
		got, err := ta.a.locateRun(img, "")
		if err != nil || got != jp {
			t.Fatalf("LUKS%d: locateRun = %q, %v; want %q", version, got, err, jp)
		}
		// --journal wins.
		if got, err := ta.a.locateRun(img, "/x.journal"); err != nil || got != "/x.journal" {
			t.Fatalf("--journal: %q %v", got, err)
		}
	}
}

func TestJournalFromLVMLabel(t *testing.T) {
	ta := newTestApp(t)
	sys := ta.withDisk() // the disk image starts with convert/testdata/pv-head-4k.bin
	dv, err := ta.a.readDisk(sys.disk)
	if err != nil {
		t.Fatal(err)
	}
	want := filepath.Join(ta.a.journalDir, "TYHR1B-XcRp-K5Nz-Du3y-30GV-eqTw-35q5ki.journal")
	if dv.Identity != convert.IdentityLVM.String() || dv.PVUUID != "TYHR1B-XcRp-K5Nz-Du3y-30GV-eqTw-35q5ki" || dv.journal != want {
		t.Fatalf("disk view %+v", dv)
	}
	// No such journal: refused, naming where it looked.
	_, err = ta.a.locateRun(sys.disk, "")
	if err == nil || exitCode(err) != exitRefused || !strings.Contains(err.Error(), want) {
		t.Fatalf("no journal: %v", err)
	}
	touchJournal(t, want)
	if got, err := ta.a.locateRun(sys.disk, ""); err != nil || got != want {
		t.Fatalf("locateRun = %q, %v; want %q", got, err, want)
	}
}

// interruptedRun leaves an interrupted encrypt of the fake disk recorded
// in journal jp.
func (ta *testApp) interruptedRun(jp string) {
	ta.t.Helper()
	ta.signal = []os.Signal{syscall.SIGINT}
	defer func() { ta.signal = nil }()
	args := ta.encryptArgs()
	for i, a := range args {
		if a == "--journal" {
			args[i+1] = jp
		}
	}
	ta.mustRun(exitInterrupted, args...)
}

func TestJournalByScanning(t *testing.T) {
	ta := newTestApp(t)
	sys := ta.withDisk()
	jp := filepath.Join(ta.a.journalDir, "some-run.journal")
	ta.interruptedRun(jp)

	// The disk's start says nothing useful (a finished-looking LUKS
	// header without a checkpoint): the journal recording the disk is
	// found in the journal directory.
	luksImage(t, sys.disk, 2, nil)
	if got, err := ta.a.locateRun(sys.disk, ""); err != nil || got != jp {
		t.Fatalf("by device: %q %v", got, err)
	}
	// No argument: the only unfinished journal.
	if got, err := ta.a.locateRun("", ""); err != nil || got != jp {
		t.Fatalf("no argument: %q %v", got, err)
	}
	// resume with no argument finds it too (the wrong key proves it got
	// as far as the header the journal holds).
	ta.mustRun(exitPassphrase, "resume", "--key-file", ta.keyFile("wrong"))
	ta.mustRun(exitOK, "status")
	if !strings.Contains(ta.out.String(), "journal:   "+jp) || !strings.Contains(ta.out.String(), "status:    interrupted") {
		t.Fatalf("status:\n%s", ta.out.String())
	}

	// An empty journal (a run refused before it began) is not a run.
	touchJournal(t, filepath.Join(ta.a.journalDir, "empty.journal"))
	if got, err := ta.a.locateRun("", ""); err != nil || got != jp {
		t.Fatalf("with an empty journal around: %q %v", got, err)
	}

	// Two unfinished runs: refused, both named.
	b, err := os.ReadFile(jp)
	if err != nil {
		t.Fatal(err)
	}
	jp2 := filepath.Join(ta.a.journalDir, "other-run.journal")
	if err := os.WriteFile(jp2, b, 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = ta.a.locateRun("", "")
	if err == nil || exitCode(err) != exitRefused || !strings.Contains(err.Error(), jp) || !strings.Contains(err.Error(), jp2) {
		t.Fatalf("two runs: %v", err)
	}
	_, err = ta.a.locateRun(sys.disk, "")
	if err == nil || !strings.Contains(err.Error(), "several unfinished runs record") {
		t.Fatalf("two runs of the disk: %v", err)
	}
	ta.mustRun(exitRefused, "abort", "--key-file", ta.keyFile("secret"))
	ta.mustRun(exitOK, "status")
	if strings.Count(ta.out.String(), "journal: ") != 2 {
		t.Fatalf("status of two runs:\n%s", ta.out.String())
	}
	os.Remove(jp2)

	// A journal held by a running dmconvert counts as unfinished.
	j, err := journal.Open(jp, journal.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got, err := ta.a.locateRun("", ""); err != nil || got != jp {
		t.Fatalf("held journal: %q %v", got, err)
	}
	ta.mustRun(exitBusy, "resume", "--key-file", ta.keyFile("secret"))
	j.Close()

	// No journal at all.
	os.Remove(jp)
	_, err = ta.a.locateRun("", "")
	if err == nil || exitCode(err) != exitRefused {
		t.Fatalf("no journals: %v", err)
	}
	ta.mustRun(exitOK, "status")
	if !strings.Contains(ta.out.String(), "no unfinished dmconvert run") {
		t.Fatalf("status without runs:\n%s", ta.out.String())
	}
}

// status while another process runs the conversion: the journal is held,
// the disk's checkpoint says where the run is.
func TestStatusWhileRunning(t *testing.T) {
	ta := newTestApp(t)
	jp := filepath.Join(ta.a.journalDir, "run.journal")
	j, err := journal.Open(jp, journal.Options{Create: true})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	img := filepath.Join(ta.dir, "disk.img")
	luksImage(t, img, 2, &convert.Checkpoint{Run: "00112233aabbccdd", Op: "encrypt", Plan: "forward", Phase: 4, Boundary: 4096, Journal: jp})
	ta.mustRun(exitOK, "status", img)
	out := ta.out.String()
	for _, want := range []string{"journal:   " + jp, "in progress by another process",
		"disk:      " + img + " carries LUKS header; its checkpoint: encrypt run 00112233aabbccdd, forward plan, phase 5, boundary 4096"} {
		if !strings.Contains(out, want) {
			t.Errorf("status lacks %q:\n%s", want, out)
		}
	}
	ta.mustRun(exitOK, "status", "--json", img)
	r := ta.jsonResult()
	run := r["runs"].([]any)[0].(map[string]any)
	disk := run["disk"].(map[string]any)
	cp := disk["checkpoint"].(map[string]any)
	if run["in_progress_elsewhere"] != true || cp["journal"] != jp || cp["phase"] != 4.0 || cp["boundary"] != 4096.0 {
		t.Fatalf("status --json: %v", r)
	}
}
