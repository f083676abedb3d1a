package convert

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/dmconvert/dmconvert/dmtable"
	"github.com/dmconvert/dmconvert/lvm"
)

// LVMTool adapts the lvm package to VolumeManager. While the fence is held
// it routes discovery and activation through it (lvm runs them without
// taking the lock this process holds).
type LVMTool struct {
	C *lvm.Client
	// FenceTimeout bounds the wait for LVM's VG lock; default 30 s.
	FenceTimeout time.Duration
	fence        *lvm.Fence

	// lockCfg is LVM's lock settings, read in the background by the
	// first Discover (the fence that follows a plan needs them).
	lockMu  sync.Mutex
	lockCfg *lockConfigCall
}

type lockConfigCall struct {
	done chan struct{}
	cfg  lvm.LockConfig
	err  error
}

// prefetchLockConfig starts reading the lock settings, once.
func (l *LVMTool) prefetchLockConfig() {
	l.lockMu.Lock()
	defer l.lockMu.Unlock()
	if l.lockCfg != nil {
		return
	}
	lc := &lockConfigCall{done: make(chan struct{})}
	l.lockCfg = lc
	go func() {
		defer close(lc.done)
		lc.cfg, lc.err = l.C.ReadLockConfig(context.Background())
	}()
}

// Discover implements VolumeManager.
func (l *LVMTool) Discover(ctx context.Context, device string) (*PV, error) {
	return l.discover(ctx, device, true)
}

// DiscoverLayout implements LayoutDiscoverer.
func (l *LVMTool) DiscoverLayout(ctx context.Context, device string) (*PV, error) {
	return l.discover(ctx, device, false)
}

func (l *LVMTool) discover(ctx context.Context, device string, recorded bool) (*PV, error) {
	// A PV's VG is fenced next: with a CPU to spare, lvm's lock settings
	// are read meanwhile.
	l.prefetchLockConfig()
	var p *lvm.PVInfo
	var err error
	if l.fence != nil && l.fence.Held() {
		p, err = l.fence.Discover(ctx, device)
	} else {
		p, err = l.C.Discover(ctx, device)
	}
	switch {
	case errors.Is(err, lvm.ErrNotPV):
		return nil, &RefusalError{Device: device, Hint: "dmconvert encrypts LVM physical volumes in place; for a plain file system use cryptsetup reencrypt --encrypt offline",
			Reason: fmt.Sprintf("not an LVM physical volume (%v)", err), Err: ErrNotPV}
	case errors.Is(err, lvm.ErrNoVG):
		return &PV{Device: device}, nil
	case errors.Is(err, lvm.ErrDuplicatePV):
		return nil, refuse(device, "make sure only one device carries this PV (a clone, a multipath leg, or a leftover of an interrupted conversion: dmconvert status)", "%v", err)
	case err != nil:
		return nil, fmt.Errorf("asking LVM about %s: %w", device, err)
	}
	// Keep everything LVM keeps on the PV, and at least the size its
	// metadata records: LVM compares every device carrying the PV with
	// that and warns when the device is smaller.
	size := p.End()
	if recorded {
		var rec dmtable.Sectors
		if l.fence != nil && l.fence.Held() {
			rec, err = l.fence.RecordedSize(ctx, p.UUID)
		} else {
			rec, err = l.C.RecordedSize(ctx, p.VG.Name, p.UUID)
		}
		if err != nil {
			return nil, fmt.Errorf("asking LVM about %s: %w", device, err)
		}
		size = max(size, rec)
	}
	pv := &PV{
		Device: device, UUID: p.UUID, VG: p.VG.Name, VGSeqno: p.VG.SeqNo,
		Size: Sectors(size), UsedEnd: Sectors(p.MinSize()),
		PEStart: Sectors(p.PEStart), ExtentSize: Sectors(p.ExtentSize),
		FitSize: func(limit Sectors) (Sectors, error) {
			s, err := p.FitSize(dmtable.Sectors(limit))
			return Sectors(s), err
		},
	}
	for _, v := range p.VG.PVs {
		if !v.Missing {
			pv.VGDevices = append(pv.VGDevices, v.Name)
			pv.VGPVUUIDs = append(pv.VGPVUUIDs, v.UUID)
		}
	}
	for _, lv := range p.LVs() {
		pv.LVs = append(pv.LVs, LVInfo{Name: lv.FullName, Active: lv.Active, Public: lv.Public(), Layout: lv.Layout})
	}
	if err := p.Check(); err != nil {
		pv.Refusal = err.Error()
	}
	return pv, nil
}

// CheckFilters implements FilterChecker.
func (l *LVMTool) CheckFilters(ctx context.Context, names []string) error {
	return l.C.CheckFilters(ctx, names)
}

// Fence implements VolumeManager.
func (l *LVMTool) Fence(ctx context.Context, vg string) (func() error, error) {
	to := l.FenceTimeout
	if to == 0 {
		to = 30 * time.Second
	}
	var f *lvm.Fence
	var err error
	l.lockMu.Lock()
	lc := l.lockCfg
	l.lockMu.Unlock()
	if lc != nil {
		select {
		case <-lc.done:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if lc != nil && lc.err == nil {
		f, err = l.C.LockVGWith(ctx, vg, to, lc.cfg)
	} else {
		f, err = l.C.LockVG(ctx, vg, to)
	}
	if err != nil {
		return nil, err
	}
	l.fence = f
	return func() error {
		err := f.Release()
		l.fence = nil
		return err
	}, nil
}

// ShrinkPV implements VolumeManager.
func (l *LVMTool) ShrinkPV(ctx context.Context, device string, size Sectors) error {
	return l.C.ShrinkPV(ctx, device, dmtable.Sectors(size))
}

// Activate implements VolumeManager.
func (l *LVMTool) Activate(ctx context.Context, vg string, devices []string) error {
	if l.fence != nil && l.fence.Held() && l.fence.VG() == vg {
		return l.fence.Activate(ctx, devices)
	}
	return l.C.Activate(ctx, vg, devices)
}

// LocatePV implements VolumeManager: the labels are read directly, and
// dmconvert's private devices (which can show a copy of a label) are
// not considered.
func (l *LVMTool) LocatePV(ctx context.Context, uuid, hint string) string {
	return lvm.LocatePV(uuid, hint, helperUUIDPrefix)
}

// State implements VolumeManager (not while the fence is held: it would
// wait for it).
func (l *LVMTool) State(ctx context.Context, device string) (string, string, uint64, error) {
	if l.fence != nil && l.fence.Held() {
		return "", "", 0, errors.New("the volume group is fenced")
	}
	s, err := l.C.State(ctx, device)
	if err != nil {
		return "", "", 0, err
	}
	return s.UUID, s.VG, s.SeqNo, nil
}

// Refresh implements VolumeManager.
func (l *LVMTool) Refresh(ctx context.Context, oldDev, newDev string) error {
	return l.C.Refresh(ctx, oldDev, newDev)
}
