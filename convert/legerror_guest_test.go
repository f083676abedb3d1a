package convert

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dmconvert/dmconvert/dmtable"
	"github.com/dmconvert/dmconvert/testvm"
)

// TestGuestEngineLegWriteError: while a chunk is mirrored, the disk fails
// a write on one leg and takes it on the other: a bad spot at one of the
// two places the chunk lives. Whatever the leg and the moment, a write the
// application was told succeeded must read back: through the table the
// run leaves, and after the disk is repaired and the run has ended. A
// write whose only copy is on a failed spot must fail (EIO), not be
// acknowledged.
//
//   - old-leg, while copying: the run stops, the chunk is not committed;
//     F maps it on the old leg again, where the write fails again (EIO).
//     Before handle_errors it was acknowledged, with only the new leg,
//     which F no longer maps, holding it: lost (seen here).
//   - new-leg, while copying: the run stops; the write goes to the old
//     leg, which takes it (acknowledged, not a spurious error).
//   - new-leg, after the copy is in sync and before its commit, a
//     transient error (the spot is repaired before the engine goes on):
//     the run commits the chunk and goes on; the write, held until F's
//     next suspend, goes to the new leg again and is acknowledged.
//     Before handle_errors it was acknowledged at once with only the old
//     leg, which F then left, holding it: lost (seen here).
//
// The disk is a dm linear map of vdc (dtest) so that 4 KiB of it can be
// swapped for dm-flakey with error_writes (reads keep working) at the
// chosen moment.
func TestGuestEngineLegWriteError(t *testing.T) {
	testvm.RequireGuest(t)
	base := testvm.GuestDisks()[2]
	lvmSeesOnly(t, "dtest", "dtest_crypt") // not vdc under it
	for _, c := range []struct {
		name   string
		leg    int    // the mirror leg whose spot fails writes
		at     string // the failpoint where it starts failing
		stops  bool   // the run stops (the chunk is not committed)
		writes bool   // the write is acknowledged
		// transient: the spot takes writes again before the engine
		// goes on (else until the stopped run is resumed)
		transient bool
	}{
		{"old-leg-copying", 0, "resume:after", true, false, false},
		{"new-leg-copying", 1, "resume:after", true, true, false},
		{"new-leg-synced-transient", 1, "sync:after", false, true, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			legWriteError(t, base, c.leg, c.at, c.stops, c.writes, c.transient)
		})
	}
}

