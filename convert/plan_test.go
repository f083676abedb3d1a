package convert

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/dmconvert/dmconvert/dmtable"
)

func encGeom(N, P, H, chunk Sectors) EncryptGeometry {
	return EncryptGeometry{DiskSize: N, Payload: P, Header: H, Chunk: chunk, Align: 1}
}

// walk returns every state a plan passes through, including the final one.
func walk(t *testing.T, p *Plan) []State {
	t.Helper()
	var out []State
	st := p.Start()
	for i := 0; ; i++ {
		if i > 1<<20 {
			t.Fatal("plan does not terminate")
		}
		out = append(out, st)
		if p.Done(st) {
			return out
		}
		st = p.Advance(st)
	}
}

func TestBuildEncryptGeometries(t *testing.T) {
	cases := []struct {
		name          string
		N, P, H, c, a Sectors
	}{
		{"luks2 default 256MiB", 524288, 524288 - 65536, 32768, 32768, 1},
		{"luks2 smaller chunks", 524288, 400000, 32768, 4096, 1},
		{"luks1 2MiB", 524288, 500000, 4096, 1 << 20, 1},
		{"payload not a chunk multiple", 300001, 200001, 4096, 1000, 1},
		{"payload smaller than header", 100000, 1000, 32768, 32768, 1},
		{"4k sectors", 524288, 458752 - 8, 32768, 32768, 8},
		{"exact fit", 100 + 2*32, 100, 32, 32, 1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p, err := BuildEncrypt(EncryptGeometry{DiskSize: c.N, Payload: c.P, Header: c.H, Chunk: c.c, Align: c.a})
			if err != nil {
				t.Fatal(err)
			}
			states := walk(t, p)
			// The final layout is the whole payload on the new device,
			// with F's sector x on C's sector x.
			final := p.Layout(states[len(states)-1])
			if len(final) != 1 || final[0].On != (Backing{Dev: NewID}) || final[0].End != c.P {
				t.Fatalf("final layout %+v", final)
			}
			// Progress only grows and ends at the total.
			var last uint64
			for _, st := range states {
				d := p.BytesDone(st)
				if d < last {
					t.Fatalf("bytes done went back from %d to %d at %+v", last, d, st)
				}
				last = d
			}
			if last != p.BytesTotal() {
				t.Fatalf("done %d != total %d", last, p.BytesTotal())
			}
			// Every chunk respects the alignment.
			for _, st := range states {
				if p.Done(st) {
					continue
				}
				ph := p.Phases[st.Phase]
				if ph.Kind != PhaseMove {
					continue
				}
				s, e, _ := ph.NextChunk(st.Boundary)
				if s%c.a != 0 || e%c.a != 0 {
					t.Fatalf("chunk [%d,%d) not aligned to %d", s, e, c.a)
				}
			}
			// The plan survives the journal.
			raw, err := p.Marshal()
			if err != nil {
				t.Fatal(err)
			}
			var back Plan
			if err := json.Unmarshal(raw, &back); err != nil {
				t.Fatal(err)
			}
			if err := back.Verify(); err != nil {
				t.Fatalf("plan read back fails verification: %v", err)
			}
		})
	}
}

func TestBuildEncryptRefusesShortDisk(t *testing.T) {
	_, err := BuildEncrypt(encGeom(100+2*32-1, 100, 32, 32))
	if err == nil || !strings.Contains(err.Error(), "1 sectors short") {
		t.Fatalf("got %v, want a 1-sector shortfall", err)
	}
}

func TestVerifyCatchesOverlap(t *testing.T) {
	p, err := BuildEncrypt(encGeom(1000, 800, 64, 64))
	if err != nil {
		t.Fatal(err)
	}
	// A chunk larger than the shift makes the destination overlap its own
	// source (or the next chunk's).
	for i := range p.Phases {
		if p.Phases[i].Kind == PhaseMove && p.Phases[i].Start == 64 {
			p.Phases[i].Chunk = 65
		}
	}
	if err := p.Verify(); err == nil || !strings.Contains(err.Error(), "overlap") {
		t.Fatalf("oversized chunk not caught: %v", err)
	}
	// Walking the wrong way overwrites data not yet moved.
	p, _ = BuildEncrypt(encGeom(1000, 800, 64, 64))
	for i := range p.Phases {
		if p.Phases[i].Kind == PhaseMove && p.Phases[i].Start == 64 {
			p.Phases[i].Backward = false
		}
	}
	if err := p.Verify(); err == nil || !strings.Contains(err.Error(), "overlap") {
		t.Fatalf("wrong direction not caught: %v", err)
	}
	// A head parked inside the payload's final place.
	p, _ = BuildEncrypt(encGeom(1000, 800, 64, 64))
	p.Phases[2].To.Delta = 500
	if err := p.Verify(); err == nil {
		t.Fatal("head parked over live data not caught")
	}
}

