package convert

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"maps"
	"os"
	"slices"

	"github.com/dmconvert/dmconvert/dmtable"
	"github.com/dmconvert/dmconvert/journal"
)

// HeaderOpener turns a header image (stored in a journal, or read from the
// disk) into a HeaderFormat and recovers the volume keys from it (the CLI
// closes over the passphrase or key file; OpenLUKSImage does the work). It
// fails with an error that wraps ErrWrongPassphrase when no keyslot opens.
type HeaderOpener func(image []byte) (HeaderFormat, Keys, error)

// ErrWrongPassphrase: no keyslot of the header opens with what was given.
var ErrWrongPassphrase = errors.New("no key slot of the header opens with this passphrase or key file")

// RunOptions control a running conversion.
type RunOptions struct {
	// Stop is polled between steps; once it returns true the run records
	// a resumable state and returns ErrInterrupted.
	Stop func() bool
	// Fresh: the plan was made right before Execute with nothing waited
	// for in between (no confirmation prompt). Execute then skips the
	// lvm half of its unchanged check; the disk's identity, and for
	// encrypt the device-mapper devices on it, are still checked.
	Fresh bool
}

// Execute runs a plan made by PlanEncrypt.
func (e *Engine) Execute(ctx context.Context, ep *EncryptPlan, o RunOptions) (err error) {
	spec := ep.Spec
	unlock, err := e.Host.Lock(spec.Disk)
	if err != nil {
		return err
	}
	defer unlock()
	_, serr := os.Stat(ep.Journal)
	created := errors.Is(serr, fs.ErrNotExist)
	j, err := journal.Open(ep.Journal, journal.Options{Create: true})
	if err != nil {
		if errors.Is(err, journal.ErrLocked) {
			return busy(spec.Disk.Path, "journal %s is in use by another dmconvert", ep.Journal)
		}
		return err
	}
	inited := false
	defer func() {
		j.Close()
		// A run refused before the journal recorded it leaves no
		// empty journal behind (it would show in status and locate).
		if created && !inited {
			os.Remove(ep.Journal)
		}
	}()
	traceStep("journal-open")
	// Time may have passed since the plan (a confirmation prompt): the
	// disk and what is stacked on it must be exactly what was planned.
	if err := e.checkUnchanged(ctx, ep, o.Fresh); err != nil {
		return err
	}
	if ep.ShrinkTo > 0 {
		if err := e.LVM.ShrinkPV(ctx, spec.PVDevice, ep.ShrinkTo); err != nil {
			return fmt.Errorf("shrinking the physical volume %s to %d sectors: %w", spec.PVDevice, ep.ShrinkTo, err)
		}
		pv, err := e.LVM.Discover(ctx, spec.PVDevice)
		if err != nil {
			return err
		}
		if pv.Size > spec.Forward.Geometry.Payload {
			return fmt.Errorf("physical volume %s is still %d sectors after pvresize, more than the planned %d", spec.PVDevice, pv.Size, spec.Forward.Geometry.Payload)
		}
	}
	if ep.newFile != "" {
		// The new key must be on stable storage before any sector is
		// written with it.
		if err := writeNewFile(ep.newFile, ep.newFileData); err != nil {
			return refuse(spec.Disk.Path, "", "%v", err)
		}
	}
	r := &run{e: e, j: j, spec: spec, plan: spec.Forward, hdr: ep.Header, devs: map[BackingID]dmtable.Dev{DiskID: spec.Disk.Dev}, stop: o.Stop}
	// Pinning memory and fencing LVM (a vgs) overlap the journal's
	// first durable writes; execute waits for both before it changes
	// anything. Not earlier: the checks above and a shrink run lvm
	// commands the fence would hold off.
	r.prep = r.startPrep(ctx)
	defer r.dropPrep()
	r.st = r.plan.Start()
	img, err := ep.Header.Image(r.cp(r.st))
	if err != nil {
		return err
	}
	raw, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	ident, _ := json.Marshal(spec.Disk)
	if err := j.Init(journal.Run{ID: spec.ID, Op: spec.Op, Device: spec.Disk.Path, Identity: ident, Plan: raw}, img,
		journal.State{Status: journal.StatusRunning, Phase: r.st.Phase, Boundary: uint64(r.st.Boundary)}); err != nil {
		if errors.Is(err, journal.ErrRunExists) {
			return refuse(spec.Disk.Path, "run `dmconvert status`, then resume or abort it", "journal %s already records a run", ep.Journal)
		}
		return err
	}
	inited = true
	traceStep("journal-init")
	r.setKeys(ep.keys)
	ep.Wipe()
	defer r.wipeKeys()
	disk, err := e.Host.OpenDisk(spec.Disk.Path)
	if err != nil {
		return fmt.Errorf("opening %s: %w", spec.Disk.Path, err)
	}
	defer disk.Close()
	r.disk = disk
	return r.execute(ctx, nil)
}

