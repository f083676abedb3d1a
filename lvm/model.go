package lvm

import (
	"fmt"
	"slices"
	"strings"

	"github.com/dmconvert/dmconvert/dmtable"
)

// PVInfo is what LVM has on one physical volume: the PV itself, its
// extent map, and the whole volume group it belongs to. Sizes are
// 512-byte sectors; extent numbers (PE) count from the start of the data
// area (PEStart).
type PVInfo struct {
	Device string      `json:"device"` // the path Discover was given
	Name   string      `json:"name"`   // lvm's name for the device (pv_name)
	Dev    dmtable.Dev `json:"dev"`
	UUID   string      `json:"uuid"`

	DevSize    dmtable.Sectors `json:"dev_size"`    // size of the device now
	Size       dmtable.Sectors `json:"pv_size"`     // pv_size: PECount*ExtentSize (lvm's report value)
	PEStart    dmtable.Sectors `json:"pe_start"`    // start of the data area (extent 0)
	ExtentSize dmtable.Sectors `json:"extent_size"` // the VG's extent size

	PECount      uint64 `json:"pe_count"`
	PEAllocCount uint64 `json:"pe_alloc_count"`

	MDACount     int             `json:"mda_count"`      // metadata areas on the PV (0, 1 or 2)
	MDAUsedCount int             `json:"mda_used_count"` // those not ignored
	MDASize      dmtable.Sectors `json:"mda_size"`       // the smallest one (pv_mda_size)
	Bootloader   Area            `json:"bootloader"`     // pv_ba_start/pv_ba_size; Size 0 when none

	Allocatable  bool   `json:"allocatable"`
	Exported     bool   `json:"exported"`
	Missing      bool   `json:"missing"`
	DeviceID     string `json:"device_id,omitempty"`
	DeviceIDType string `json:"device_id_type,omitempty"`

	// Label is the on-disk label, which tells where the metadata areas are.
	Label *Label `json:"label"`
	// Segments is the PV's extent map in PE order: every extent is in
	// exactly one segment, free or allocated to one LV.
	Segments []PVSegment `json:"segments"`
	// VG is the volume group, with all its PVs and LVs.
	VG *VG `json:"vg"`
}

// PVSegment is a run of extents of one PV (pvseg_start, pvseg_size).
type PVSegment struct {
	Start  uint64 `json:"start"`             // first PE
	Size   uint64 `json:"size"`              // number of PEs
	LV     string `json:"lv,omitempty"`      // the LV using it (no brackets); "" when free
	LVUUID string `json:"lv_uuid,omitempty"` // "" when free
}

// Free reports whether no LV uses the segment.
func (s PVSegment) Free() bool { return s.LVUUID == "" }

// End is the PE after the segment.
func (s PVSegment) End() uint64 { return s.Start + s.Size }

// VG is a volume group as lvm reports it.
type VG struct {
	Name        string          `json:"name"`
	UUID        string          `json:"uuid"`
	Attr        string          `json:"attr"`
	Permissions string          `json:"permissions"` // "writeable", "read-only", ...
	ExtentSize  dmtable.Sectors `json:"extent_size"`
	ExtentCount uint64          `json:"extent_count"`
	FreeCount   uint64          `json:"free_count"`
	SeqNo       uint64          `json:"seqno"`

	LockType       string `json:"lock_type,omitempty"` // lvmlockd: "sanlock", "dlm", "idm"; "" for a local VG
	Shared         bool   `json:"shared"`
	Clustered      bool   `json:"clustered"`
	Exported       bool   `json:"exported"`
	Partial        bool   `json:"partial"`
	MissingPVCount int    `json:"missing_pv_count"`
	SystemID       string `json:"system_id,omitempty"`

	PVs []VGPV `json:"pvs"`
	LVs []*LV  `json:"lvs"` // every LV, hidden (private) ones included, in lvm's order
}

