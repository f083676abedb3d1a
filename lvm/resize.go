package lvm

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"github.com/dmconvert/dmconvert/dmtable"
)

// ShrinkPV resizes the PV on device to newSize sectors with
// `pvresize --setphysicalvolumesize <newSize>s -y`, after checking
// (PVInfo.CheckShrink) that no allocated extent lies beyond: when one
// does, nothing runs and the *ShrinkError (ErrExtentsInUse) names the LV
// holding the last extent. After the resize it discovers the PV again and
// verifies the extent count lvm chose.
//
// What pvresize records: the PV keeps (newSize - pe_start - tail
// metadata area) / extent_size extents; a metadata area at the end of the
// PV moves to end at newSize. Use PVInfo.FitSize to pick a newSize that
// is a whole number of extents, and PVInfo.End afterwards for the
// sectors LVM now uses.
//
// ShrinkPV takes the VG lock (through pvresize): never call it while a
// Fence is held.
func (c *Client) ShrinkPV(ctx context.Context, device string, newSize dmtable.Sectors) error {
	p, err := c.Discover(ctx, device)
	if err != nil {
		return fmt.Errorf("shrinking PV %s: %w", device, err)
	}
	if newSize > p.DevSize {
		return fmt.Errorf("shrinking PV %s to %d sectors: the device has only %d", device, uint64(newSize), uint64(p.DevSize))
	}
	if err := p.CheckShrink(newSize); err != nil {
		return err
	}
	want := p.extentsFor(newSize)
	args := []string{"-y", "--setphysicalvolumesize", strconv.FormatUint(uint64(newSize), 10) + "s", "--", device}
	if _, err := c.run(ctx, call{cmd: "pvresize", args: args, devices: true}); err != nil {
		// Something allocated extents between our check and pvresize?
		if q, qerr := c.Discover(ctx, device); qerr == nil {
			if serr := q.CheckShrink(newSize); serr != nil {
				return errors.Join(serr, err)
			}
		}
		return fmt.Errorf("shrinking PV %s to %d sectors: %w", device, uint64(newSize), err)
	}
	q, err := c.Discover(ctx, device)
	if err != nil {
		return fmt.Errorf("shrinking PV %s: after pvresize: %w", device, err)
	}
	if q.PECount != want {
		return fmt.Errorf("shrinking PV %s to %d sectors: lvm left %d extents, expected %d", device, uint64(newSize), q.PECount, want)
	}
	return nil
}

// GrowPV makes the PV on device use the whole device (`pvresize` without
// a size), e.g. to take the space a conversion left free after the
// payload. It takes the VG lock: never call it while a Fence is held.
func (c *Client) GrowPV(ctx context.Context, device string) error {
	if _, err := c.run(ctx, call{cmd: "pvresize", args: []string{"-y", "--", device}, devices: true}); err != nil {
		return fmt.Errorf("resizing PV %s to its device: %w", device, err)
	}
	return nil
}
