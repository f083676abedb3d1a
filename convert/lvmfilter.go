package convert

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"slices"

	"github.com/dmconvert/dmconvert/dmtable"
	"github.com/dmconvert/dmconvert/lvm"
)

// FilterChecker is a volume manager that can tell, before a run, whether
// LVM's device filters will let it see a PV on a device known by the
// names given (the first is its main name).
type FilterChecker interface {
	CheckFilters(ctx context.Context, names []string) error
}

// DeviceAliases is a host that lists the other names of a block device
// (its udev links under /dev/disk, its kernel name).
type DeviceAliases interface {
	Aliases(dev dmtable.Dev) []string
}

// refuseFiltered refuses a run after which LVM would not see the VG on
// the device named names[0], because lvm.conf's filter rejects every
// name it has (or, for a mapping still to be made, will have). Without
// this the whole run went through, then failed at its end in LVM's
// refresh, leaving the VG visible to nothing but the live tables.
func (e *Engine) refuseFiltered(ctx context.Context, path, vg string, names []string) error {
	fc, ok := e.LVM.(FilterChecker)
	if !ok {
		return nil
	}
	err := fc.CheckFilters(ctx, names)
	var fe *lvm.FilterError
	if errors.As(err, &fe) {
		hint := fmt.Sprintf("let LVM accept it: in lvm.conf's %s put \"a|^%s$|\" before %q (run vgscan or pvscan --cache after), then run this again",
			fe.Setting, regexp.QuoteMeta(names[0]), fe.Pattern)
		return refuse(path, hint, "after the conversion LVM would not see volume group %s on %s: %v", vg, names[0], fe)
	}
	if err != nil {
		return fmt.Errorf("reading lvm's device filters: %w", err)
	}
	return nil
}

// mappingNames are the names a dm device still to be made, called name
// and carrying the PV pvUUID, will have: /dev/mapper/NAME, /dev/dm-N
// (N: the lowest minor no dm device uses, which the kernel gives the next
// one), and udev's links.
func (e *Engine) mappingNames(name, pvUUID string) []string {
	names := []string{e.Host.NodePath(name)}
	if list, err := e.DM.List(); err == nil {
		var used []uint32
		for _, d := range list {
			used = append(used, d.Dev.Minor)
		}
		slices.Sort(used)
		var n uint32
		for _, m := range used {
			if m == n {
				n++
			}
		}
		names = append(names, fmt.Sprintf("/dev/dm-%d", n))
	}
	names = append(names, "/dev/disk/by-id/dm-name-"+name)
	if pvUUID != "" {
		names = append(names, "/dev/disk/by-id/lvm-pv-uuid-"+pvUUID)
	}
	return names
}

// diskNames are the names of an existing disk: path, its other names the
// host knows, and the udev link a PV on it gets.
func (e *Engine) diskNames(path string, dev dmtable.Dev, pvUUID string) []string {
	names := []string{path}
	if a, ok := e.Host.(DeviceAliases); ok {
		for _, n := range a.Aliases(dev) {
			if !slices.Contains(names, n) {
				names = append(names, n)
			}
		}
	}
	if pvUUID != "" {
		names = append(names, "/dev/disk/by-id/lvm-pv-uuid-"+pvUUID)
	}
	return names
}
