package lvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"

	"github.com/dmconvert/dmconvert/dmtable"
	"golang.org/x/sys/unix"
)

// The fields Discover asks for. Two commands: pvs on the device (which
// PV, which VG), then one fullreport of that VG, so that every sub-report
// comes from one scan of one consistent copy of the metadata.
var (
	pvLookupFields = []string{"pv_name", "pv_uuid", "pv_major", "pv_minor", "pv_duplicate", "vg_name", "vg_uuid"}

	vgFields = []string{"vg_name", "vg_uuid", "vg_attr", "vg_permissions", "vg_extent_size", "vg_extent_count",
		"vg_free_count", "vg_seqno", "vg_lock_type", "vg_shared", "vg_clustered", "vg_exported", "vg_partial",
		"vg_missing_pv_count", "vg_systemid"}
	pvFields = []string{"pv_name", "pv_uuid", "pv_major", "pv_minor", "dev_size", "pv_size", "pe_start",
		"pv_pe_count", "pv_pe_alloc_count", "pv_mda_count", "pv_mda_used_count", "pv_mda_size", "pv_ba_start",
		"pv_ba_size", "pv_allocatable", "pv_exported", "pv_missing", "pv_duplicate", "pv_device_id",
		"pv_device_id_type"}
	lvFields = []string{"lv_uuid", "lv_name", "lv_full_name", "lv_attr", "lv_layout", "lv_role", "lv_dm_path",
		"lv_kernel_major", "lv_kernel_minor", "lv_size", "lv_parent", "origin", "pool_lv", "data_lv",
		"metadata_lv", "lv_skip_activation", "lv_device_open"}
	segFields = []string{"lv_uuid", "segtype", "seg_start", "seg_size", "seg_start_pe", "seg_size_pe",
		"stripes", "stripe_size", "devices", "metadata_devices"}
	pvsegFields = []string{"pv_uuid", "pvseg_start", "pvseg_size", "lv_uuid", "lv_name"}
)

// fullreportArgs is the argument list of the fullreport for one VG.
func fullreportArgs(vg string) []string {
	a := append([]string{}, reportFlags...)
	a = append(a, "--all",
		"--configreport", "vg", "-o", strings.Join(vgFields, ","),
		"--configreport", "pv", "-o", strings.Join(pvFields, ","),
		"--configreport", "lv", "-o", strings.Join(lvFields, ","),
		"--configreport", "seg", "-o", strings.Join(segFields, ","),
		"--configreport", "pvseg", "-o", strings.Join(pvsegFields, ","),
		"--", vg)
	return a
}

func pvLookupArgs(device string) []string {
	a := append([]string{}, reportFlags...)
	return append(a, "-o", strings.Join(pvLookupFields, ","), "--", device)
}

// Discover tells what LVM has on device (a disk or partition path): the
// PV, its extent map, its label, and the whole VG with every LV. It
// fails with a *NotPVError (ErrNotPV) when the device is not a PV lvm
// reports, ErrNoVG when the PV is in no VG, a *DuplicateError
// (ErrDuplicatePV) when lvm uses another device carrying the same PV.
// It does not judge the VG: call PVInfo.Check for that.
//
// Discover takes LVM's locks like any lvm command (shared on the VG), so
// it waits while a Fence is held; use Fence.Discover then.
func (c *Client) Discover(ctx context.Context, device string) (*PVInfo, error) {
	return c.discover(ctx, device, lockNormal)
}

func (c *Client) discover(ctx context.Context, device string, lock lockMode) (*PVInfo, error) {
	dev, err := c.blockDevice(device)
	if err != nil {
		return nil, err
	}
	look, err := c.lookupPV(ctx, device, dev, lock)
	if err != nil {
		return nil, err
	}
	out, err := c.run(ctx, call{cmd: "fullreport", args: fullreportArgs(look.vgName), lock: lock, devices: true})
	if err != nil {
		return nil, fmt.Errorf("reporting volume group %s of %s: %w", look.vgName, device, err)
	}
	rep, err := parseReport(out)
	if err != nil {
		return nil, fmt.Errorf("reporting volume group %s of %s: %w", look.vgName, device, err)
	}
	label, err := c.label(device)
	if err != nil {
		return nil, err
	}
	return assemble(device, dev, look.pvUUID, look.vgUUID, rep, label)
}

type pvLookup struct {
	name, pvUUID, vgName, vgUUID string
}

