package lvm

import (
	"fmt"
	"io"
	"strings"

	"github.com/dmconvert/dmconvert/dmtable"
)

// human prints a sector count with a binary unit, e.g. "252.0 MiB".
func human(s dmtable.Sectors) string {
	b := float64(s.Bytes())
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB"}
	i := 0
	for b >= 1024 && i < len(units)-1 {
		b /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%.0f B", b)
	}
	return fmt.Sprintf("%.1f %s", b, units[i])
}

// Describe writes a human summary of the PV and what lives on it, for
// dry runs: the VG, the PV's geometry, the LVs with extents on it and the
// free tail.
func (p *PVInfo) Describe(w io.Writer) error {
	var b strings.Builder
	vg := p.VG
	fmt.Fprintf(&b, "PV %s (lvm: %s, %s), UUID %s\n", p.Device, p.Name, p.Dev, p.UUID)
	fmt.Fprintf(&b, "  device   %d sectors (%s)\n", uint64(p.DevSize), human(p.DevSize))
	fmt.Fprintf(&b, "  data     extents 0-%d of %s from sector %d; %d allocated; data ends at sector %d\n",
		max(p.PECount, 1)-1, human(p.ExtentSize), uint64(p.PEStart), p.PEAllocCount, uint64(p.DataEnd()))
	if p.Label != nil {
		for i, m := range p.Label.MetadataAreas {
			fmt.Fprintf(&b, "  metadata area %d: sectors %d-%d (%s)\n", i, uint64(m.Start), uint64(m.End())-1, human(m.Size))
		}
	}
	fmt.Fprintf(&b, "  in use   sectors 0-%d; the last allocated extent ends at sector %d\n", uint64(p.End())-1, uint64(p.UsedEnd()))
	if last, ok := p.LastAllocated(); ok {
		fmt.Fprintf(&b, "  last allocated extent %d belongs to LV %s/%s; the PV can shrink to %d sectors (%s)\n",
			last.End()-1, vg.Name, last.LV, uint64(p.MinSize()), human(p.MinSize()))
	} else {
		fmt.Fprintf(&b, "  no extent allocated; the PV can shrink to %d sectors\n", uint64(p.MinSize()))
	}
	fmt.Fprintf(&b, "VG %s, UUID %s, %d PV(s), %d LV(s), extent %s, %d of %d extents free\n",
		vg.Name, vg.UUID, len(vg.PVs), len(vg.LVs), human(vg.ExtentSize), vg.FreeCount, vg.ExtentCount)
	for _, pv := range vg.PVs {
		mark := ""
		if pv.UUID == p.UUID {
			mark = "  <- this PV"
		}
		if pv.Missing {
			mark += "  (missing)"
		}
		fmt.Fprintf(&b, "  PV %-24s %s%s\n", pv.Name, pv.UUID, mark)
	}
	if err := vg.Check(); err != nil {
		fmt.Fprintf(&b, "  refused: %v\n", err)
	}
	fmt.Fprintf(&b, "LVs with extents on %s:\n", p.Device)
	for _, lv := range p.LVs() {
		var exts []string
		for _, s := range p.Segments {
			if s.LVUUID == lv.UUID {
				exts = append(exts, fmt.Sprintf("%d-%d", s.Start, s.End()-1))
			}
		}
		state := "inactive"
		if lv.Active {
			state = "active " + lv.Kernel.String()
		}
		fmt.Fprintf(&b, "  %-28s %-10s %-8s %-26s extents %s\n", lv.FullName, human(lv.Size), state,
			strings.Join(lv.Roles, ","), strings.Join(exts, ","))
	}
	var others []string
	for _, lv := range vg.LVs {
		if lv.Public() && !onPV(p, lv) {
			others = append(others, lv.Name)
		}
	}
	if len(others) > 0 {
		fmt.Fprintf(&b, "other public LVs of %s: %s\n", vg.Name, strings.Join(others, ", "))
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func onPV(p *PVInfo, lv *LV) bool {
	for _, s := range p.Segments {
		if s.LVUUID == lv.UUID {
			return true
		}
	}
	return false
}