func (e *Engine) checkUnchanged(ctx context.Context, ep *EncryptPlan, fresh bool) error {
	spec := ep.Spec
	dev := spec.Disk.Path
	changed := func(what string) error {
		return refuse(dev, "run dmconvert "+spec.Op+" again to make a new plan", "%s changed since the plan was made", what)
	}
	di, err := e.Host.Stat(dev)
	if err != nil {
		return err
	}
	if di.Dev != spec.Disk.Dev || di.Size != spec.Disk.Size || di.LogicalBlockSize != spec.Disk.LogicalBlockSize {
		return changed("the disk")
	}
	if spec.PVDevice == "" {
		return nil
	}
	// One `pvs`: the same PV in the same VG, whose metadata has the
	// plan's sequence number, is the PV of the plan (lvm bumps the
	// number at every change). Otherwise the whole PV is looked at again.
	pv := ep.PV
	if fresh {
		// Nothing was waited for since the plan's own lvm calls: a
		// second look would see what they saw (the fence, taken next,
		// checks again that the VG exists).
		return e.checkStacked(di.Dev, dev, pv, spec, changed)
	}
	uuid, vg, seq, err := e.LVM.State(ctx, spec.PVDevice)
	if err != nil || spec.VGSeqno == 0 || uuid != spec.PVUUID || vg != spec.VG || seq != spec.VGSeqno {
		discover := e.LVM.Discover
		if spec.Op == "rekey" {
			discover = e.discoverInPlace // as PlanRekey and planPlain did
		}
		pv, err = discover(ctx, spec.PVDevice)
		if err != nil {
			return err
		}
		if pv.UUID != spec.PVUUID || pv.VG != spec.VG || pv.Size != ep.PV.Size {
			return changed("the physical volume")
		}
	}
	return e.checkStacked(di.Dev, dev, pv, spec, changed)
}

// checkStacked: for encrypt, the device-mapper devices on the disk are
// those of the plan, with the same tables.
func (e *Engine) checkStacked(disk dmtable.Dev, dev string, pv *PV, spec *Spec, changed func(string) error) error {
	if spec.Op != "encrypt" {
		return nil
	}
	stacked, err := e.stackedOn(disk, dev, pv.Size)
	if err != nil {
		return err
	}
	if len(stacked) != len(spec.Stacked) {
		return changed("the set of device-mapper devices on the disk")
	}
	for n, t := range stacked {
		if spec.Stacked[n] != t {
			return changed("the table of " + n)
		}
	}
	return nil
}

// prepResult is what startPrep did: the fence's release (nil: no VG)
// and the first error.
type prepResult struct {
	release func() error
	err     error
}