// lookupPV finds which PV device is and its VG, with pvs <device>.
func (c *Client) lookupPV(ctx context.Context, device string, dev dmtable.Dev, lock lockMode) (*pvLookup, error) {
	out, runErr := c.run(ctx, call{cmd: "pvs", args: pvLookupArgs(device), lock: lock, devices: true})
	var row map[string]string
	if rep, perr := parseReport(out); perr == nil {
		for _, r := range rep.rows("pv") {
			f := &fieldReader{kind: "pv", row: r}
			if d, ok := f.dev("pv_major", "pv_minor"); ok && d == dev && f.err == nil {
				row = r
				break
			}
		}
	} else if runErr == nil {
		return nil, fmt.Errorf("looking up PV %s: %w", device, perr)
	}
	if row == nil {
		// lvm lists nothing (and exits 5) both for a device without a
		// label and for one it filters out; the label tells them apart.
		if _, lerr := c.label(device); lerr != nil {
			if errors.Is(lerr, errNoLabel) {
				return nil, &NotPVError{Device: device}
			}
			return nil, fmt.Errorf("%s: lvm does not report a PV, and reading its label failed: %w", device, errors.Join(lerr, runErr))
		}
		return nil, &NotPVError{Device: device, Labelled: true, Err: runErr}
	}
	if runErr != nil {
		return nil, fmt.Errorf("looking up PV %s: %w", device, runErr)
	}
	f := &fieldReader{kind: "pv", row: row}
	look := &pvLookup{name: f.str("pv_name"), pvUUID: f.str("pv_uuid"), vgName: f.str("vg_name"), vgUUID: f.str("vg_uuid")}
	dup := f.flag("pv_duplicate")
	if f.err != nil {
		return nil, fmt.Errorf("looking up PV %s: %w", device, f.err)
	}
	if dup {
		return nil, &DuplicateError{Device: device, UUID: look.pvUUID, Chosen: c.chosenDevice(ctx, look.pvUUID, lock)}
	}
	if look.vgName == "" {
		return nil, fmt.Errorf("%s (PV %s): %w", device, look.pvUUID, ErrNoVG)
	}
	return look, nil
}

// chosenDevice is the device lvm uses for a duplicated PV ("" if it
// cannot tell): pvs without arguments lists only the chosen ones.
func (c *Client) chosenDevice(ctx context.Context, uuid string, lock lockMode) string {
	args := append(append([]string{}, reportFlags...), "-o", "pv_name,pv_uuid,pv_duplicate")
	out, err := c.run(ctx, call{cmd: "pvs", args: args, lock: lock, devices: true})
	if err != nil {
		return ""
	}
	rep, err := parseReport(out)
	if err != nil {
		return ""
	}
	for _, r := range rep.rows("pv") {
		if r["pv_uuid"] == uuid && r["pv_duplicate"] != "1" {
			return r["pv_name"]
		}
	}
	return ""
}

