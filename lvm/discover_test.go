package lvm

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"sort"
	"strings"
	"testing"

	"github.com/dmconvert/dmconvert/dmtable"
)

var bg = context.Background()

func lvNames(lvs []*LV) []string {
	var n []string
	for _, lv := range lvs {
		n = append(n, lv.Name)
	}
	sort.Strings(n)
	return n
}

// The recorded VG "dvg" (guest TestGuestDiscover): extent size 4 MiB on
// /dev/vda and /dev/vdb; lin 40m on vda, striped 32m over both, a 32m
// thin pool with thin1, a 12m snapshot of lin, raid1 r1 16m over both,
// inactive inact 8m on vda.
func TestReplayDiscoverMixed(t *testing.T) {
	r := loadReplay(t, "discover-mixed-a")
	p, err := r.client().Discover(bg, "/dev/vda")
	r.done()
	if err != nil {
		t.Fatal(err)
	}
	if p.Device != "/dev/vda" || p.Name != "/dev/vda" || p.Dev != (dmtable.Dev{Major: 254, Minor: 0}) {
		t.Errorf("identity: %s %s %v", p.Device, p.Name, p.Dev)
	}
	if p.PEStart != 2048 || p.ExtentSize != 8192 || p.PECount != 63 || p.PEAllocCount != 34 || p.DevSize != 524288 {
		t.Errorf("geometry: pe_start %d extent %d count %d alloc %d dev %d", p.PEStart, p.ExtentSize, p.PECount, p.PEAllocCount, p.DevSize)
	}
	if p.Size != 63*8192 {
		t.Errorf("pv_size %d: lvm reports PECount*ExtentSize for a PV in a VG", p.Size)
	}
	if p.Label == nil || p.Label.UUID != p.UUID || len(p.Label.MetadataAreas) != 1 ||
		p.Label.MetadataAreas[0] != (Area{Start: 8, Size: 2040}) || p.MDASize != 2040 || p.MDACount != 1 {
		t.Errorf("label %+v, mda count %d size %d", p.Label, p.MDACount, p.MDASize)
	}
	if got, want := lvNames(p.LVs()), []string{"inact", "lin", "lvol0_pmspare", "pool_tdata", "pool_tmeta", "r1_rimage_0", "r1_rmeta_0", "snap", "striped"}; !slices.Equal(got, want) {
		t.Errorf("LVs on the PV: %v, want %v", got, want)
	}
	if len(p.VG.LVs) != 14 || len(p.VG.PVs) != 2 {
		t.Errorf("VG has %d LVs and %d PVs", len(p.VG.LVs), len(p.VG.PVs))
	}
	last, ok := p.LastAllocated()
	if !ok || last.LV != "inact" || last.End() != 34 {
		t.Errorf("last allocated %+v %v", last, ok)
	}
	if p.UsedEnd() != 2048+34*8192 || p.MinSize() != p.UsedEnd() || p.DataEnd() != 2048+63*8192 || p.End() != p.DataEnd() {
		t.Errorf("UsedEnd %d MinSize %d DataEnd %d End %d", p.UsedEnd(), p.MinSize(), p.DataEnd(), p.End())
	}
	if _, ok := p.TailMetadata(); ok {
		t.Error("a one-mda PV has a tail metadata area")
	}
	if err := p.Check(); err != nil {
		t.Errorf("Check: %v", err)
	}
	vg := p.VG
	lin := vg.LV("lin")
	if lin == nil || !lin.Active || lin.Hidden || !lin.Public() || !lin.HasRole("origin") || lin.DMName() != "dvg-lin" ||
		lin.FullName != "dvg/lin" || lin.Size != 81920 || len(lin.Segments) != 1 {
		t.Fatalf("lin: %+v", lin)
	}
	if s := lin.Segments[0]; s.Type != "linear" || s.Extents != 10 ||
		!slices.Equal(s.Devices, []SegmentArea{{PV: "/dev/vda", PVUUID: p.UUID, Start: 0}}) {
		t.Errorf("lin segment %+v", s)
	}
	st := vg.LV("striped").Segments[0]
	if st.Type != "striped" || st.Stripes != 2 || st.StripeSize != 128 || len(st.Devices) != 2 ||
		st.Devices[0].PV != "/dev/vda" || st.Devices[1].PV != "/dev/vdb" || st.Devices[1].PVUUID == "" {
		t.Errorf("striped segment %+v", st)
	}
	r1 := vg.LV("r1").Segments[0]
	if r1.Type != "raid1" || !slices.Equal(r1.Devices, []SegmentArea{{LV: "r1_rimage_0"}, {LV: "r1_rimage_1"}}) ||
		!slices.Equal(r1.MetadataDevices, []SegmentArea{{LV: "r1_rmeta_0"}, {LV: "r1_rmeta_1"}}) {
		t.Errorf("raid1 segment %+v", r1)
	}
	img := vg.LV("r1_rimage_0")
	if !img.Hidden || img.Public() || !img.HasRole("image") || img.Parent != "r1" {
		t.Errorf("r1_rimage_0 %+v", img)
	}
	pool := vg.LV("pool")
	if pool.DataLV != "pool_tdata" || pool.MetadataLV != "pool_tmeta" || pool.Segments[0].Type != "thin-pool" ||
		!slices.Equal(pool.Segments[0].Devices, []SegmentArea{{LV: "pool_tdata"}}) {
		t.Errorf("pool %+v", pool)
	}
	thin := vg.LV("thin1")
	if thin.Pool != "pool" || thin.Segments[0].Type != "thin" || thin.Segments[0].Devices != nil || !thin.Active {
		t.Errorf("thin1 %+v", thin)
	}
	if snap := vg.LV("snap"); snap.Origin != "lin" || !snap.HasRole("snapshot") {
		t.Errorf("snap %+v", snap)
	}
	if in := vg.LV("inact"); in.Active || !in.Kernel.IsZero() || in.Open {
		t.Errorf("inact %+v", in)
	}
	if spare := vg.LV("[lvol0_pmspare]"); spare == nil || !spare.HasRole("spare") || spare.Active {
		t.Errorf("pmspare %+v", spare)
	}
	// Describe mentions what a dry run must show.
	var b strings.Builder
	if err := p.Describe(&b); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"/dev/vda", "dvg/inact", "dvg/r1_rimage_0", "280576 sectors", "other public LVs of dvg: r1, thin1"} {
		if !strings.Contains(b.String(), s) {
			t.Errorf("Describe lacks %q:\n%s", s, b.String())
		}
	}
	// The JSON form round-trips.
	js, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	var back PVInfo
	if err := json.Unmarshal(js, &back); err != nil || back.UUID != p.UUID || len(back.VG.LVs) != 14 || back.UsedEnd() != p.UsedEnd() {
		t.Errorf("JSON round trip: %v", err)
	}
}