// prepare pins memory and fences LVM away from the run's VG.
func (r *run) prepare(ctx context.Context) prepResult {
	if r.e.Lock != nil {
		if err := r.e.Lock(); err != nil {
			return prepResult{err: fmt.Errorf("locking memory: %w", err)}
		}
	}
	if r.spec.VG != "" {
		rel, err := r.e.LVM.Fence(ctx, r.spec.VG)
		if err != nil {
			return prepResult{err: fmt.Errorf("fencing LVM away from volume group %s: %w", r.spec.VG, err)}
		}
		return prepResult{release: rel}
	}
	return prepResult{}
}

// startPrep runs prepare in the background.
func (r *run) startPrep(ctx context.Context) <-chan prepResult {
	ch := make(chan prepResult, 1)
	go func() { ch <- r.prepare(ctx) }()
	return ch
}

// dropPrep releases a fence startPrep took that execute never took
// over (the run stopped before it).
func (r *run) dropPrep() {
	if r.prep == nil {
		return
	}
	if res := <-r.prep; res.release != nil {
		res.release()
	}
	r.prep = nil
}

// execute pins memory, fences LVM (or takes both from startPrep), runs
// before (with the fence held) and then the loop.
func (r *run) execute(ctx context.Context, before func() error) (err error) {
	var res prepResult
	if r.prep != nil {
		res = <-r.prep
		r.prep = nil
	} else {
		res = r.prepare(ctx)
	}
	if res.err != nil {
		return res.err
	}
	if res.release != nil {
		r.release = res.release
		defer func() {
			if rerr := r.releaseFence(); rerr != nil {
				err = errors.Join(err, rerr)
			}
		}()
	}
	if before != nil {
		if err := before(); err != nil {
			return err
		}
	}
	err = r.loop(ctx)
	if err != nil && !errors.Is(err, ErrInterrupted) {
		// Record the failure for status; the state itself is exactly
		// where the last commit left it, so resume works. Leave F
		// without a mirror so LVM keeps seeing the PV on it.
		_ = r.setStatus(journal.StatusFailed, err.Error())
		if serr := r.settle(); serr != nil {
			err = errors.Join(err, fmt.Errorf("leaving %s in the committed state: %w", r.spec.Name, serr))
		}
		return err
	}
	if err == nil {
		r.event(Event{Kind: EventDone})
	}
	return err
}

// ResumeOptions locate an interrupted run.
type ResumeOptions struct {
	RunOptions
	Journal string
	// Device overrides the disk path recorded in the journal (device
	// names can change across boots).
	Device string
	Open   HeaderOpener
	// OldKey reads the old key of a plain dm-crypt rekey (cryptsetup's
	// plain key file: the key itself) when no live table shows it.
	OldKey func() ([]byte, error)
	// Passphrase opens the detached header of a plain volume turned
	// into LUKS2.
	Passphrase []byte
}

// openPlain recovers the keys of a plain rekey: the old one from a live
// table or o.OldKey, the new one from its key file.
func (e *Engine) openPlain(spec *Spec, img []byte, o ResumeOptions) (HeaderFormat, Keys, error) {
	cands := e.tableKeys(spec)
	defer func() {
		for _, k := range cands {
			clear(k)
		}
	}()
	for _, k := range cands {
		h, keys, err := OpenPlainImage(img, k, o.Passphrase)
		if err == nil || !errors.Is(err, ErrWrongPassphrase) {
			return h, keys, err
		}
	}
	if spec.TCrypt {
		// The header area the journal kept opens to the old key.
		return OpenPlainImage(img, nil, o.Passphrase)
	}
	if o.OldKey == nil {
		return nil, Keys{}, refuse(spec.Disk.Path, "give the old key file with --old-key-file", "no live table shows the old key of plain mapping %s", spec.Name)
	}
	k, err := o.OldKey()
	if err != nil {
		return nil, Keys{}, err
	}
	defer clear(k)
	return OpenPlainImage(img, k, o.Passphrase)
}