// VGPV is one PV of a VG.
type VGPV struct {
	Name         string          `json:"name"` // "[unknown]" when missing
	UUID         string          `json:"uuid"`
	Dev          dmtable.Dev     `json:"dev"` // zero when missing
	Missing      bool            `json:"missing"`
	Duplicate    bool            `json:"duplicate"`
	DevSize      dmtable.Sectors `json:"dev_size"`
	PEStart      dmtable.Sectors `json:"pe_start"`
	PECount      uint64          `json:"pe_count"`
	PEAllocCount uint64          `json:"pe_alloc_count"`
}

// LV is a logical volume, public or private (a thin pool's data, a raid
// image, a snapshot's origin layer...).
type LV struct {
	Name     string   `json:"name"`      // without the brackets lvm puts around hidden LVs
	FullName string   `json:"full_name"` // "vg/lv"
	Hidden   bool     `json:"hidden"`    // lvm shows it as [name]
	UUID     string   `json:"uuid"`
	Attr     string   `json:"attr"`   // lv_attr, e.g. "-wi-ao----"
	Layout   []string `json:"layout"` // lv_layout, e.g. ["thin","pool"], ["raid","raid1"], ["linear"]
	// Roles is lv_role, e.g. ["public"], ["private","thin","pool","data"],
	// ["private","raid","image"], ["public","snapshot","thicksnapshot"],
	// ["public","origin","thickorigin"], ["private","pool","spare"].
	Roles []string `json:"roles"`

	Active bool   `json:"active"` // a kernel device exists for it
	DMPath string `json:"dm_path"`
	// Kernel is lv_kernel_major:minor, valid when Active. For a thin
	// pool it is the pool's "-tpool" layer, not the device at DMPath
	// (observed, lvm2 2.03.16).
	Kernel dmtable.Dev `json:"kernel_dev"`

	Size           dmtable.Sectors `json:"size"`
	Parent         string          `json:"parent,omitempty"`      // for components: the LV they belong to
	Origin         string          `json:"origin,omitempty"`      // snapshots and thin LVs
	Pool           string          `json:"pool,omitempty"`        // thin LVs: their pool
	DataLV         string          `json:"data_lv,omitempty"`     // pools: the data sub-LV
	MetadataLV     string          `json:"metadata_lv,omitempty"` // pools: the metadata sub-LV
	SkipActivation bool            `json:"skip_activation"`
	Open           bool            `json:"open"`

	Segments []LVSegment `json:"segments"`
}

// LVSegment is one segment of an LV.
type LVSegment struct {
	Type        string          `json:"type"`  // segtype: "linear", "striped", "raid1", "thin-pool", "thin", "snapshot"...
	Start       dmtable.Sectors `json:"start"` // offset in the LV
	Size        dmtable.Sectors `json:"size"`
	StartExtent uint64          `json:"start_extent"` // logical extents
	Extents     uint64          `json:"extents"`
	Stripes     uint64          `json:"stripes"` // stripes, or mirror/raid legs
	StripeSize  dmtable.Sectors `json:"stripe_size"`
	// Devices are the areas the segment maps (the "devices" field): PV
	// extents for linear/striped segments and for sub-LVs, sub-LVs for
	// raid, mirror and pools, none for thin LVs.
	Devices []SegmentArea `json:"devices"`
	// MetadataDevices: raid metadata sub-LVs.
	MetadataDevices []SegmentArea `json:"metadata_devices,omitempty"`
}

// SegmentArea is one entry of a segment's device list: either extents
// of a PV (PV set) or of another LV (LV set).
type SegmentArea struct {
	PV     string `json:"pv,omitempty"`      // PV name as lvm prints it
	PVUUID string `json:"pv_uuid,omitempty"` // set when PV is one of the VG's PVs
	LV     string `json:"lv,omitempty"`      // sub-LV name, without brackets
	Start  uint64 `json:"start"`             // first extent (PE of the PV, or LE of the LV)
}

// HasRole reports whether lv_role lists r ("public", "private", "thin",
// "pool", "data", "metadata", "raid", "image", "snapshot", "origin",
// "spare", "mirror", "cache", ...).
func (lv *LV) HasRole(r string) bool { return slices.Contains(lv.Roles, r) }

// Public reports whether the LV is user-visible (not a component).
func (lv *LV) Public() bool { return lv.HasRole("public") }