func TestReplayDiscoverOtherPV(t *testing.T) {
	r := loadReplay(t, "discover-mixed-b")
	p, err := r.client().Discover(bg, "/dev/vdb")
	r.done()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := lvNames(p.LVs()), []string{"r1_rimage_1", "r1_rmeta_1", "striped"}; !slices.Equal(got, want) {
		t.Errorf("LVs on vdb: %v, want %v", got, want)
	}
	if p.PEAllocCount != 9 || p.UsedEnd() != 2048+9*8192 {
		t.Errorf("alloc %d UsedEnd %d", p.PEAllocCount, p.UsedEnd())
	}
}

func TestReplayDiscoverErrors(t *testing.T) {
	for _, tc := range []struct {
		scene, device string
		check         func(error) bool
		what          string
	}{
		{"discover-blank", "/dev/vdd", func(err error) bool {
			var ne *NotPVError
			return errors.As(err, &ne) && !ne.Labelled && errors.Is(err, ErrNotPV)
		}, "NotPVError without label"},
		{"discover-orphan", "/dev/vdd", func(err error) bool { return errors.Is(err, ErrNoVG) && !errors.Is(err, ErrNotPV) }, "ErrNoVG"},
		{"discover-filtered", "/dev/vdd", func(err error) bool {
			var ne *NotPVError
			var ce *CommandError
			return errors.As(err, &ne) && ne.Labelled && errors.As(err, &ce) && ce.ExitCode == ExitFailed
		}, "labelled NotPVError with lvm's exit 5"},
		{"discover-devnull", "/dev/null", func(err error) bool { return err != nil && strings.Contains(err.Error(), "not a block device") }, "not a block device"},
		{"discover-duplicate", "/dev/mapper/dcopy", func(err error) bool {
			var de *DuplicateError
			return errors.As(err, &de) && errors.Is(err, ErrDuplicatePV) && de.Chosen == "/dev/vdb" && de.Device == "/dev/mapper/dcopy"
		}, "DuplicateError choosing /dev/vdb"},
	} {
		t.Run(tc.scene, func(t *testing.T) {
			r := loadReplay(t, tc.scene)
			_, err := r.client().Discover(bg, tc.device)
			r.done()
			if !tc.check(err) {
				t.Errorf("got %v (%T), want %s", err, err, tc.what)
			}
			t.Log(err)
		})
	}
}

func TestReplayDiscoverRestricted(t *testing.T) {
	r := loadReplay(t, "discover-restricted")
	c := r.client()
	c.Devices = []string{"/dev/mapper/dcopy", "/dev/vda"}
	p, err := c.Discover(bg, "/dev/mapper/dcopy")
	r.done()
	if err != nil {
		t.Fatal(err)
	}
	if p.Name != "/dev/mapper/dcopy" || p.Dev.Major != 253 || p.VG.PV(p.UUID).Name != "/dev/mapper/dcopy" {
		t.Errorf("restricted: %s %v", p.Name, p.Dev)
	}
	// The stripe's second leg now names the copy.
	if st := p.VG.LV("striped").Segments[0]; st.Devices[1].PV != "/dev/mapper/dcopy" || st.Devices[1].PVUUID != p.UUID {
		t.Errorf("striped devices %+v", st.Devices)
	}
}

func TestReplayDiscoverPartial(t *testing.T) {
	r := loadReplay(t, "discover-partial")
	c := r.client()
	c.Devices = []string{"/dev/vda"}
	p, err := c.Discover(bg, "/dev/vda")
	r.done()
	if err != nil {
		t.Fatal(err)
	}
	err = p.Check()
	var ve *VGError
	if !errors.As(err, &ve) || !errors.Is(err, ErrUnsupportedVG) || ve.VG != "dvg" || !p.VG.Partial || p.VG.MissingPVCount != 1 {
		t.Errorf("Check of a partial VG: %v", err)
	}
	var missing *VGPV
	for i := range p.VG.PVs {
		if p.VG.PVs[i].Missing {
			missing = &p.VG.PVs[i]
		}
	}
	if missing == nil || missing.Name != "[unknown]" || !missing.Dev.IsZero() {
		t.Errorf("missing PV entry %+v", missing)
	}
	// Segments on the missing PV are kept, named [unknown].
	if st := p.VG.LV("striped").Segments[0]; len(st.Devices) != 2 || st.Devices[1].PV != "[unknown]" || st.Devices[1].PVUUID != missing.UUID {
		t.Errorf("striped devices with a missing PV: %+v", st.Devices)
	}
}