// openRun opens the journal and the disk of an interrupted run, unlocks
// its header and reconciles the journal's state with the disk.
func (e *Engine) openRun(ctx context.Context, o ResumeOptions) (r *run, cleanup func(), err error) {
	var closers []func()
	cleanup = func() {
		for i := len(closers) - 1; i >= 0; i-- {
			closers[i]()
		}
	}
	defer func() {
		if err != nil {
			cleanup()
		}
	}()
	j, err := journal.Open(o.Journal, journal.Options{})
	if err != nil {
		if errors.Is(err, journal.ErrLocked) {
			return nil, cleanup, busy(o.Journal, "the journal is in use: another dmconvert is running this conversion")
		}
		return nil, cleanup, err
	}
	closers = append(closers, func() { j.Close() })
	traceStep("journal-open")
	jr, err := j.Run()
	if err != nil {
		return nil, cleanup, err
	}
	var spec Spec
	if err := json.Unmarshal(jr.Plan, &spec); err != nil {
		return nil, cleanup, fmt.Errorf("journal %s: reading the plan: %w", o.Journal, err)
	}
	if spec.Version != PlanVersion || spec.Forward == nil {
		return nil, cleanup, fmt.Errorf("journal %s holds a plan of version %d that this dmconvert cannot run", o.Journal, spec.Version)
	}
	js, err := j.State()
	if err != nil {
		return nil, cleanup, err
	}
	if js.Status == journal.StatusDone || js.Status == journal.StatusAborted {
		return nil, cleanup, fmt.Errorf("the %s run of %s recorded in %s is already %s", spec.Op, spec.Disk.Path, o.Journal, js.Status)
	}
	if o.Device != "" {
		spec.Disk.Path = o.Device
	}
	di, err := e.Host.Stat(spec.Disk.Path)
	if err != nil {
		return nil, cleanup, refuse(spec.Disk.Path, "give the disk with --device if its name changed", "cannot use the disk of this run: %v", err)
	}
	if di.Size != spec.Disk.Size || di.LogicalBlockSize != spec.Disk.LogicalBlockSize {
		return nil, cleanup, refuse(spec.Disk.Path, "check that this journal belongs to this disk",
			"the disk has %d sectors of %d bytes, but journal %s belongs to a disk of %d sectors of %d bytes",
			di.Size, di.LogicalBlockSize, o.Journal, spec.Disk.Size, spec.Disk.LogicalBlockSize)
	}
	spec.Disk.Dev = di.Dev
	unlock, err := e.Host.Lock(spec.Disk)
	if err != nil {
		return nil, cleanup, err
	}
	closers = append(closers, unlock)
	traceStep("disk-locked")
	img, err := j.Header()
	if err != nil {
		return nil, cleanup, err
	}
	var hdr HeaderFormat
	var keys Keys
	if IsPlainImage(img) {
		hdr, keys, err = e.openPlain(&spec, img, o)
	} else {
		hdr, keys, err = o.Open(img)
	}
	if err != nil {
		return nil, cleanup, fmt.Errorf("unlocking the header of %s: %w", spec.Disk.Path, err)
	}
	traceStep("header-unlocked")
	if n := len(keys.Unbound); spec.Op == "rekey" && n != spec.Crypt.KeyBytes {
		// The helpers' tables follow from the plan's crypt specs and
		// these keys: a key of another size is not the run's.
		keys.Wipe()
		if n == 0 {
			return nil, cleanup, refuse(spec.Disk.Path, "give the passphrase or key file the rekey was started with",
				"it opens the old key but not the new one staged in the header of journal %s", o.Journal)
		}
		return nil, cleanup, refuse(spec.Disk.Path, "check that this journal belongs to this disk",
			"the header in journal %s holds a staged key of %d bits, but its plan says the new key (%s) has %d bits", o.Journal, n*8, spec.Crypt.Cipher, spec.Crypt.KeyBytes*8)
	}
	r = &run{e: e, j: j, spec: &spec, plan: spec.Forward, hdr: hdr, stop: o.Stop,
		devs: map[BackingID]dmtable.Dev{DiskID: di.Dev}}
	r.setKeys(spec.roles(keys))
	keys.Wipe()
	closers = append(closers, r.wipeKeys)
	if spec.Abort != nil {
		// An abort plan is stored only once an abort began: whatever
		// stopped it (a signal, a failure, a crash), the run continues
		// with it.
		r.plan, r.aborted = spec.Abort, true
	}
	r.st = State{Phase: js.Phase, Boundary: Sectors(js.Boundary)}
	disk, err := e.Host.OpenDisk(spec.Disk.Path)
	if err != nil {
		return nil, cleanup, fmt.Errorf("opening %s: %w", spec.Disk.Path, err)
	}
	closers = append(closers, func() { disk.Close() })
	r.disk = disk
	if err := r.reconcile(); err != nil {
		return nil, cleanup, err
	}
	traceStep("reconciled")
	return r, cleanup, nil
}

