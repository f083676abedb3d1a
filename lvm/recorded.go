package lvm

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"

	"github.com/dmconvert/dmconvert/dmtable"
)

// RecordedSize returns the size the VG metadata records for the PV
// (its dev_size). lvm compares every device carrying the PV with it and
// warns ("smaller than corresponding PV size ... Was device resized?")
// when the device is smaller; pvcreate records the device size, pvresize
// --setphysicalvolumesize N records N minus pe_start (observed, lvm2
// 2.03.16). No report field shows it, so it is read from the metadata
// text that `vgcfgbackup -f` exports (to a temporary file; nothing is
// written to any disk).
func (c *Client) RecordedSize(ctx context.Context, vg, pvUUID string) (dmtable.Sectors, error) {
	return c.recordedSize(ctx, vg, pvUUID, lockNormal)
}

// RecordedSize is Client.RecordedSize for the fenced VG.
func (fe *Fence) RecordedSize(ctx context.Context, pvUUID string) (dmtable.Sectors, error) {
	if err := fe.held(); err != nil {
		return 0, err
	}
	return fe.c.recordedSize(ctx, fe.vg, pvUUID, lockNone)
}

func (c *Client) recordedSize(ctx context.Context, vg, pvUUID string, lock lockMode) (dmtable.Sectors, error) {
	if !validVGName(vg) {
		return 0, fmt.Errorf("invalid volume group name %q", vg)
	}
	f, err := os.CreateTemp("", "dmconvert-vgcfg-")
	if err != nil {
		return 0, fmt.Errorf("reading the metadata of %s: %w", vg, err)
	}
	name := f.Name()
	f.Close()
	defer os.Remove(name)
	if _, err := c.run(ctx, call{cmd: "vgcfgbackup", args: []string{"-f", name, "--", vg}, lock: lock, devices: true}); err != nil {
		return 0, fmt.Errorf("reading the metadata of %s: %w", vg, err)
	}
	text, err := os.ReadFile(name)
	if err != nil {
		return 0, fmt.Errorf("reading the metadata of %s: %w", vg, err)
	}
	return parseRecordedSize(text, pvUUID)
}

// parseRecordedSize finds dev_size in the physical_volumes section entry
// whose id is pvUUID.
func parseRecordedSize(text []byte, pvUUID string) (dmtable.Sectors, error) {
	sc := bufio.NewScanner(bytes.NewReader(text))
	in := false
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if i := strings.IndexByte(l, '#'); i >= 0 {
			l = strings.TrimSpace(l[:i])
		}
		k, v, ok := strings.Cut(l, "=")
		k, v = strings.TrimSpace(k), strings.TrimSpace(v)
		switch {
		case ok && k == "id":
			in = strings.Trim(v, `"`) == pvUUID
		case in && ok && k == "dev_size":
			n, err := strconv.ParseUint(v, 10, 64)
			if err != nil {
				return 0, fmt.Errorf("metadata of PV %s: dev_size %q: %w", pvUUID, v, err)
			}
			return dmtable.Sectors(n), nil
		case l == "}":
			in = false
		}
	}
	return 0, fmt.Errorf("metadata has no dev_size for PV %s", pvUUID)
}
