package lvm

import (
	"context"
	"fmt"
)

// PVState is a cheap second look at a PV: which PV the device carries,
// its VG, and the VG's metadata sequence number, from one `pvs` (where
// Discover runs three commands). lvm bumps vg_seqno at every metadata
// change, so an equal seqno means the VG's metadata, every PV size and
// extent map included, is the one an earlier Discover reported.
type PVState struct {
	UUID  string
	VG    string
	SeqNo uint64
}

// State returns the PVState of device (lvm's locks as for Discover).
func (c *Client) State(ctx context.Context, device string) (*PVState, error) {
	dev, err := c.blockDevice(device)
	if err != nil {
		return nil, err
	}
	args := append(append([]string{}, reportFlags...), "-o", "pv_uuid,pv_major,pv_minor,vg_name,vg_seqno", "--", device)
	out, err := c.run(ctx, call{cmd: "pvs", args: args, devices: true})
	if err != nil {
		return nil, fmt.Errorf("looking up PV %s: %w", device, err)
	}
	rep, err := parseReport(out)
	if err != nil {
		return nil, fmt.Errorf("looking up PV %s: %w", device, err)
	}
	for _, r := range rep.rows("pv") {
		f := &fieldReader{kind: "pv", row: r}
		if d, ok := f.dev("pv_major", "pv_minor"); !ok || d != dev {
			continue
		}
		s := &PVState{UUID: f.str("pv_uuid"), VG: f.str("vg_name"), SeqNo: f.u64("vg_seqno")}
		if f.err != nil {
			return nil, fmt.Errorf("looking up PV %s: %w", device, f.err)
		}
		return s, nil
	}
	return nil, fmt.Errorf("looking up PV %s: lvm reports no PV on it", device)
}