// further reports whether state a is past state b in plan p.
func (p *Plan) further(a, b State) bool {
	if a.Phase != b.Phase {
		return a.Phase > b.Phase
	}
	return p.BytesDone(a) > p.BytesDone(b)
}

// reconcile decides where the run really is, from the journal's state,
// the first 4 KiB of the disk (design.md section 3) and the on-disk
// checkpoint.
func (r *run) reconcile() error {
	first := make([]byte, labelSectors*512)
	if _, err := r.disk.ReadAt(first, 0); err != nil {
		return fmt.Errorf("reading the start of %s: %w", r.spec.Disk.Path, err)
	}
	// Nothing is written before the disk is known to be this run's.
	if err := r.checkDiskIdentity(first); err != nil {
		return err
	}
	// A chunk rewritten in place whose step did not commit: its saved
	// contents go back before anything reads the disk (section 9).
	if z, ok, err := r.j.PendingZone(); err != nil {
		return err
	} else if ok {
		if err := r.restoreZone(z); err != nil {
			return err
		}
		if _, err := r.disk.ReadAt(first, 0); err != nil {
			return fmt.Errorf("reading the start of %s: %w", r.spec.Disk.Path, err)
		}
	}
	id := Identify(first)
	r.ident = id
	p := r.plan
	dev := r.spec.Disk.Path
	if sw := p.PhaseIndex(PhaseToLUKS); sw >= 0 {
		switch {
		case id == IdentityLVM && p.Switched(r.st):
			return refuse(dev, "the disk was changed outside dmconvert; do not write to it and restore it from a backup of its header if needed",
				"it carries an LVM label, but journal %s says the LUKS header was already written", r.j.Path())
		case id == IdentityLVM:
			// The label was never destroyed: the disk is authoritative for
			// every sector, whatever happened to the tail copy (after a
			// reboot LVM may have used the disk directly). Start over.
			r.st = p.Start()
		case !p.Switched(r.st) && r.st.Phase < sw:
			return refuse(dev, "give this run's disk with --device if device names changed since it started; check that journal "+r.j.Path()+" belongs to this disk",
				"it carries no LVM label (%v) although the run never switched it", id)
		case !p.Switched(r.st):
			// The label was destroyed inside the switch, so the switch
			// happened; its commit did not. The head is on the tail.
			r.st = p.enter(sw + 1)
			if err := r.rewriteHeader(); err != nil {
				return err
			}
		default:
			if err := r.adoptDiskCheckpoint(); err != nil {
				return err
			}
		}
		return nil
	}
	tl := p.PhaseIndex(PhaseToLabel)
	if tl >= 0 && r.spec.VG == "" {
		// No LVM label comes back (a file system on the mapping): the
		// switch happened when the disk's first block equals the head's
		// copy it was written from.
		if r.st.Phase == tl {
			done, err := r.switchDone(tl, first)
			if err != nil {
				return err
			}
			if done {
				r.st = p.enter(tl + 1)
			}
		}
		if r.headerLive(r.st) {
			return r.adoptDiskCheckpoint()
		}
		return nil
	}
	switch {
	case tl >= 0 && r.st.Phase == tl && id == IdentityLVM:
		// The head's first block is back: the switch happened.
		r.st = p.enter(tl + 1)
	case tl >= 0 && r.st.Phase > tl && id != IdentityLVM:
		return refuse(dev, "", "journal %s says the LVM label was restored, but the disk shows %v", r.j.Path(), id)
	case tl >= 0 && r.st.Phase < tl && id == IdentityLVM:
		return refuse(dev, "", "it carries an LVM label, but journal %s says the abort has not restored it yet", r.j.Path())
	case r.headerLive(r.st):
		return r.adoptDiskCheckpoint()
	}
	return nil
}

