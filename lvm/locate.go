package lvm

import (
	"os"
	"path/filepath"
	"strings"
)

// Block devices are found through sysfs; tests point these elsewhere.
var (
	sysBlockDir = "/sys/class/block"
	devDir      = "/dev"
)

// LocatePV finds the block device whose LVM label carries the PV uuid,
// reading the labels itself (no lvm command, no lvm filter): device
// names can change across a reboot (another disk attached, another probe
// order), while the PV UUID does not. hint, where the PV was last seen,
// is tried first. Device-mapper devices whose dm UUID has one of the
// prefixes in skipUUIDPrefixes are not considered (a converter's private
// devices can show a copy of a label), nor suspended ones (a read would
// block). It returns "" when no device carries the label.
func LocatePV(uuid, hint string, skipUUIDPrefixes ...string) string {
	if hint != "" {
		if l, err := ReadLabel(hint); err == nil && l.UUID == uuid {
			return hint
		}
	}
	ents, err := os.ReadDir(sysBlockDir)
	if err != nil {
		return ""
	}
	for _, e := range ents {
		name := e.Name()
		sys := filepath.Join(sysBlockDir, name)
		path := filepath.Join(devDir, name)
		if b, err := os.ReadFile(filepath.Join(sys, "dm", "uuid")); err == nil {
			id := strings.TrimSpace(string(b))
			skip := false
			for _, p := range skipUUIDPrefixes {
				if p != "" && strings.HasPrefix(id, p) {
					skip = true
				}
			}
			if b, err := os.ReadFile(filepath.Join(sys, "dm", "suspended")); err == nil && strings.TrimSpace(string(b)) == "1" {
				skip = true // reading it would block until it is resumed
			}
			if skip {
				continue
			}
			if b, err := os.ReadFile(filepath.Join(sys, "dm", "name")); err == nil {
				path = filepath.Join(devDir, "mapper", strings.TrimSpace(string(b)))
			}
		}
		if l, err := ReadLabel(path); err == nil && l.UUID == uuid {
			return path
		}
	}
	return ""
}
