package convert

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"os"
	"strings"
	"testing"

	"github.com/dmconvert/dmconvert/dmtable"
)

// TestLVMLabelPVUUID reads the PV UUID of a real PV label.
func TestLVMLabelPVUUID(t *testing.T) {
	label, err := os.ReadFile("testdata/pv-head-4k.bin")
	if err != nil {
		t.Fatal(err)
	}
	if got, ok := LVMLabelPVUUID(label); !ok || got != fakePVUUID {
		t.Fatalf("LVMLabelPVUUID = %q %v, want %s", got, ok, fakePVUUID)
	}
	if !sameUUID(fakePVUUID, strings.ReplaceAll(strings.ToLower(fakePVUUID), "-", "")) {
		t.Fatal("sameUUID does not ignore dashes and case")
	}
	if _, ok := LVMLabelPVUUID(otherPVLabel(t)); !ok {
		t.Fatal("the changed label is not a valid label")
	}
	if _, ok := LVMLabelPVUUID(make([]byte, 4096)); ok {
		t.Fatal("a PV UUID in zeros")
	}
}

// otherPVLabel is testdata's PV label with another PV UUID (and its CRC
// made valid again): another PV.
func otherPVLabel(t *testing.T) []byte {
	t.Helper()
	b, err := os.ReadFile("testdata/pv-head-4k.bin")
	if err != nil {
		t.Fatal(err)
	}
	sec := b[512:1024]
	off := binary.LittleEndian.Uint32(sec[20:24])
	copy(sec[off:], "OTHERPVxxxxxxxxxxxxxxxxxxxxxxxxx")
	binary.LittleEndian.PutUint32(sec[16:20], lvmCRC(sec[20:512]))
	return b
}

// TestResumeRefusesAnotherDisk: after a crash, the name the journal
// recorded names another disk of the same size (disk names can change
// across boots): another PV, a LUKS volume that is not the run's, or a
// blank disk. Resume and abort refuse it, naming the disk and the
// reason, and write nothing to it; with the names back, resume finishes.
// Crashes both before the LUKS header is written (the disk still shows
// the PV label) and after.
func TestResumeRefusesAnotherDisk(t *testing.T) {
	foreignLUKS := make([]byte, 4096)
	copy(foreignLUKS, "LUKS\xba\xbe\x00\x02")
	copy(foreignLUKS[168:], "feedface-0000-4000-8000-000000000000")
	others := []struct {
		name  string
		first func(t *testing.T) []byte
		want  string
	}{
		{"another PV", otherPVLabel, "it is LVM physical volume OTHERP-Vxxx"},
		{"another LUKS volume", func(*testing.T) []byte { return foreignLUKS }, "its LUKS header has UUID feedface-0000-4000-8000-000000000000, but the run"},
		{"a blank disk", func(*testing.T) []byte { return make([]byte, 4096) }, ""},
	}
	for _, when := range []Identity{IdentityLVM, IdentityLUKS} {
		for _, o := range others {
			for _, abort := range []bool{false, true} {
				name := when.String() + "/" + o.name
				if abort {
					name += "/abort"
				}
				t.Run(name, func(t *testing.T) {
					sc := newScenario(t, 41)
					sc.quiet = true
					w := sc.world()
					e := sc.engine(w)
					// The first chunk commit after which the disk shows when.
					var crashed *fakeWorld
					for nth := 1; crashed == nil; nth++ {
						sc2 := newScenario(t, 41)
						sc2.quiet = true
						w2 := sc2.world()
						e2 := sc2.engine(w2)
						c, hits := sc2.runUntil(e2, w2, "commit:after", nth, func() error {
							ep, err := e2.PlanEncrypt(context.Background(), sc2.options())
							if err != nil {
								return err
							}
							return e2.Execute(context.Background(), ep, RunOptions{})
						})
						if c == nil {
							t.Fatalf("no crash after commit #%d shows %v (%d commits)", nth, when, hits["commit:after"])
						}
						c.powerCut(false)
						if err := sc2.lvm(c).boot(); err != nil { // a boot's activation
							t.Fatal(err)
						}
						first := make([]byte, 4096)
						fakeDiskIO{w: c, dev: sc2.disk}.ReadAt(first, 0)
						if Identify(first) == when {
							crashed, sc, w, e = c, sc2, c, sc2.engine(c)
						}
					}
					_ = w
					// Another disk now has the run's name; the run's disk
					// has another.
					otherDev := dmtable.Dev{Major: 254, Minor: 9}
					other := crashed.addDisk("/dev/vdq", otherDev, sc.N)
					copy(other.durable, o.first(t))
					before := append([]byte(nil), other.durable...)
					h := e.Host.(*fakeHost)
					h.diskByPt[fakeDiskPath] = otherDev
					h.diskByPt["/dev/vdq"] = sc.disk
					opts := ResumeOptions{Journal: sc.journal, Open: sc.opener()}
					var err error
					if abort {
						err = e.Abort(context.Background(), opts)
					} else {
						err = e.Resume(context.Background(), opts)
					}
					var re *RefusalError
					if !errors.As(err, &re) || re.Device != fakeDiskPath || !strings.Contains(err.Error(), "--device") || (o.want != "" && !strings.Contains(err.Error(), o.want)) {
						t.Fatalf("resume on %s: %v, want a refusal naming %s (%q)", o.name, err, fakeDiskPath, o.want)
					}
					t.Logf("refused: %v", err)
					other.flush()
					if !bytes.Equal(other.durable, before) {
						t.Fatalf("%s was written to (first difference at byte %d)", o.name, firstDiff(other.durable, before))
					}
					// With its own disk under the recorded name again, the
					// run finishes.
					h.diskByPt[fakeDiskPath] = sc.disk
					delete(h.diskByPt, "/dev/vdq")
					delete(crashed.disks, otherDev) // out of the checks' cold boots
					if abort {
						err = e.Abort(context.Background(), opts)
					} else {
						err = e.Resume(context.Background(), opts)
					}
					if err != nil {
						t.Fatal(err)
					}
					if abort {
						sc.verifyPlain(crashed, e)
					} else {
						sc.verifyEncrypted(crashed, e)
					}
				})
			}
		}
	}
}