// assemble builds a PVInfo from the fullreport of its VG and its label.
// It is pure: unit tests feed it captured reports.
func assemble(device string, dev dmtable.Dev, pvUUID, vgUUID string, rep *rawReport, label *Label) (*PVInfo, error) {
	// A fullreport has one report object per VG; pick ours by UUID
	// (two VGs may share a name).
	var obj map[string][]map[string]string
	for _, o := range rep.Report {
		for _, v := range o["vg"] {
			if v["vg_uuid"] == vgUUID {
				obj = o
			}
		}
	}
	if obj == nil {
		return nil, fmt.Errorf("%w: volume group %s of %s is not in the report", ErrBadReport, vgUUID, device)
	}
	vg, err := parseVG(obj["vg"][0])
	if err != nil {
		return nil, err
	}
	var p *PVInfo
	for _, r := range obj["pv"] {
		pv, info, err := parsePV(r)
		if err != nil {
			return nil, err
		}
		vg.PVs = append(vg.PVs, pv)
		if pv.UUID == pvUUID {
			p = info
		}
	}
	if p == nil {
		return nil, fmt.Errorf("%w: PV %s of %s is not in the report of VG %s", ErrBadReport, pvUUID, device, vg.Name)
	}
	for _, r := range obj["lv"] {
		lv, err := parseLV(r)
		if err != nil {
			return nil, err
		}
		vg.LVs = append(vg.LVs, lv)
	}
	for _, r := range obj["seg"] {
		f := &fieldReader{kind: "seg", row: r}
		lv := vg.LVByUUID(f.str("lv_uuid"))
		seg := LVSegment{
			Type:        f.str("segtype"),
			Start:       f.sectors("seg_start"),
			Size:        f.sectors("seg_size"),
			StartExtent: f.u64("seg_start_pe"),
			Extents:     f.u64("seg_size_pe"),
			Stripes:     f.u64("stripes"),
			StripeSize:  f.sectors("stripe_size"),
		}
		devs, mdevs := f.str("devices"), f.str("metadata_devices")
		if f.err != nil {
			return nil, f.err
		}
		if lv == nil {
			return nil, fmt.Errorf("%w: segment of unknown LV %s", ErrBadReport, r["lv_uuid"])
		}
		if seg.Devices, err = parseAreas(devs, vg); err != nil {
			return nil, fmt.Errorf("LV %s: %w", lv.FullName, err)
		}
		if seg.MetadataDevices, err = parseAreas(mdevs, vg); err != nil {
			return nil, fmt.Errorf("LV %s: %w", lv.FullName, err)
		}
		lv.Segments = append(lv.Segments, seg)
	}
	for _, r := range obj["pvseg"] {
		f := &fieldReader{kind: "pvseg", row: r}
		if f.str("pv_uuid") != pvUUID {
			continue
		}
		s := PVSegment{Start: f.u64("pvseg_start"), Size: f.u64("pvseg_size"), LVUUID: f.str("lv_uuid"), LV: unbracket(f.str("lv_name"))}
		if f.err != nil {
			return nil, f.err
		}
		p.Segments = append(p.Segments, s)
	}
	sortSegments(p.Segments)
	if err := checkSegments(p); err != nil {
		return nil, err
	}
	p.Device = device
	p.Dev = dev
	p.ExtentSize = vg.ExtentSize
	p.VG = vg
	p.Label = label
	if label != nil && label.UUID != p.UUID {
		return nil, fmt.Errorf("%s: the label says PV %s, lvm reports PV %s", device, label.UUID, p.UUID)
	}
	return p, nil
}

func parseVG(r map[string]string) (*VG, error) {
	f := &fieldReader{kind: "vg", row: r}
	vg := &VG{
		Name:           f.str("vg_name"),
		UUID:           f.str("vg_uuid"),
		Attr:           f.str("vg_attr"),
		Permissions:    f.str("vg_permissions"),
		ExtentSize:     f.sectors("vg_extent_size"),
		ExtentCount:    f.u64("vg_extent_count"),
		FreeCount:      f.u64("vg_free_count"),
		SeqNo:          f.u64("vg_seqno"),
		LockType:       f.str("vg_lock_type"),
		Shared:         f.flag("vg_shared"),
		Clustered:      f.flag("vg_clustered"),
		Exported:       f.flag("vg_exported"),
		Partial:        f.flag("vg_partial"),
		MissingPVCount: int(f.u64("vg_missing_pv_count")),
		SystemID:       f.str("vg_systemid"),
	}
	if f.err == nil && vg.ExtentSize == 0 {
		f.fail("vg_extent_size", "zero")
	}
	return vg, f.err
}

// parsePV reads one row of the pv sub-report, as the VG's PV list entry
// and as a PVInfo (of which the caller keeps the one it asked about).
func parsePV(r map[string]string) (VGPV, *PVInfo, error) {
	f := &fieldReader{kind: "pv", row: r}
	dev, _ := f.dev("pv_major", "pv_minor")
	p := &PVInfo{
		Name:         f.str("pv_name"),
		UUID:         f.str("pv_uuid"),
		DevSize:      f.sectors("dev_size"),
		Size:         f.sectors("pv_size"),
		PEStart:      f.sectors("pe_start"),
		PECount:      f.u64("pv_pe_count"),
		PEAllocCount: f.u64("pv_pe_alloc_count"),
		MDACount:     int(f.u64("pv_mda_count")),
		MDAUsedCount: int(f.u64("pv_mda_used_count")),
		MDASize:      f.sectors("pv_mda_size"),
		Bootloader:   Area{Start: f.sectors("pv_ba_start"), Size: f.sectors("pv_ba_size")},
		Allocatable:  f.flag("pv_allocatable"),
		Exported:     f.flag("pv_exported"),
		Missing:      f.flag("pv_missing"),
		DeviceID:     f.str("pv_device_id"),
		DeviceIDType: f.str("pv_device_id_type"),
	}
	dup := f.flag("pv_duplicate")
	if f.err != nil {
		return VGPV{}, nil, f.err
	}
	pv := VGPV{
		Name: p.Name, UUID: p.UUID, Dev: dev, Missing: p.Missing, Duplicate: dup,
		DevSize: p.DevSize, PEStart: p.PEStart, PECount: p.PECount, PEAllocCount: p.PEAllocCount,
	}
	return pv, p, nil
}

