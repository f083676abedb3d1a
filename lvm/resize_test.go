package lvm

import (
	"errors"
	"strings"
	"testing"

	"github.com/dmconvert/dmconvert/dmtable"
)

// Recorded VG "svg" (guest TestGuestShrinkPV): 4 MiB extents; /dev/vda
// with LV head at extents 0-9 and LV tail at 50-51; /dev/vdb made with
// --pvmetadatacopies 2 and LV onb at extents 0-1.

func TestReplayShrinkRefused(t *testing.T) {
	r := loadReplay(t, "shrink-refused")
	c := r.client()
	p, err := c.Discover(bg, "/dev/vda")
	if err != nil {
		t.Fatal(err)
	}
	if p.MinSize() != 2048+52*8192 {
		t.Errorf("MinSize %d", p.MinSize())
	}
	// ShrinkPV discovers again and refuses without running pvresize (the
	// replay fails on any command that was not recorded).
	err = c.ShrinkPV(bg, "/dev/vda", 300000)
	r.done()
	var se *ShrinkError
	if !errors.As(err, &se) || !errors.Is(err, ErrExtentsInUse) {
		t.Fatalf("ShrinkPV: %v", err)
	}
	if se.LV != "svg/tail" || se.Extent != 51 || se.Minimum != 2048+52*8192 || se.Requested != 300000 || se.Device != "/dev/vda" {
		t.Errorf("ShrinkError %+v", se)
	}
	if !strings.Contains(err.Error(), "svg/tail") || !strings.Contains(err.Error(), "428032") {
		t.Errorf("message: %v", err)
	}
}

func TestReplayShrinkLVMRefuses(t *testing.T) {
	r := loadReplay(t, "shrink-lvm-refuses")
	_, err := r.client().Run(bg, "pvresize", "-y", "--setphysicalvolumesize", "300000s", "/dev/vda")
	r.done()
	var ce *CommandError
	if !errors.As(err, &ce) || ce.ExitCode != ExitFailed || !errors.Is(err, ErrCommandFailed) || ce.Stderr == "" {
		t.Fatalf("pvresize over allocated extents: %v", err)
	}
}

func TestReplayShrinkToMinimum(t *testing.T) {
	r := loadReplay(t, "shrink-min")
	if err := r.client().ShrinkPV(bg, "/dev/vda", 2048+52*8192); err != nil {
		t.Fatal(err)
	}
	r.done()
}

func TestReplayShrinkFit(t *testing.T) {
	r := loadReplay(t, "shrink-fit")
	c := r.client()
	p, err := c.Discover(bg, "/dev/vda")
	if err != nil {
		t.Fatal(err)
	}
	fit, err := p.FitSize(300000)
	if err != nil || fit != 2048+36*8192 {
		t.Fatalf("FitSize(300000) = %d, %v", fit, err)
	}
	if err := c.ShrinkPV(bg, "/dev/vda", fit); err != nil {
		t.Fatal(err)
	}
	q, err := c.Discover(bg, "/dev/vda")
	r.done()
	if err != nil {
		t.Fatal(err)
	}
	if q.PECount != 36 || q.End() != fit || q.DataEnd() != fit {
		t.Errorf("after the shrink: %d extents, End %d", q.PECount, q.End())
	}
	if _, err := q.FitSize(2048 + 5*8192); !errors.Is(err, ErrExtentsInUse) {
		t.Errorf("FitSize below LV head: %v", err)
	}
}

func TestReplayShrinkTwoMetadataAreas(t *testing.T) {
	r := loadReplay(t, "shrink-2mda")
	c := r.client()
	p, err := c.Discover(bg, "/dev/vdb")
	if err != nil {
		t.Fatal(err)
	}
	tail, ok := p.TailMetadata()
	if !ok || p.MDACount != 2 || len(p.Label.MetadataAreas) != 2 || tail.End() != p.DevSize || tail.Size != 2048 {
		t.Fatalf("tail metadata %+v %v; label %+v", tail, ok, p.Label)
	}
	if p.End() != p.DevSize || p.MinSize() != 2048+2*8192+2048 {
		t.Errorf("End %d MinSize %d", p.End(), p.MinSize())
	}
	fit, err := p.FitSize(200000)
	if err != nil || fit != 2048+23*8192+2048 {
		t.Fatalf("FitSize(200000) = %d, %v", fit, err)
	}
	if err := c.ShrinkPV(bg, "/dev/vdb", fit); err != nil {
		t.Fatal(err)
	}
	q, err := c.Discover(bg, "/dev/vdb")
	if err != nil {
		t.Fatal(err)
	}
	tail, ok = q.TailMetadata()
	// pvresize moved the tail area to end at the new size, and rewrote
	// the label with a device size of size - pe_start - tail area.
	if q.PECount != 23 || !ok || tail.End() != fit || q.End() != fit || q.Label.DeviceSize != fit-2048-2048 {
		t.Errorf("after the shrink: %d extents, tail %+v, End %d, label size %d", q.PECount, tail, q.End(), q.Label.DeviceSize)
	}
	if err := c.ShrinkPV(bg, "/dev/vdb", 2048+8192+tail.Size); !errors.Is(err, ErrExtentsInUse) {
		t.Errorf("shrink over onb: %v", err)
	}
	if err := c.ShrinkPV(bg, "/dev/vdb", q.DevSize+1); err == nil || errors.Is(err, ErrExtentsInUse) {
		t.Errorf("shrink beyond the device: %v", err)
	}
	r.done()
}

