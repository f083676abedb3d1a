package lvm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Activate activates the LVs of vg (`vgchange -ay`), letting lvm see only
// devices when the list is not empty (`--devices`, lvm2 >= 2.03.12: the
// lvm.conf filter and the devices file are then ignored and every other
// device looks missing). resume uses it after a reboot so that the VG is
// activated from the PV on the intermediate device and never from the raw
// disk, which may still carry the same label: list that device and every
// other PV of the VG, not the disk.
//
// It runs with --activationmode complete: an LV with an extent on a PV
// that is not visible (a device forgotten in the list) is not activated,
// instead of coming up degraded (raid) or partial, and Activate fails
// with lvm's exit code. LVs flagged to skip activation stay inactive.
//
// Activation takes the VG lock exclusively: while a Fence is held, use
// Fence.Activate.
func (c *Client) Activate(ctx context.Context, vg string, devices []string) error {
	return c.activate(ctx, vg, nil, devices, lockNormal)
}

// ActivateLVs is Activate for some LVs of vg (`lvchange -ay vg/lv...`),
// e.g. the ones that were active before a crash. It activates LVs that
// skip activation too (-K) since they are named.
func (c *Client) ActivateLVs(ctx context.Context, vg string, lvs []string, devices []string) error {
	if len(lvs) == 0 {
		return fmt.Errorf("activating LVs of %s: no LV named", vg)
	}
	return c.activate(ctx, vg, lvs, devices, lockNormal)
}

func (c *Client) activate(ctx context.Context, vg string, lvs, devices []string, lock lockMode) error {
	if !validVGName(vg) {
		return fmt.Errorf("activating volume group: invalid name %q", vg)
	}
	cc := c
	if len(devices) > 0 {
		cp := *c
		cp.Devices = devices
		cc = &cp
	}
	k := call{cmd: "vgchange", args: []string{"-ay", "--activationmode", "complete", "--", vg}, lock: lock, devices: true}
	what := "volume group " + vg
	if len(lvs) > 0 {
		k.cmd = "lvchange"
		k.args = []string{"-ay", "-K", "--activationmode", "complete", "--"}
		for _, lv := range lvs {
			if !validVGName(lv) { // LV names follow the same character rules
				return fmt.Errorf("activating LVs of %s: invalid LV name %q", vg, lv)
			}
			k.args = append(k.args, vg+"/"+lv)
		}
		what = fmt.Sprintf("LVs %s of %s", strings.Join(lvs, ", "), vg)
	}
	if _, err := cc.run(ctx, k); err != nil {
		if len(devices) > 0 {
			return fmt.Errorf("activating %s on %s: %w", what, strings.Join(devices, ", "), err)
		}
		return fmt.Errorf("activating %s: %w", what, err)
	}
	return nil
}

// Refresh updates lvm's view after a conversion moved the PV from
// oldDevice to newDevice (e.g. from /dev/vda to /dev/mapper/vda_crypt):
//
//  1. when the devices file is in use (devices/use_devicesfile=1 and the
//     file exists), the entry of oldDevice is removed if there is one
//     (`lvmdevices --delpvid`, or --deldev for an entry without PVID),
//     then newDevice is added unless listed (`lvmdevices --adddev`, which
//     records the best device ID lvm finds, e.g. crypt_uuid for a dm
//     device with a CRYPT- uuid). Removal comes first because lvm2
//     2.03.16's lvmdevices --adddev crashes (SIGSEGV, observed) when the
//     file still lists the same PVID for a device that no longer shows it;
//  2. `pvscan --cache` refreshes lvm's record of online PVs (what event
//     activation uses);
//  3. it checks that lvm now reports the PV on newDevice, and reports it
//     there and not as an unused duplicate.
//
// oldDevice may be "" (nothing to remove). Refresh takes no VG lock until
// the final check, which does: call it after Fence.Release.
func (c *Client) Refresh(ctx context.Context, oldDevice, newDevice string) error {
	newDev, err := c.blockDevice(newDevice)
	if err != nil {
		return fmt.Errorf("refreshing lvm: %w", err)
	}
	path, inUse, err := c.DevicesFile(ctx)
	if err != nil {
		return fmt.Errorf("refreshing lvm: %w", err)
	}
	if inUse {
		if err := c.updateDevicesFile(ctx, path, oldDevice, newDevice); err != nil {
			return err
		}
	}
	if _, err := c.run(ctx, call{cmd: "pvscan", args: []string{"--cache"}, devices: true}); err != nil {
		return fmt.Errorf("refreshing lvm: %w", err)
	}
	if _, err := c.lookupPV(ctx, newDevice, newDev, lockNormal); err != nil && !errors.Is(err, ErrNoVG) {
		return fmt.Errorf("refreshing lvm: %w", err)
	}
	return nil
}