// DMName is the LV's device-mapper name (the base of DMPath). lvm adds
// layer devices next to it for some LV types ("-real" for a snapshot
// origin, "-cow" for a snapshot, "-tpool" for a thin pool...), which have
// their own tables; use the dm dependency tree, not this name, to find
// every device that maps a PV.
func (lv *LV) DMName() string {
	return strings.TrimPrefix(lv.DMPath, "/dev/mapper/")
}

// LV returns the LV of the given name (with or without brackets), or nil.
func (vg *VG) LV(name string) *LV {
	name = unbracket(name)
	for _, lv := range vg.LVs {
		if lv.Name == name {
			return lv
		}
	}
	return nil
}

// LVByUUID returns the LV with that UUID, or nil.
func (vg *VG) LVByUUID(uuid string) *LV {
	for _, lv := range vg.LVs {
		if lv.UUID == uuid {
			return lv
		}
	}
	return nil
}

// PV returns the VG's PV with that UUID, or nil.
func (vg *VG) PV(uuid string) *VGPV {
	for i := range vg.PVs {
		if vg.PVs[i].UUID == uuid {
			return &vg.PVs[i]
		}
	}
	return nil
}

// Check returns a *VGError (matching ErrUnsupportedVG) for a VG that the
// engine must refuse: shared through lvmlockd (its lock is not the file
// lock the fence takes), clustered (clvmd), exported, partial or with
// missing PVs, or not writeable. nil otherwise.
func (vg *VG) Check() error {
	switch {
	case vg.LockType != "" && vg.LockType != "none":
		return &VGError{VG: vg.Name, Reason: fmt.Sprintf("shared (lvmlockd lock type %s)", vg.LockType)}
	case vg.Shared:
		return &VGError{VG: vg.Name, Reason: "shared (lvmlockd)"}
	case vg.Clustered:
		return &VGError{VG: vg.Name, Reason: "clustered (clvmd)"}
	case vg.Exported:
		return &VGError{VG: vg.Name, Reason: "exported"}
	case vg.Partial || vg.MissingPVCount > 0:
		return &VGError{VG: vg.Name, Reason: fmt.Sprintf("partial (%d PV(s) missing)", vg.MissingPVCount)}
	case vg.Permissions != "" && vg.Permissions != "writeable":
		return &VGError{VG: vg.Name, Reason: vg.Permissions}
	}
	return nil
}

// LVs returns the LVs that have extents on this PV, in the order of
// their first extent. These are the LVs whose kernel tables map the PV's
// device directly (or, for a snapshot origin, through its "-real" layer).
func (p *PVInfo) LVs() []*LV {
	var out []*LV
	seen := map[string]bool{}
	for _, s := range p.Segments {
		if s.Free() || seen[s.LVUUID] {
			continue
		}
		seen[s.LVUUID] = true
		if lv := p.VG.LVByUUID(s.LVUUID); lv != nil {
			out = append(out, lv)
		}
	}
	return out
}

// LastAllocated returns the allocated segment that ends last on the PV;
// ok is false when no extent is allocated.
func (p *PVInfo) LastAllocated() (seg PVSegment, ok bool) {
	for _, s := range p.Segments {
		if !s.Free() && (!ok || s.End() > seg.End()) {
			seg, ok = s, true
		}
	}
	return seg, ok
}

// UsedEnd is the sector after the last allocated extent (PEStart when
// none is allocated).
func (p *PVInfo) UsedEnd() dmtable.Sectors {
	s, ok := p.LastAllocated()
	if !ok {
		return p.PEStart
	}
	return p.PEStart + dmtable.Sectors(s.End())*p.ExtentSize
}

// DataEnd is the end of the PV's data area: PEStart + PECount extents.
func (p *PVInfo) DataEnd() dmtable.Sectors {
	return p.PEStart + dmtable.Sectors(p.PECount)*p.ExtentSize
}

// TailMetadata returns the metadata area that lies after the data area
// start (the second copy of a PV made with --pvmetadatacopies 2, at the
// end of the PV); ok is false when there is none.
func (p *PVInfo) TailMetadata() (a Area, ok bool) {
	if p.Label == nil {
		return Area{}, false
	}
	for _, m := range p.Label.MetadataAreas {
		if m.Start >= p.PEStart {
			return m, true
		}
	}
	return Area{}, false
}