func TestAbortFromEveryState(t *testing.T) {
	for _, g := range []EncryptGeometry{encGeom(1000, 800, 64, 64), encGeom(1000, 801, 64, 30), encGeom(400, 40, 64, 64)} {
		p, err := BuildEncrypt(g)
		if err != nil {
			t.Fatal(err)
		}
		for _, st := range walk(t, p) {
			if p.Done(st) {
				continue
			}
			ab, err := p.BuildAbort(st)
			if err != nil {
				t.Fatalf("abort at %+v: %v", st, err)
			}
			states := walk(t, ab)
			final := ab.Layout(states[len(states)-1])
			if len(final) != 1 || final[0].On != (Backing{Dev: DiskID}) || final[0].End != g.Payload {
				t.Fatalf("abort at %+v ends with layout %+v, want the payload back on the disk", st, final)
			}
			if p.Switched(st) != (ab.PhaseIndex(PhaseToLabel) >= 0) {
				t.Fatalf("abort at %+v: switched=%v but plan %v", st, p.Switched(st), ab.Phases)
			}
		}
	}
}

func TestNextChunk(t *testing.T) {
	ph := Phase{Kind: PhaseMove, Start: 10, End: 35, Chunk: 10, Backward: true}
	var got [][2]Sectors
	for b := ph.InitialBoundary(); ; {
		s, e, ok := ph.NextChunk(b)
		if !ok {
			break
		}
		got = append(got, [2]Sectors{s, e})
		b = s
	}
	want := [][2]Sectors{{25, 35}, {15, 25}, {10, 15}}
	if len(got) != len(want) {
		t.Fatalf("chunks %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("chunks %v, want %v", got, want)
		}
	}
	ph.Backward = false
	got = nil
	for b := ph.InitialBoundary(); ; {
		s, e, ok := ph.NextChunk(b)
		if !ok {
			break
		}
		got = append(got, [2]Sectors{s, e})
		b = e
	}
	want = [][2]Sectors{{10, 20}, {20, 30}, {30, 35}}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("forward chunks %v, want %v", got, want)
		}
	}
}

func TestLayoutAssignMerges(t *testing.T) {
	a, b := Backing{Dev: DiskID}, Backing{Dev: NewID}
	l := Layout{{0, 100, a}}
	l = l.assign(50, 100, b)
	l = l.assign(20, 50, b)
	if len(l) != 2 || l[0] != (Extent{0, 20, a}) || l[1] != (Extent{20, 100, b}) {
		t.Fatalf("layout %+v", l)
	}
	if x, ok := l.Lookup(20); !ok || x.On != b {
		t.Fatalf("lookup 20: %+v %v", x, ok)
	}
	if _, ok := l.Lookup(100); ok {
		t.Fatal("lookup past the end succeeded")
	}
}

// The source mapping's dm-crypt flags survive into the run's crypt
// tables (helpers and the final one), and nothing else is added.
func TestCryptOptsKept(t *testing.T) {
	src := &dmtable.Crypt{AllowDiscards: true, NoReadWorkqueue: true, SameCPUCrypt: true}
	cs := CryptSpec{Cipher: "aes-xts-plain64", KeyBytes: 64, SectorSize: 512, Opts: cryptOpts(src)}
	if cs.Opts != "allow_discards same_cpu_crypt no_read_workqueue" {
		t.Fatalf("opts %q", cs.Opts)
	}
	tg := cryptTarget(0, 8, cs, dmtable.HexKey(make([]byte, 64)), 0, dmtable.Dev{Major: 8}, 2048)
	c := tg.Params.(*dmtable.Crypt)
	if !c.AllowDiscards || !c.NoReadWorkqueue || !c.SameCPUCrypt || c.SubmitFromCryptCPUs || c.NoWriteWorkqueue {
		t.Fatalf("crypt target flags: %+v", c)
	}
	if s := (dmtable.Table{tg}).String(); !strings.Contains(s, "allow_discards") || !strings.Contains(s, "no_read_workqueue") {
		t.Fatalf("table %q lacks the flags", s)
	}
	if cryptOpts(&dmtable.Crypt{}) != "" {
		t.Fatal("flags out of nothing")
	}
}

// TestShrinkTargetHints: the refusal's hint for a PV that must shrink
// says each thing once: the size it can shrink to when its tail is free,
// else what is in the way (FitSize's error, which names the LV) and to
// rerun with --shrink-pv once that is moved.
func TestShrinkTargetHints(t *testing.T) {
	pv := &PV{Size: 262144, UsedEnd: 100000, PEStart: 2048, ExtentSize: 8192}
	target, hint, free := pv.shrinkTarget(196608, "/dev/vdd")
	if !free || target != 190464 || hint != "make room: pvresize --setphysicalvolumesize 190464s /dev/vdd, or rerun with --shrink-pv" {
		t.Errorf("free tail: %d %q %v", target, hint, free)
	}

	pv.UsedEnd = 256000
	_, hint, free = pv.shrinkTarget(196608, "/dev/vdd")
	if free || hint != "the PV's extents up to sector 256000 are in use, so it cannot shrink to 196608 sectors: move or reduce the LVs at its end (pvmove, lvreduce), then rerun with --shrink-pv" {
		t.Errorf("used tail: %q %v", hint, free)
	}

	pv.FitSize = func(limit Sectors) (Sectors, error) {
		return 0, fmt.Errorf("cannot shrink PV /dev/vdd to %d sectors: extent 30, the last allocated one, belongs to LV vgc/full", limit)
	}
	_, hint, free = pv.shrinkTarget(196608, "/dev/vdd")
	if free || hint != "cannot shrink PV /dev/vdd to 196608 sectors: extent 30, the last allocated one, belongs to LV vgc/full; then rerun with --shrink-pv" {
		t.Errorf("FitSize's refusal: %q %v", hint, free)
	}
}