func TestReplayGrow(t *testing.T) {
	r := loadReplay(t, "grow")
	if err := r.client().GrowPV(bg, "/dev/vda"); err != nil {
		t.Fatal(err)
	}
	r.done()
}

// The shrink arithmetic on a synthetic PV: 100 extents of 8192 sectors
// after pe_start 2048, the last allocated extent 59 (LV "data").
func TestShrinkArithmetic(t *testing.T) {
	p := &PVInfo{
		Device: "/dev/x", PEStart: 2048, ExtentSize: 8192, PECount: 100, PEAllocCount: 60, DevSize: 2048 + 100*8192,
		Segments: []PVSegment{{Start: 0, Size: 10, LV: "a", LVUUID: "A"}, {Start: 10, Size: 40}, {Start: 50, Size: 10, LV: "data", LVUUID: "D"}, {Start: 60, Size: 40}},
		VG:       &VG{Name: "vg"},
		Label:    &Label{MetadataAreas: []Area{{Start: 8, Size: 2040}}},
	}
	used := dmtable.Sectors(2048 + 60*8192)
	if p.TailFree() != 40*8192 {
		t.Errorf("TailFree %d", p.TailFree())
	}
	if p.UsedEnd() != used || p.MinSize() != used || p.End() != 2048+100*8192 {
		t.Errorf("UsedEnd %d MinSize %d End %d", p.UsedEnd(), p.MinSize(), p.End())
	}
	for _, tc := range []struct {
		size dmtable.Sectors
		ok   bool
	}{
		{used, true}, {used + 8191, true}, {used - 1, false}, {2048 + 8192, false}, {2048, false}, {0, false},
	} {
		err := p.CheckShrink(tc.size)
		if (err == nil) != tc.ok {
			t.Errorf("CheckShrink(%d) = %v", tc.size, err)
		}
		var se *ShrinkError
		if tc.size > 2048+8192 && !tc.ok && (!errors.As(err, &se) || se.LV != "vg/data" || se.Extent != 59 || se.Minimum != used) {
			t.Errorf("CheckShrink(%d): %#v", tc.size, err)
		}
	}
	if f, err := p.FitSize(used + 8191); err != nil || f != used {
		t.Errorf("FitSize(used+8191) = %d, %v", f, err)
	}
	if f, err := p.FitSize(used + 8192); err != nil || f != used+8192 {
		t.Errorf("FitSize(used+8192) = %d, %v", f, err)
	}
	if _, err := p.FitSize(used - 1); !errors.Is(err, ErrExtentsInUse) {
		t.Errorf("FitSize(used-1): %v", err)
	} else if se := err.(*ShrinkError); se.Requested != used-1 {
		t.Errorf("FitSize error names %d, asked %d", se.Requested, used-1)
	}
	// A metadata area at the end counts in End, MinSize and FitSize.
	p.Label.MetadataAreas = append(p.Label.MetadataAreas, Area{Start: 2048 + 100*8192, Size: 2048})
	if p.End() != 2048+100*8192+2048 || p.MinSize() != used+2048 {
		t.Errorf("with a tail mda: End %d MinSize %d", p.End(), p.MinSize())
	}
	if f, err := p.FitSize(used + 2048 + 100); err != nil || f != used+2048 {
		t.Errorf("FitSize with a tail mda = %d, %v", f, err)
	}
	// Nothing allocated.
	q := &PVInfo{PEStart: 2048, ExtentSize: 8192, PECount: 3, Segments: []PVSegment{{Start: 0, Size: 3}}, VG: &VG{Name: "vg"}}
	if _, ok := q.LastAllocated(); ok || q.UsedEnd() != 2048 {
		t.Errorf("empty PV: UsedEnd %d", q.UsedEnd())
	}
	if err := q.CheckShrink(2048 + 8192); err != nil {
		t.Errorf("empty PV to one extent: %v", err)
	}
}