func legWriteError(t *testing.T, base string, leg int, at string, stops, writes, transient bool) {
	n := diskSectors(t, base)
	sh(t, "wipefs", "-a", "-q", base)
	linearTable := fmt.Sprintf("0 %d linear %s 0", n, base)
	sh(t, "dmsetup", "create", "dtest", "--table", linearTable)
	const D = "/dev/mapper/dtest"
	defer func() {
		shOK("vgchange", "-an", "vgle")
		shOK("dmsetup", "remove", "dtest_crypt")
		shOK("dmsetup", "remove", "dtest")
	}()
	var st unix.Stat_t
	if err := unix.Stat(D, &st); err != nil {
		t.Fatal(err)
	}
	dNum := dmtable.Dev{Major: unix.Major(st.Rdev), Minor: unix.Minor(st.Rdev)}
	sh(t, "pvcreate", "-y", "--setphysicalvolumesize", "44M", D)
	sh(t, "vgcreate", "-y", "-s", "4M", "vgle", D)
	sh(t, "lvcreate", "-y", "-L", "32M", "-n", "raw", "vgle")
	lvPath := "/dev/vgle/raw"
	lvBytes := int64(32 * guestMiB)
	content := make([]byte, lvBytes)
	rand.Read(content)
	lv, err := os.OpenFile(lvPath, os.O_RDWR|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer lv.Close()
	buf := alignedBuf(t, int(lvBytes))
	copy(buf, content)
	if _, err := lv.WriteAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	lvTable := strings.Fields(sh(t, "dmsetup", "table", "vgle-raw"))
	if len(lvTable) != 5 || lvTable[2] != "linear" {
		t.Fatalf("table of vgle-raw: %v", lvTable)
	}
	var lvStart dmtable.Sectors // where the LV starts on F (= on the PV)
	fmt.Sscan(lvTable[4], &lvStart)

	e, closeSys, err := NewSystem()
	if err != nil {
		t.Fatal(err)
	}
	defer closeSys()
	const H = 8192 // 4 MiB
	jpath := filepath.Join(t.TempDir(), "leg.journal")
	ctx := context.Background()
	ep, err := e.PlanEncrypt(ctx, EncryptOptions{Device: D, Journal: jpath, HeaderSectors: H, KeyBytes: 64,
		NewHeader: guestHeaderFactory(2, H)})
	if err != nil {
		t.Fatal(err)
	}
	F := ep.Spec.Name

	// At the first chunk whose mirror covers the LV past its first
	// quarter: make 4 KiB of the leg fail writes, then write them
	// through the LV.
	const blk = 8 // sectors
	type outcome struct {
		off int64
		err error
	}
	wrote := make(chan outcome, 1)
	newData := make([]byte, blk*512)
	rand.Read(newData)
	fired := false
	var badAt dmtable.Sectors
	e.FailHook = func(name string) {
		if fired || name != at {
			return
		}
		tbl, err := dmtable.ParseTable(sh(t, "dmsetup", "table", F))
		if err != nil {
			t.Errorf("table of %s: %v", F, err)
			fired = true
			return
		}
		for _, tg := range tbl {
			m, ok := tg.Params.(*dmtable.Mirror)
			if !ok {
				continue
			}
			lo := max(tg.Start, lvStart+dmtable.Sectors(lvBytes/512/4))
			lo = (lo + blk - 1) / blk * blk
			if lo+blk > min(tg.Start+tg.Length, lvStart+dmtable.Sectors(lvBytes/512)) {
				continue
			}
			fired = true
			bad, err := onDisk(t, m.Legs[leg].Dev, m.Legs[leg].Offset+(lo-tg.Start), dNum)
			if err != nil {
				t.Errorf("leg %d of F[%d,%d): %v", leg, tg.Start, tg.Start+tg.Length, err)
				return
			}
			badAt = bad
			t.Logf("at %s: F[%d,%d) mirrored; F sector %d is D sector %d on leg %d (%s): its writes fail from now on", at, tg.Start, tg.Start+tg.Length, lo, bad, leg, m.Legs[leg].Dev)
			sh(t, "dmsetup", "reload", "dtest", "--table", fmt.Sprintf("0 %d linear %s 0\n%d %d flakey %s %d 0 3600 1 error_writes\n%d %d linear %s %d",
				bad, base, bad, blk, base, bad, bad+blk, n-uint64(bad+blk), base, bad+blk))
			sh(t, "dmsetup", "resume", "dtest")
			off := int64(lo-lvStart) * 512
			b := alignedBuf(t, len(newData))
			copy(b, newData)
			go func() {
				_, err := lv.WriteAt(b, off)
				wrote <- outcome{off, err}
			}()
			// The write reaches the mirror before the engine goes on.
			time.Sleep(500 * time.Millisecond)
			if transient {
				sh(t, "dmsetup", "reload", "dtest", "--table", linearTable)
				sh(t, "dmsetup", "resume", "dtest")
			}
			return
		}
	}
	runErr := e.Execute(ctx, ep, RunOptions{})
	e.FailHook = nil
	if !fired {
		t.Fatalf("no chunk mirrored the LV (run: %v)", runErr)
	}
	if t.Failed() {
		return
	}
	t.Logf("run: %v", runErr)
	var w outcome
	select {
	case w = <-wrote:
	case <-time.After(2 * time.Minute):
		t.Fatalf("the write to the failing spot has not returned after 2 minutes (run: %v)", runErr)
	}
	t.Logf("the write at LV offset %d returned %v", w.off, w.err)
	if stops != (runErr != nil) {
		t.Errorf("run: %v, want it to stop: %v", runErr, stops)
	}
	if writes != (w.err == nil) {
		t.Errorf("the write returned %v; want it acknowledged: %v", w.err, writes)
	}
	if w.err == nil {
		copy(content[w.off:], newData)
	}
	check := func(when string) {
		t.Helper()
		got := alignedBuf(t, int(lvBytes))
		if _, err := lv.ReadAt(got, 0); err != nil {
			t.Fatalf("%s: reading %s: %v", when, lvPath, err)
		}
		if w.err == nil && !bytes.Equal(got[w.off:w.off+int64(len(newData))], newData) {
			t.Errorf("%s: the write at LV offset %d (D sector %d on leg %d) was acknowledged but reads back otherwise: lost", when, w.off, badAt, leg)
		}
		want := content
		if w.err != nil {
			// A failed write leaves its 4 KiB undefined.
			want = append([]byte(nil), content...)
			copy(want[w.off:w.off+int64(len(newData))], got[w.off:])
		}
		if i := firstDiff(got, want); i >= 0 {
			t.Errorf("%s: %s differs from what was written at byte %d", when, lvPath, i)
		}
	}
	check("after the run")

	// The disk is repaired; a stopped run is resumed to its end.
	sh(t, "dmsetup", "reload", "dtest", "--table", linearTable)
	sh(t, "dmsetup", "resume", "dtest")
	if runErr != nil {
		if err := e.Resume(ctx, ResumeOptions{Journal: jpath, Open: func(img []byte) (HeaderFormat, Keys, error) {
			h, k, err := OpenLUKSImage(img, guestPass)
			return h, k, err
		}}); err != nil {
			t.Fatalf("resume: %v", err)
		}
	}
	check("at the end")
	if out := sh(t, "dmsetup", "table", F); !strings.Contains(out, "crypt") {
		t.Fatalf("table of %s at the end: %s", F, out)
	}
}

// onDisk follows dev (a device-mapper device with one target that maps
// one device at an offset, or the disk itself) down to the disk's sector.
func onDisk(t testing.TB, dev dmtable.DevRef, sector dmtable.Sectors, disk dmtable.Dev) (dmtable.Sectors, error) {
	for range 4 {
		if dev.Path == "" && dev.Num == disk {
			return sector, nil
		}
		if dev.Path != "" {
			return 0, fmt.Errorf("leg named by path %s", dev.Path)
		}
		out, err := shOK("dmsetup", "table", "-j", fmt.Sprint(dev.Num.Major), "-m", fmt.Sprint(dev.Num.Minor))
		if err != nil {
			return 0, err
		}
		tbl, err := dmtable.ParseTable(out)
		if err != nil || len(tbl) != 1 {
			return 0, fmt.Errorf("table of %s: %q %v", dev, out, err)
		}
		switch p := tbl[0].Params.(type) {
		case *dmtable.Linear:
			dev, sector = p.Dev, sector+p.Offset
		case *dmtable.Crypt:
			dev, sector = p.Dev, sector+p.Offset
		default:
			return 0, fmt.Errorf("table of %s: %q", dev, out)
		}
	}
	return 0, errors.New("too deep")
}
