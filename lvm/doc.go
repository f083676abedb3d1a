// Package lvm discovers what LVM has on a physical volume (its VG, extents,
// free tail, and the LVs mapped onto it), fences LVM away from a VG while a
// conversion runs, and refreshes LVM's view of devices when it ends.
//
// It drives the lvm tools with JSON reports. It never loads device-mapper
// tables itself: restacking is the engine's job.
//
// Everything goes through a Client (the zero value runs "lvm" from PATH):
// one place runs the lvm multi-call binary, with stdin closed, and turns a
// non-zero exit into a *CommandError. Decisions are made on exit codes,
// JSON reports (--reportformat json --units s --nosuffix --binary: sizes in
// 512-byte sectors, flags as 0/1) and the on-disk PV label, never on lvm's
// English messages.
//
// The engine's order of calls:
//
//	p, err := c.Discover(ctx, disk)        // what is there; p.Check() refuses shared/partial VGs
//	size, err := p.FitSize(limit)          // largest whole-extent size <= limit
//	err = c.ShrinkPV(ctx, disk, size)      // pvresize, refused with the LV named
//	fe, err := c.LockVG(ctx, p.VG.Name, t) // the fence: lvm's own V_<vg> lock, exclusive
//	...                                    // restack, move data; fe.Discover / fe.Activate only
//	fe.Release()
//	err = c.Refresh(ctx, disk, newDevice)  // devices file, pvscan --cache, check
//
// Two facts a reader must know. First, while a Fence is held every lvm
// command that reads the VG waits, this process's own included: only the
// Fence's methods (which pass --nolocking, sound because we hold the lock)
// may run then. Second, pv_size in lvm's reports is the extent area of a PV
// in a VG, not what LVM keeps on the disk: PVInfo.End is that (data area
// plus metadata areas, whose places come from the label).
package lvm