// checkDiskIdentity refuses a disk that is not this run's: device names
// can change across boots, and two disks of one size can swap names, so
// the size the journal recorded is not enough to write on a disk. The
// disk is another when its LVM label names another PV, or its LUKS header
// (or dmconvert's disguised LUKS1 header) another UUID. A disk that shows
// neither (a TrueCrypt or plain dm-crypt volume, a file system moved
// back by a decrypt, a header being written) is left to reconcile's
// checks of the states in which it may show that. A plain or TrueCrypt
// source's disk is not checked.
func (r *run) checkDiskIdentity(first []byte) error {
	if r.hdr == nil || (r.hdr.Version() != 1 && r.hdr.Version() != 2) {
		// A plain or TrueCrypt source has no header of its own on the
		// disk, and its PV never shows there: what lies before a plain
		// mapping's offset (an old label, an old header) is not its.
		return nil
	}
	dev := r.spec.Disk.Path
	hint := "give this run's disk with --device if device names changed since it started; check that journal " + r.j.Path() + " belongs to this disk"
	if got, ok := LVMLabelPVUUID(first); ok {
		if r.spec.PVUUID != "" && !sameUUID(got, r.spec.PVUUID) {
			return refuse(dev, hint, "it is LVM physical volume %s, but the run of journal %s converts physical volume %s", got, r.j.Path(), r.spec.PVUUID)
		}
		return nil
	}
	got, ok := luksUUIDAt(first)
	if !ok {
		return nil
	}
	want := r.hdr.UUID()
	if want != "" && !sameUUID(got, want) && !sameUUID(got, r.spec.LUKSUUID) {
		return refuse(dev, hint, "its LUKS header has UUID %s, but the run of journal %s belongs to the LUKS header with UUID %s", got, r.j.Path(), want)
	}
	return nil
}

// adoptDiskCheckpoint moves the state forward to the on-disk checkpoint
// when it is further than the journal's (the checkpoint is written just
// before the journal commit; both mean the chunk is safe).
func (r *run) adoptDiskCheckpoint() error {
	cp, ok, err := r.hdr.ReadCheckpoint(r.disk)
	if err != nil || !ok {
		if v := r.hdr.Version(); (v == 1 || v == 2) && r.ident != IdentityLUKS && r.ident != IdentityDisguisedLUKS1 {
			// Every header write keeps the first sector's magic and UUID
			// (they are the same before and after it): a disk without
			// them is not this run's, and is not written.
			return refuse(r.spec.Disk.Path, "give this run's disk with --device if device names changed since it started; check that journal "+r.j.Path()+" belongs to this disk",
				"it shows %v where the LUKS header of the run of journal %s should be", r.ident, r.j.Path())
		}
		// A torn header write: write the header again (nothing maps
		// that region any more).
		return r.rewriteHeader()
	}
	if cp.Run != r.spec.ID {
		return refuse(r.spec.Disk.Path, "check that this journal belongs to this disk", "its header belongs to run %s, not to run %s of journal %s", cp.Run, r.spec.ID, r.j.Path())
	}
	st := State{Phase: cp.Phase, Boundary: cp.Boundary}
	if cp.Plan == r.planName() && st.Phase <= len(r.plan.Phases) && r.plan.further(st, r.st) && !r.plan.crossesMark(r.st, st) {
		r.st = st
	}
	return nil
}