func parseLV(r map[string]string) (*LV, error) {
	f := &fieldReader{kind: "lv", row: r}
	name := f.str("lv_name")
	lv := &LV{
		Name:           unbracket(name),
		Hidden:         strings.HasPrefix(name, "["),
		FullName:       f.str("lv_full_name"),
		UUID:           f.str("lv_uuid"),
		Attr:           f.str("lv_attr"),
		Layout:         splitList(f.str("lv_layout")),
		Roles:          splitList(f.str("lv_role")),
		DMPath:         f.str("lv_dm_path"),
		Size:           f.sectors("lv_size"),
		Parent:         unbracket(f.str("lv_parent")),
		Origin:         unbracket(f.str("origin")),
		Pool:           unbracket(f.str("pool_lv")),
		DataLV:         unbracket(f.str("data_lv")),
		MetadataLV:     unbracket(f.str("metadata_lv")),
		SkipActivation: f.flag("lv_skip_activation"),
		Open:           f.flag("lv_device_open"),
	}
	lv.Kernel, lv.Active = f.dev("lv_kernel_major", "lv_kernel_minor")
	return lv, f.err
}

// parseAreas parses a segment's "devices" field: comma-separated
// "name(first extent)" entries, where name is a PV device (or
// "[unknown]" for a missing one) or a sub-LV.
func parseAreas(s string, vg *VG) ([]SegmentArea, error) {
	var out []SegmentArea
	for _, item := range splitList(s) {
		open := strings.LastIndexByte(item, '(')
		if open <= 0 || !strings.HasSuffix(item, ")") {
			return nil, fmt.Errorf("%w: segment device %q", ErrBadReport, item)
		}
		start, err := strconv.ParseUint(item[open+1:len(item)-1], 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%w: segment device %q", ErrBadReport, item)
		}
		name := item[:open]
		a := SegmentArea{Start: start}
		if pv := vg.pvByName(name); pv != nil {
			a.PV, a.PVUUID = pv.Name, pv.UUID
		} else if vg.LV(name) != nil {
			a.LV = unbracket(name)
		} else if strings.HasPrefix(name, "/") || name == "[unknown]" {
			// a PV lvm names but cannot tell apart (several missing)
			a.PV = name
		} else {
			return nil, fmt.Errorf("%w: segment device %q is neither a PV nor an LV of VG %s", ErrBadReport, item, vg.Name)
		}
		out = append(out, a)
	}
	return out, nil
}

// pvByName finds the VG's PV lvm prints as name; nil when none or when
// the name is ambiguous (several missing PVs are all "[unknown]").
func (vg *VG) pvByName(name string) *VGPV {
	var found *VGPV
	for i := range vg.PVs {
		if vg.PVs[i].Name == name {
			if found != nil {
				return nil
			}
			found = &vg.PVs[i]
		}
	}
	return found
}

func sortSegments(s []PVSegment) {
	for i := 1; i < len(s); i++ {
		for j := i; j > 0 && s[j].Start < s[j-1].Start; j-- {
			s[j], s[j-1] = s[j-1], s[j]
		}
	}
}

// checkSegments verifies that the PV's segments tile [0, PECount) and
// agree with pe_alloc_count: the shrink arithmetic relies on it.
func checkSegments(p *PVInfo) error {
	var next, alloc uint64
	for _, s := range p.Segments {
		if s.Start != next {
			return fmt.Errorf("%w: PV %s segments leave a gap or overlap at extent %d", ErrBadReport, p.Name, next)
		}
		next = s.End()
		if !s.Free() {
			alloc += s.Size
		}
	}
	if next != p.PECount || alloc != p.PEAllocCount {
		return fmt.Errorf("%w: PV %s segments cover %d extents (%d allocated), lvm says %d (%d allocated)",
			ErrBadReport, p.Name, next, alloc, p.PECount, p.PEAllocCount)
	}
	return nil
}

// blockDevice returns the device number of a block device path.
func blockDevice(path string) (dmtable.Dev, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return dmtable.Dev{}, fmt.Errorf("examining %s: %w", path, err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok || fi.Mode()&os.ModeDevice == 0 || fi.Mode()&os.ModeCharDevice != 0 {
		return dmtable.Dev{}, fmt.Errorf("%s is not a block device", path)
	}
	return dmtable.Dev{Major: unix.Major(uint64(st.Rdev)), Minor: unix.Minor(uint64(st.Rdev))}, nil
}
