package logwrites

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand"
	"slices"
	"testing"
)

// logBuilder writes a log the way the kernel lays it out (written here
// from the format description, independently of the parser): the super
// block in sector 0, then per entry one sector of header (and mark text)
// and the data sectors unless it is a discard.
type logBuilder struct {
	ss      int
	buf     []byte
	entries int
}

func newBuilder(ss int) *logBuilder {
	return &logBuilder{ss: ss, buf: make([]byte, ss)}
}

func (b *logBuilder) add(sector, sectors uint64, flags Flags, mark string, data []byte) {
	h := make([]byte, b.ss)
	binary.LittleEndian.PutUint64(h[0:], sector)
	binary.LittleEndian.PutUint64(h[8:], sectors)
	binary.LittleEndian.PutUint64(h[16:], uint64(flags))
	binary.LittleEndian.PutUint64(h[24:], uint64(len(mark)))
	copy(h[32:], mark)
	b.buf = append(b.buf, h...)
	if flags&FlagDiscard == 0 && flags&FlagMark == 0 {
		if len(data) != int(sectors)*b.ss {
			panic("data length")
		}
		b.buf = append(b.buf, data...)
	}
	b.entries++
}

func (b *logBuilder) write(sector uint64, flags Flags, data []byte) {
	b.add(sector, uint64(len(data)/b.ss), flags, "", data)
}

func (b *logBuilder) mark(s string) { b.add(0, 0, FlagMark, s, nil) }

// bytes returns the log with its super block; tail bytes of zeroes are
// appended (a log device is larger than its log).
func (b *logBuilder) bytes(tail int) []byte {
	out := append([]byte(nil), b.buf...)
	binary.LittleEndian.PutUint64(out[0:], Magic)
	binary.LittleEndian.PutUint64(out[8:], Version)
	binary.LittleEndian.PutUint64(out[16:], uint64(b.entries))
	binary.LittleEndian.PutUint32(out[24:], uint32(b.ss))
	return append(out, make([]byte, tail)...)
}

func fill(n int, v byte) []byte { return bytes.Repeat([]byte{v}, n) }