// End is the first sector after everything LVM keeps on the PV: the data
// area and every metadata and bootloader area. A conversion must preserve
// [0, End) and may use what lies beyond.
func (p *PVInfo) End() dmtable.Sectors {
	end := p.DataEnd()
	if p.Label != nil {
		for _, m := range p.Label.MetadataAreas {
			end = max(end, m.End())
		}
	}
	if p.Bootloader.Size > 0 {
		end = max(end, p.Bootloader.End())
	}
	return end
}

// MinSize is the smallest size `pvresize --setphysicalvolumesize` accepts
// for this PV without cutting an allocated extent: the end of the last
// allocated extent, plus the size of the metadata area at the end if the
// PV has one (pvresize moves it to the new end; lvm2's _text_pv_resize
// and _pv_resize compute the new extent count as
// (size - pe_start - tail_mda_size) / extent_size).
func (p *PVInfo) MinSize() dmtable.Sectors {
	size := p.UsedEnd()
	if m, ok := p.TailMetadata(); ok {
		size += m.Size
	}
	return size
}

// TailFree is how many sectors at the end of the device LVM can be made
// to leave alone: DevSize - MinSize (0 when the PV already needs all of
// it).
func (p *PVInfo) TailFree() dmtable.Sectors {
	if m := p.MinSize(); m < p.DevSize {
		return p.DevSize - m
	}
	return 0
}

// extentsFor is lvm's new extent count for a PV resized to size.
func (p *PVInfo) extentsFor(size dmtable.Sectors) uint64 {
	reserve := p.PEStart
	if m, ok := p.TailMetadata(); ok {
		reserve += m.Size
	}
	if size <= reserve || p.ExtentSize == 0 {
		return 0
	}
	return uint64((size - reserve) / p.ExtentSize)
}

// CheckShrink tells whether the PV can be resized to size sectors. It
// returns a *ShrinkError naming the LV that holds the last allocated
// extent when size would cut it, and an error when size leaves no room
// for a single extent.
func (p *PVInfo) CheckShrink(size dmtable.Sectors) error {
	n := p.extentsFor(size)
	if n == 0 {
		return fmt.Errorf("cannot resize PV %s to %d sectors: no room for one %d-sector extent after pe_start %d",
			p.Device, uint64(size), uint64(p.ExtentSize), uint64(p.PEStart))
	}
	if last, ok := p.LastAllocated(); ok && n < last.End() {
		return &ShrinkError{
			Device: p.Device, Requested: size, Minimum: p.MinSize(),
			LV: p.VG.Name + "/" + last.LV, Extent: last.End() - 1,
		}
	}
	return nil
}

// FitSize returns the largest PV size not above limit that is a whole
// number of extents (plus pe_start and any tail metadata area), so that
// a shrink to it wastes no partial extent. It fails like CheckShrink
// when even that size would cut an allocated extent.
func (p *PVInfo) FitSize(limit dmtable.Sectors) (dmtable.Sectors, error) {
	n := p.extentsFor(limit)
	size := p.PEStart + dmtable.Sectors(n)*p.ExtentSize
	if m, ok := p.TailMetadata(); ok {
		size += m.Size
	}
	if err := p.CheckShrink(size); err != nil {
		if se, ok := err.(*ShrinkError); ok {
			se.Requested = limit
		}
		return 0, err
	}
	return size, nil
}

// Check returns why the engine must refuse this PV, or nil: the VG's
// Check, and a PV that is not allocatable-clean (missing, exported).
func (p *PVInfo) Check() error {
	if err := p.VG.Check(); err != nil {
		return err
	}
	if p.Missing {
		return fmt.Errorf("PV %s (%s) is marked missing in VG %s", p.Device, p.UUID, p.VG.Name)
	}
	return nil
}

func unbracket(s string) string {
	if len(s) >= 2 && s[0] == '[' && s[len(s)-1] == ']' {
		return s[1 : len(s)-1]
	}
	return s
}

func splitList(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, ",")
}