// rewriteHeader writes the whole in-progress header with the current
// checkpoint (after a switch whose header write may not have finished).
func (r *run) rewriteHeader() error {
	img, err := r.hdr.Image(r.cp(r.st))
	if err != nil {
		return err
	}
	if u := r.plan.Geometry.HeaderUsed; u > 0 && int(u*512) < len(img) {
		// A rekey's data already lives in the end of the header area.
		img = img[:u*512]
	}
	if err := r.writeDisk([]Write{{Off: 0, Data: img}}); err != nil {
		return fmt.Errorf("rewriting the header of %s: %w", r.spec.Disk.Path, err)
	}
	return nil
}

// rebuild makes the device stack match the reconciled state: helpers and F
// exist with the right tables (no chunk mirrored: the chunk in flight is
// redone) and nothing is left suspended. It runs before the LVM fence is
// taken: after a reboot LVM sees the VG nowhere until F exists (the disk
// carries the header), and lvm's lock checks the VG. It reports whether F
// had to be created (then activate puts the LVs back on it).
func (r *run) rebuild() (fresh bool, err error) {
	if err := r.dropUnfinished(); err != nil {
		return false, err
	}
	if info, err := r.e.DM.Info(r.spec.Name); err == nil {
		r.fdev = info.Dev
	}
	if err := r.settle(); err != nil {
		return false, err
	}
	if setup := r.plan.PhaseIndex(PhaseSetup); r.ident == IdentityLVM && setup >= 0 && r.st.Phase <= max(setup, r.plan.PhaseIndex(PhaseRestack)) {
		// Setup has not run (or runs again) and LVM sees the PV on the
		// disk itself: setup creates everything, under the fence.
		return false, r.resumeSuspendedUsers()
	}
	_, ferr := r.e.DM.Info(r.spec.Name)
	if tl := r.plan.PhaseIndex(PhaseToLabel); errors.Is(ferr, ErrNoDevice) && r.spec.VG == "" && tl >= 0 && r.st.Phase > tl {
		// A reboot after the switch of a file system's mapping: the
		// disk is plain from its first sector, and the system may have
		// mounted it already. Nothing is left to map: finalize only
		// removes what is left of the run.
		return false, nil
	}
	if err := r.ensureHelpers(); err != nil {
		return false, err
	}
	_, ferr = r.e.DM.Info(r.spec.Name)
	fresh = errors.Is(ferr, ErrNoDevice)
	if err := r.ensureF(); err != nil {
		return false, err
	}
	return fresh, r.resumeSuspendedUsers()
}

// dropUnfinished removes the run's devices (F and the helpers) that exist
// without a live table: a process killed inside a create, between the
// kernel's device create and the resume of its first table (a kill while
// dm-crypt's constructor starts its threads fails the load with EINTR).
// Such a device never mapped anything, and the kernel registers no block
// device for it until a table is loaded, so no table can refer to it
// (ENXIO); the steps that follow create it again as if it never existed.
func (r *run) dropUnfinished() error {
	names := []string{r.spec.Name}
	for _, id := range slices.Sorted(maps.Keys(r.spec.Helpers)) {
		names = append(names, r.spec.Helpers[id])
	}
	for _, n := range names {
		info, err := r.e.DM.Info(n)
		if errors.Is(err, ErrNoDevice) || (err == nil && info.Live) {
			continue
		}
		if err != nil {
			return fmt.Errorf("looking up %s: %w", n, err)
		}
		if err := r.e.DM.Remove(n); err != nil {
			return fmt.Errorf("removing %s, left without a table by an interrupted create: %w", n, err)
		}
	}
	return nil
}