// updateDevicesFile moves the devices file entry of a PV from oldDevice
// to newDevice.
func (c *Client) updateDevicesFile(ctx context.Context, path, oldDevice, newDevice string) error {
	entries, err := ReadDevicesFile(path)
	if err != nil {
		return fmt.Errorf("refreshing lvm: %w", err)
	}
	newE := c.findDevicesEntry(entries, newDevice)
	if oldDevice != "" {
		if oldE := c.findDevicesEntry(entries, oldDevice); oldE != nil && oldE != newE {
			args := []string{"-y", "--deldev", oldE.DevName}
			if oldE.PVID != "" {
				// --delpvid removes every entry with the PVID, the
				// new device's too if it is listed: add it again below.
				args = []string{"-y", "--delpvid", oldE.PVID}
				if newE != nil && newE.PVID == oldE.PVID {
					newE = nil
				}
			}
			if _, err := c.run(ctx, call{cmd: "lvmdevices", args: args}); err != nil {
				return fmt.Errorf("removing %s from the lvm devices file %s: %w", oldDevice, path, err)
			}
		}
	}
	if newE == nil {
		if _, err := c.run(ctx, call{cmd: "lvmdevices", args: []string{"-y", "--adddev", newDevice}}); err != nil {
			return fmt.Errorf("adding %s to the lvm devices file %s (lvm will not see the PV until `lvmdevices --adddev %s` succeeds): %w",
				newDevice, path, newDevice, err)
		}
	}
	return nil
}

// DevicesFile returns the path of lvm's devices file and whether lvm
// uses it: devices/use_devicesfile=1 and the file exists (lvm2: "If the
// file does not exist, or if lvm.conf includes use_devicesfile=0, then
// lvm will not use a devices file"). The file is
// $LVM_SYSTEM_DIR/devices/<devices/devicesfile>, /etc/lvm by default.
func (c *Client) DevicesFile(ctx context.Context) (path string, inUse bool, err error) {
	cfg, err := c.configValues(ctx, "devices/use_devicesfile", "devices/devicesfile")
	if err != nil {
		return "", false, err
	}
	sys := "/etc/lvm"
	if v, ok := os.LookupEnv("LVM_SYSTEM_DIR"); ok && v != "" {
		sys = v
	}
	for _, e := range c.Env {
		if v, ok := strings.CutPrefix(e, "LVM_SYSTEM_DIR="); ok && v != "" {
			sys = v
		}
	}
	path = filepath.Join(sys, "devices", cfg["devices/devicesfile"])
	if cfg["devices/use_devicesfile"] != "1" {
		return path, false, nil
	}
	if _, err := os.Stat(path); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return path, false, nil
		}
		return path, false, err
	}
	return path, true, nil
}

// DevicesEntry is one device line of lvm's devices file.
type DevicesEntry struct {
	IDType  string // "sys_wwid", "sys_serial", "devname", "crypt_uuid", ...
	IDName  string
	DevName string // the device name lvm last saw it under
	PVID    string // without dashes
	Part    string // partition number, "" for a whole device
}

// ReadDevicesFile parses lvm's devices file: "KEY=value" words, one
// device per line that has IDTYPE=; comments and VERSION/SYSTEMID lines
// are skipped.
func ReadDevicesFile(path string) ([]DevicesEntry, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading lvm devices file: %w", err)
	}
	return parseDevicesFile(string(b)), nil
}

func parseDevicesFile(s string) []DevicesEntry {
	var out []DevicesEntry
	for _, line := range strings.Split(s, "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") || !strings.HasPrefix(line, "IDTYPE=") {
			continue
		}
		var e DevicesEntry
		for _, w := range strings.Fields(line) {
			k, v, _ := strings.Cut(w, "=")
			switch k {
			case "IDTYPE":
				e.IDType = v
			case "IDNAME":
				e.IDName = v
			case "DEVNAME":
				e.DevName = v
			case "PVID":
				e.PVID = v
			case "PART":
				e.Part = v
			}
		}
		out = append(out, e)
	}
	return out
}

// findDevicesEntry finds the entry for device: same DEVNAME, or a DEVNAME
// that is the same block device (a symlink such as /dev/disk/by-id/...).
func (c *Client) findDevicesEntry(entries []DevicesEntry, device string) *DevicesEntry {
	want, werr := c.blockDevice(device)
	for i, e := range entries {
		if e.DevName == device {
			return &entries[i]
		}
		if werr == nil && e.DevName != "" {
			if d, err := c.blockDevice(e.DevName); err == nil && d == want {
				return &entries[i]
			}
		}
	}
	return nil
}