func openBytes(t *testing.T, b []byte) (*Log, []Entry) {
	t.Helper()
	l, err := Open(bytes.NewReader(b), int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	es, err := l.Entries()
	if err != nil {
		t.Fatal(err)
	}
	return l, es
}

func TestParseEveryKind(t *testing.T) {
	for _, ss := range []int{512, 4096} {
		t.Run(fmt.Sprint(ss), func(t *testing.T) {
			b := newBuilder(ss)
			b.write(8, 0, fill(2*ss, 0xaa))                  // 0 plain write
			b.add(0, 0, FlagFlush, "", nil)                  // 1 empty flush
			b.mark("start")                                  // 2
			b.write(2, FlagFUA|FlagMetadata, fill(ss, 0xbb)) // 3 FUA metadata
			b.write(3, FlagFlush|FlagFUA, fill(3*ss, 0xcc))  // 4 flush with data
			b.add(9, 1, FlagDiscard, "", nil)                // 5 discard: no data in the log
			b.write(0, 0, fill(ss, 0xdd))                    // 6
			b.mark("dm-log-writes-end")                      // 7
			raw := b.bytes(5 * ss)
			l, es := openBytes(t, raw)
			if l.SectorSize != uint32(ss) || l.NrEntries != 8 || len(es) != 8 {
				t.Fatalf("super %+v, %d entries", l.Super, len(es))
			}
			want := []struct {
				sector, sectors uint64
				flags           Flags
				mark            string
			}{
				{8, 2, 0, ""}, {0, 0, FlagFlush, ""}, {0, 0, FlagMark, "start"}, {2, 1, FlagFUA | FlagMetadata, ""},
				{3, 3, FlagFlush | FlagFUA, ""}, {9, 1, FlagDiscard, ""}, {0, 1, 0, ""}, {0, 0, FlagMark, "dm-log-writes-end"},
			}
			for i, w := range want {
				e := es[i]
				if e.Index != i || e.Sector != w.sector || e.Sectors != w.sectors || e.Flags != w.flags || e.Mark != w.mark {
					t.Errorf("entry %d: %+v, want %+v", i, e, w)
				}
			}
			// Data offsets: super, then header+data per entry.
			if es[0].DataOff != int64(2*ss) || es[3].DataOff != int64(ss*(1+1+2+1+1+1)) {
				t.Errorf("data offsets %d, %d", es[0].DataOff, es[3].DataOff)
			}
			if es[1].DataOff != 0 || es[5].DataOff != 0 || es[2].DataOff != 0 {
				t.Errorf("entries without data have offsets: %+v", es)
			}
			d, err := l.ReadData(es[4])
			if err != nil || !bytes.Equal(d, fill(3*ss, 0xcc)) {
				t.Fatalf("data of entry 4: %v", err)
			}
			if got := FindMark(es, 0, "start"); got != 2 {
				t.Errorf("FindMark start = %d", got)
			}
			if got := FindMark(es, 3, "start"); got != -1 {
				t.Errorf("FindMark after start = %d", got)
			}
			if got := FlushPoints(es, 2, len(es)); !slices.Equal(got, []int{3, 4}) {
				t.Errorf("FlushPoints = %v", got)
			}
			if !es[1].IsFlush() || es[0].IsFlush() || !es[3].IsFlush() || es[1].Writes() || es[7].Writes() || !es[5].Writes() {
				t.Error("IsFlush/Writes disagree with the flags")
			}
			if s := es[4].Flags.String(); s != "FLUSH|FUA" {
				t.Errorf("flags string %q", s)
			}

			// Replay, point by point, onto a 16-sector disk.
			img := NewImage(int64(16 * ss))
			r := NewReplayer(l, es, img, int64(len(img)))
			check := func(through int, want []byte) {
				t.Helper()
				if err := r.ApplyThrough(through); err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(img, want) {
					t.Fatalf("after entry %d the image differs", through)
				}
			}
			model := make([]byte, 16*ss)
			copy(model[8*ss:], fill(2*ss, 0xaa))
			check(0, model)
			check(2, model) // flush and mark change nothing
			copy(model[2*ss:], fill(ss, 0xbb))
			check(3, model)
			copy(model[3*ss:], fill(3*ss, 0xcc))
			check(4, model)
			copy(model[9*ss:], make([]byte, ss)) // the discard zeroes sector 9
			check(5, model)
			copy(model, fill(ss, 0xdd))
			check(7, model)
			if r.Next() != 8 {
				t.Errorf("Next = %d", r.Next())
			}
			if err := r.ApplyThrough(3); err == nil {
				t.Error("replaying backwards did not fail")
			}
			if err := r.ApplyThrough(8); err == nil {
				t.Error("replaying past the end did not fail")
			}
		})
	}
}

// TestRandomLogsReplay: random logs replayed incrementally agree at every
// prefix with an independent model of the disk and with a replay from
// scratch.
func TestRandomLogsReplay(t *testing.T) {
	seed := int64(20240611)
	rng := rand.New(rand.NewSource(seed))
	for round := 0; round < 20; round++ {
		ss := []int{512, 1024, 4096}[rng.Intn(3)]
		const disk = 64
		b := newBuilder(ss)
		model := make([]byte, disk*ss)
		var states [][]byte
		for i := 0; i < 60; i++ {
			switch k := rng.Intn(10); {
			case k < 6:
				n := 1 + rng.Intn(8)
				s := rng.Intn(disk - n + 1)
				d := make([]byte, n*ss)
				rng.Read(d)
				var f Flags
				if rng.Intn(5) == 0 {
					f |= FlagFUA
				}
				if rng.Intn(7) == 0 {
					f |= FlagFlush
				}
				if rng.Intn(4) == 0 {
					f |= FlagMetadata
				}
				b.write(uint64(s), f, d)
				copy(model[s*ss:], d)
			case k < 7:
				n := 1 + rng.Intn(16)
				s := rng.Intn(disk - n + 1)
				b.add(uint64(s), uint64(n), FlagDiscard, "", nil)
				clear(model[s*ss : (s+n)*ss])
			case k < 9:
				b.add(0, 0, FlagFlush, "", nil)
			default:
				b.mark(fmt.Sprintf("m%d", i))
			}
			states = append(states, append([]byte(nil), model...))
		}
		l, es := openBytes(t, b.bytes(rng.Intn(3)*ss))
		if len(es) != len(states) {
			t.Fatalf("seed %d round %d: %d entries, built %d", seed, round, len(es), len(states))
		}
		img := NewImage(int64(disk * ss))
		r := NewReplayer(l, es, img, int64(len(img)))
		for i := range es {
			if rng.Intn(3) == 0 {
				continue // skip some points: ApplyThrough applies every entry in between
			}
			if err := r.ApplyThrough(i); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(img, states[i]) {
				t.Fatalf("seed %d round %d: the image after entry %d (%v) differs from the model", seed, round, i, es[i])
			}
			fresh := NewImage(int64(disk * ss))
			if err := NewReplayer(l, es, fresh, 0).ApplyThrough(i); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(fresh, img) {
				t.Fatalf("seed %d round %d: incremental and fresh replays differ at entry %d", seed, round, i)
			}
		}
	}
}

func TestDamagedLogs(t *testing.T) {
	good := func() *logBuilder {
		b := newBuilder(512)
		b.write(0, 0, fill(1024, 1))
		b.mark("x")
		return b
	}
	put := func(raw []byte, off int, v uint64) []byte {
		binary.LittleEndian.PutUint64(raw[off:], v)
		return raw
	}
	cases := []struct {
		name    string
		raw     []byte
		open    error // from Open
		entries error // from Entries
	}{
		{"bad magic", put(good().bytes(0), 0, 0x1234), ErrNotLog, nil},
		{"zeroes", make([]byte, 4096), ErrNotLog, nil},
		{"version 2", put(good().bytes(0), 8, 2), ErrVersion, nil},
		{"odd sector size", func() []byte {
			r := good().bytes(0)
			binary.LittleEndian.PutUint32(r[24:], 520)
			return r
		}(), ErrCorrupt, nil},
		{"more entries than fit", put(good().bytes(0), 16, 1000), ErrCorrupt, nil},
		{"one entry more than written (a zeroed sector)", put(good().bytes(512), 16, 3), nil, ErrCorrupt},
		{"one entry more than the log holds", put(good().bytes(0), 16, 3), nil, ErrTruncated},
		{"far more entries than the log holds", put(good().bytes(0), 16, 5), ErrCorrupt, nil},
		{"truncated data", good().bytes(0)[:512+512+512], nil, ErrTruncated},
		{"unknown flag", put(good().bytes(0), 512+16, 1<<7), nil, ErrCorrupt},
		{"inline data on a write", put(good().bytes(0), 512+24, 4), nil, ErrCorrupt},
		{"mark too long", put(good().bytes(0), 512+512+1024+24, 600), nil, ErrCorrupt},
		{"huge write", put(good().bytes(0), 512+8, 1<<40), nil, ErrCorrupt},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			l, err := Open(bytes.NewReader(c.raw), int64(len(c.raw)))
			if c.open != nil {
				if !errors.Is(err, c.open) {
					t.Fatalf("Open: %v, want %v", err, c.open)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			_, err = l.Entries()
			if !errors.Is(err, c.entries) {
				t.Fatalf("Entries: %v, want %v", err, c.entries)
			}
		})
	}
	// A count that stops early is not an error: the super block lags
	// behind the entries until the next FUA or mark.
	raw := good().bytes(0)
	put(raw, 16, 1)
	if _, es := openBytes(t, raw); len(es) != 1 {
		t.Fatalf("%d entries, want 1", len(es))
	}
}

func TestReplayBeyondDevice(t *testing.T) {
	b := newBuilder(512)
	b.write(7, 0, fill(1024, 9))
	l, es := openBytes(t, b.bytes(0))
	img := NewImage(4096)
	if err := NewReplayer(l, es, img, int64(len(img))).ApplyThrough(0); err == nil {
		t.Fatal("a write past the end of the device was replayed")
	}
	if _, err := img.WriteAt([]byte{1}, 4096); err == nil {
		t.Fatal("Image accepted a write past its end")
	}
	if n, err := img.ReadAt(make([]byte, 10), 4090); n != 6 || err == nil {
		t.Fatalf("ReadAt at the end: %d, %v", n, err)
	}
}

func TestSamplePoints(t *testing.T) {
	b := newBuilder(512)
	for i := 0; i < 50; i++ {
		switch i % 5 {
		case 0:
			b.add(0, 0, FlagFlush, "", nil)
		case 1:
			b.write(uint64(i), FlagFUA, fill(512, 1))
		case 2:
			b.mark("m")
		default:
			b.write(uint64(i), 0, fill(512, 2))
		}
	}
	_, es := openBytes(t, b.bytes(0))
	rng := rand.New(rand.NewSource(1))
	got := SamplePoints(es, 10, 40, 5, rng.Intn)
	if len(got) != 5 || !slices.IsSorted(got) {
		t.Fatalf("SamplePoints = %v", got)
	}
	seen := map[int]bool{}
	for _, i := range got {
		if i < 10 || i >= 40 || es[i].IsFlush() || !es[i].Writes() || seen[i] {
			t.Fatalf("SamplePoints picked %d (%v) in %v", i, es[i], got)
		}
		seen[i] = true
	}
	again := SamplePoints(es, 10, 40, 5, rand.New(rand.NewSource(1)).Intn)
	if !slices.Equal(got, again) {
		t.Fatalf("same seed, different points: %v, %v", got, again)
	}
	all := SamplePoints(es, 0, len(es), 1000, rng.Intn)
	if len(all) != 20 { // i%5 in {3,4}
		t.Fatalf("asking for more than there are: %d points", len(all))
	}
	if fp := FlushPoints(es, 0, len(es)); len(fp) != 20 {
		t.Fatalf("FlushPoints: %d", len(fp))
	}
}

func TestDistinctFlushPointsAndSpread(t *testing.T) {
	b := newBuilder(512)
	b.add(0, 0, FlagFlush, "", nil)         // 0: nothing written before: not distinct
	b.write(1, 0, fill(512, 1))             // 1
	b.add(0, 0, FlagFlush, "", nil)         // 2: distinct
	b.add(0, 0, FlagFlush, "", nil)         // 3: same disk as 2
	b.mark("m")                             // 4
	b.write(2, FlagFUA, fill(512, 2))       // 5: FUA with data: distinct
	b.add(3, 1, FlagDiscard, "", nil)       // 6
	b.add(0, 0, FlagFlush|FlagFUA, "", nil) // 7: distinct (the discard)
	b.write(4, FlagFlush, fill(512, 3))     // 8: flush with data: distinct
	_, es := openBytes(t, b.bytes(0))
	if got := DistinctFlushPoints(es, 0, len(es)); !slices.Equal(got, []int{2, 5, 7, 8}) {
		t.Fatalf("DistinctFlushPoints = %v", got)
	}
	if got := DistinctFlushPoints(es, 3, 8); !slices.Equal(got, []int{5, 7}) {
		t.Fatalf("DistinctFlushPoints(3, 8) = %v", got)
	}
	pts := make([]int, 100)
	for i := range pts {
		pts[i] = 3 * i
	}
	rng := rand.New(rand.NewSource(7))
	got := Spread(pts, 10, rng.Intn)
	if len(got) != 10 || !slices.IsSorted(got) {
		t.Fatalf("Spread = %v", got)
	}
	for k, p := range got {
		// one per stretch of ten points
		if p < 30*k || p >= 30*(k+1) || p%3 != 0 {
			t.Fatalf("Spread: point %d (%d) outside its stretch: %v", k, p, got)
		}
	}
	if got := Spread(pts[:5], 10, rng.Intn); !slices.Equal(got, pts[:5]) {
		t.Fatalf("Spread of fewer points than asked: %v", got)
	}
	if got := Spread(pts, 0, rng.Intn); got != nil {
		t.Fatalf("Spread of 0: %v", got)
	}
}