// activate brings the VG's LVs back on F after a reboot (with the fence
// held): LVM cannot see the PV on the disk, which carries the header.
func (r *run) activate(ctx context.Context, fresh bool) error {
	if !fresh || r.spec.VG == "" || r.ident == IdentityLVM {
		return nil
	}
	devs := []string{r.e.Host.NodePath(r.spec.Name)}
	for i, d := range r.spec.VGDevices {
		if i >= len(r.spec.VGPVUUIDs) {
			// A journal without the UUIDs: the names of plan time.
			if d != r.spec.Disk.Path {
				devs = append(devs, d)
			}
			continue
		}
		uuid := r.spec.VGPVUUIDs[i]
		if uuid == r.spec.PVUUID {
			continue // the PV being converted: on F
		}
		// The other PVs of the VG, wherever they are now (device names
		// change across reboots); where they were if no device carries
		// the label (LVM then says which PV is missing).
		if p := r.e.LVM.LocatePV(ctx, uuid, d); p != "" {
			d = p
		}
		devs = append(devs, d)
	}
	if err := r.e.LVM.Activate(ctx, r.spec.VG, devs); err != nil {
		return fmt.Errorf("activating volume group %s on %s: %w", r.spec.VG, r.spec.Name, err)
	}
	return nil
}

// resumeSuspendedUsers resumes devices left suspended by a killed run
// (restack and unstack suspend the devices above the disk).
func (r *run) resumeSuspendedUsers() error {
	list, err := r.e.DM.List()
	if err != nil {
		return fmt.Errorf("listing device-mapper devices: %w", err)
	}
	for _, d := range list {
		info, err := r.e.DM.Info(d.Name)
		if err != nil || !info.Suspended {
			continue
		}
		deps, err := r.e.DM.Deps(d.Name)
		if err != nil {
			continue
		}
		for _, x := range deps {
			if x == r.spec.Disk.Dev || (!r.fdev.IsZero() && x == r.fdev) {
				if err := r.e.DM.Resume(d.Name); err != nil {
					return fmt.Errorf("resuming %s, left suspended by the interrupted run: %w", d.Name, err)
				}
				break
			}
		}
	}
	return nil
}

// Resume continues an interrupted run (forward or abort) from its journal.
func (e *Engine) Resume(ctx context.Context, o ResumeOptions) error {
	r, cleanup, err := e.openRun(ctx, o)
	if err != nil {
		return err
	}
	defer cleanup()
	// A killed run may have left F with a mirror (LVM then cannot see
	// the VG, so not even the fence could be taken) or suspended; after
	// a reboot F does not exist at all.
	fresh, err := r.rebuild()
	if err != nil {
		return err
	}
	traceStep("rebuilt")
	return r.execute(ctx, func() error {
		if err := r.activate(ctx, fresh); err != nil {
			return err
		}
		return r.setStatus(r.status(), "")
	})
}

// Abort walks an interrupted or running-then-stopped run back to the
// original layout, online.
func (e *Engine) Abort(ctx context.Context, o ResumeOptions) error {
	r, cleanup, err := e.openRun(ctx, o)
	if err != nil {
		return err
	}
	defer cleanup()
	fresh, err := r.rebuild()
	if err != nil {
		return err
	}
	traceStep("rebuilt")
	return r.execute(ctx, func() error {
		if err := r.activate(ctx, fresh); err != nil {
			return err
		}
		if r.aborted {
			return r.setStatus(r.status(), "")
		}
		ab, err := r.plan.BuildAbort(r.st)
		if err != nil {
			return err
		}
		r.spec.Abort = ab
		raw, err := json.Marshal(r.spec)
		if err != nil {
			return err
		}
		r.plan, r.aborted = ab, true
		r.st = ab.Start()
		if err := r.j.SetPlan(raw, journal.State{Status: journal.StatusAborting, Phase: r.st.Phase, Boundary: uint64(r.st.Boundary)}); err != nil {
			return err
		}
		// The abort plan's first table may need devices the forward
		// plan had not created yet (an abort right after a reboot).
		_, err = r.rebuild()
		return err
	})
}
