package convert

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/dmconvert/dmconvert/dmtable"
	"github.com/dmconvert/dmconvert/journal"
)

// Engine executes plans against a device mapper, a host, LVM and a
// journal. It holds no per-run state; a run is started with Execute,
// Resume or Abort.
type Engine struct {
	DM       DeviceMapper
	Host     Host
	LVM      VolumeManager
	Progress Progress
	// RegionSize is the mirror region size (sectors). Larger regions
	// copy faster; a write to a region being copied waits for it.
	RegionSize Sectors
	// PollInterval bounds each wait for a mirror event; the status is
	// read again after it (a fallback: the event normally comes first).
	PollInterval time.Duration
	// Lock pins memory while devices are suspended (mlockall); nil in
	// unit tests.
	Lock func() error
	// FailHook, when set, is called at every failpoint (tests). When
	// nil, the process-wide hook of a -tags failpoints build applies.
	FailHook func(name string)
	// CheckpointEvery spaces the on-disk checkpoints of a move's chunks
	// (0: after every chunk). The journal records every chunk; the
	// header's copy only backs it up (reconcile adopts it only when it
	// is further) and names the run, so it may lag: a move's last chunk
	// and every other step still write it.
	CheckpointEvery time.Duration
	// MinRekeyGap is the least room before a LUKS volume's data that a
	// rekey moves the data into (0: DefaultMinRekeyGap); with less it
	// rewrites in place.
	MinRekeyGap Sectors
}

// hit marks failpoint name for this run.
func (r *run) hit(name string) {
	if r.e.FailHook != nil {
		if !failpointSet[name] {
			panic(fmt.Sprintf("convert: undeclared failpoint %q", name))
		}
		r.e.FailHook(name)
		return
	}
	hit(name)
}

func (e *Engine) progress() Progress {
	if e.Progress == nil {
		return NoProgress{}
	}
	return e.Progress
}

// Spec is the immutable description of a run, stored in the journal next
// to the plan.
type Spec struct {
	Version int      `json:"version"`
	ID      string   `json:"id"`
	Op      string   `json:"op"`
	Disk    DiskInfo `json:"disk"`
	// Name is F's name (the final mapping name).
	Name string `json:"name"`
	// Helpers are the private devices by backing (e.g. "new" -> C).
	Helpers map[BackingID]string `json:"helpers"`
	// Crypt is the target layout's encryption (encrypt, rekey), OldCrypt
	// the source's (decrypt, rekey).
	Crypt    CryptSpec `json:"crypt"`
	OldCrypt CryptSpec `json:"old_crypt,omitzero"`
	// PVDevice is where LVM saw the PV at plan time: the disk (encrypt)
	// or the LUKS mapping (decrypt, rekey).
	PVDevice string `json:"pv_device,omitempty"`
	// LUKS header facts.
	LUKSVersion int    `json:"luks_version"`
	LUKSUUID    string `json:"luks_uuid"`
	// LVM facts at plan time.
	PVUUID    string   `json:"pv_uuid,omitempty"`
	VG        string   `json:"vg,omitempty"`
	VGDevices []string `json:"vg_devices,omitempty"`
	// VGPVUUIDs are the PV UUIDs of VGDevices (same order): after a
	// reboot the devices are found by them, names can change.
	VGPVUUIDs []string `json:"vg_pv_uuids,omitempty"`
	// VGSeqno is the VG's metadata sequence number at plan time.
	VGSeqno uint64 `json:"vg_seqno,omitempty"`
	// KeyslotIDs maps each LUKS2 keyslot staged for a rekey's new key to
	// the old keyslot whose number it takes at the end (the one its
	// passphrase opened). Absent in journals of earlier versions: their
	// runs end with the staged numbers.
	KeyslotIDs map[int]int `json:"keyslot_ids,omitempty"`
	// Stacked are the dm devices that mapped the disk at plan time, with
	// their tables (linear/striped: no keys).
	Stacked map[string]string `json:"stacked,omitempty"`
	// NewKeyFile is where a plain rekey keeps its new key; HeaderFile,
	// with PlainTo "luks2", the detached LUKS2 header of a plain volume
	// turned into LUKS2.
	NewKeyFile string `json:"new_key_file,omitempty"`
	HeaderFile string `json:"header_file,omitempty"`
	PlainTo    string `json:"plain_to,omitempty"`
	// TCrypt: the source was a TrueCrypt/VeraCrypt volume (PlainTo is
	// luks2; its data moves to the start of the disk).
	TCrypt bool `json:"tcrypt,omitempty"`
	// Forward is the plan; Abort is set once an abort began.
	Forward *Plan `json:"forward"`
	Abort   *Plan `json:"abort,omitempty"`
}

// run is one execution of a plan.
type run struct {
	e       *Engine
	j       *journal.Journal
	spec    *Spec
	plan    *Plan // Forward or Abort
	aborted bool
	st      State
	disk    Disk
	hdr     HeaderFormat
	keys    map[BackingID]dmtable.Key
	devs    map[BackingID]dmtable.Dev
	fdev    dmtable.Dev
	release func() error
	// prep, when set, delivers the memory pinning and the LVM fence
	// started early (startPrep); execute takes them from there.
	prep   <-chan prepResult
	stop   func() bool // true once the user asked to stop
	ident  Identity    // what the disk's first 4 KiB said at reconcile
	lastEv time.Time
	lastCP time.Time // the last on-disk checkpoint (CheckpointEvery)
	// pre is the chunk whose intent the last chunk's commit recorded
	// (in the same journal transaction); seq 0: none.
	pre preIntent
}

type preIntent struct {
	seq   uint64
	phase int
	s, e  Sectors
}

// setKeys takes copies of the volume keys by role (NewID: the key of the
// target layout, OldID: of the source layout).
func (r *run) setKeys(k map[BackingID][]byte) {
	r.keys = map[BackingID]dmtable.Key{}
	for id, b := range k {
		if len(b) > 0 {
			r.keys[id] = dmtable.HexKey(b)
		}
	}
}

func (r *run) wipeKeys() {
	for _, k := range r.keys {
		k.Wipe()
	}
}

// roles says which of a header's keys plays which role in this run: the
// header's data segment key is the target's for encrypt and the source's
// for decrypt and rekey; rekey's new key waits in an unbound keyslot.
func (s *Spec) roles(k Keys) map[BackingID][]byte {
	switch s.Op {
	case "encrypt":
		return map[BackingID][]byte{NewID: k.Bound}
	case "decrypt":
		return map[BackingID][]byte{OldID: k.Bound}
	}
	return map[BackingID][]byte{OldID: k.Bound, NewID: k.Unbound}
}

// ErrInterrupted is returned when a run stopped at a step boundary because
// the user asked it to (the journal holds a resumable state).
var ErrInterrupted = errors.New("interrupted: the run stopped at a safe point and can be resumed")

func (r *run) planName() string {
	if r.aborted {
		return "abort"
	}
	return "forward"
}

// loop runs steps until the plan is done, the user stops it, or a step
// fails.
func (r *run) loop(ctx context.Context) error {
	for !r.plan.Done(r.st) {
		// A chunk already intended runs before a stop is honoured: the
		// journal says it is under way.
		if r.pre.seq == 0 && r.stop != nil && r.stop() {
			if err := r.settle(); err != nil {
				return err
			}
			if err := r.setStatus(journal.StatusInterrupted, ""); err != nil {
				return err
			}
			return ErrInterrupted
		}
		if err := r.step(ctx); err != nil {
			return err
		}
	}
	return nil
}

func (r *run) step(ctx context.Context) error {
	ph := r.plan.Phases[r.st.Phase]
	if ph.Kind == PhaseMove && r.st.Boundary == ph.InitialBoundary() {
		r.event(Event{Kind: EventPhase, Phase: ph.String()})
	} else if ph.Kind != PhaseMove {
		r.event(Event{Kind: EventPhase, Phase: string(ph.Kind)})
	}
	switch ph.Kind {
	case PhaseSetup:
		return r.doSetup(ctx)
	case PhaseRestack:
		return r.doRestack(ctx, false)
	case PhaseMove:
		return r.doChunk(ctx, ph)
	case PhaseToLUKS:
		return r.doToLUKS(ctx)
	case PhaseToLabel:
		return r.doToLabel(ctx, ph)
	case PhaseFinalize:
		return r.doFinalize(ctx)
	case PhaseUnstack:
		return r.doUnstack(ctx)
	case PhaseMark:
		return r.doMark(ctx)
	}
	return fmt.Errorf("internal error: unknown phase kind %q", ph.Kind)
}

func (r *run) event(ev Event) {
	ev.Time = time.Now()
	ev.Done = r.plan.BytesDone(r.st)
	ev.Total = r.plan.BytesTotal()
	r.e.progress().Event(ev)
}

// settle gives F, if it exists, the table of the committed state without
// a mirror. After a chunk commits, its mirror stays live until the next
// step loads the next table; a run that stops there must not leave it:
// LVM skips every device that contains a mirror target ("Scanning mirror
// devices is disabled"), so it would not see the PV on F. Routing the
// committed chunk to its new place is what the next step would do anyway.
func (r *run) settle() error {
	if r.plan.Done(r.st) {
		return nil
	}
	info, err := r.e.DM.Info(r.spec.Name)
	if errors.Is(err, ErrNoDevice) {
		return nil
	}
	if err != nil {
		return err
	}
	r.fdev = info.Dev
	for id, n := range r.spec.Helpers {
		if hi, err := r.e.DM.Info(n); err == nil && hi.Live {
			r.devs[id] = hi.Dev
		} else {
			// Gone (finalize removes the helpers before LVM's refresh):
			// a table naming it would not load.
			delete(r.devs, id)
		}
	}
	st := r.st
	switch i := st.Phase; {
	case r.plan.Phases[i].Kind == PhaseToLUKS && i > 0 && r.plan.Phases[i-1].Kind == PhaseMove,
		r.plan.Phases[i].Kind == PhaseToLabel:
		// An identity switch whose commit is missing (a failed write
		// or commit in it; reconcile has decided the others): whether
		// it happened is on the disk, which is what the next reconcile
		// reads too. F must map the head where that reconcile will, or
		// the writes between now and then land where it does not look.
		happened, err := r.switchHappened(i)
		if err != nil {
			return err
		}
		switch {
		case happened:
			st = r.plan.enter(i + 1)
		case r.plan.Phases[i].Kind == PhaseToLUKS:
			// The head is whole on the tail but the label is still on
			// the disk, so the disk's copy is authoritative (the
			// mirror wrote both): F maps its head on the disk until
			// the switch itself.
			st = State{Phase: i - 1, Boundary: r.plan.Phases[i-1].InitialBoundary()}
		}
	}
	for _, d := range r.plan.Layout(st) {
		if _, ok := r.devs[d.On.Dev]; !ok {
			// A helper the state needs does not exist (yet): the step
			// that creates it loads F's table too.
			return nil
		}
	}
	t, err := r.plan.tableFor(st, nil, r.devs, r.e.RegionSize)
	if err != nil {
		return err
	}
	// A table loaded by a step that died before its suspend waits in
	// the inactive slot: the next resume of F, whoever does it, would
	// make it live (an identity switch's table without its write). So F
	// is reloaded unless its live table is right and nothing waits.
	if cur, err := r.e.DM.Table(r.spec.Name); err == nil && cur.Equal(t) && !info.Suspended && !info.Inactive {
		return nil
	}
	_, err = r.swap(r.spec.Name, t, nil)
	return err
}

// intend durably records what the next step will do (write-ahead).
func (r *run) intend(kind string, s, e Sectors) (uint64, error) {
	return r.intendDetail(kind, s, e, nil)
}

// intendDetail is intend with a detail for reconcile.
func (r *run) intendDetail(kind string, s, e Sectors, detail json.RawMessage) (uint64, error) {
	r.hit("intent:before")
	seq, err := r.j.Intend(journal.Step{Kind: kind, Phase: r.st.Phase, Start: uint64(s), End: uint64(e), Detail: detail})
	if err != nil {
		return 0, err
	}
	r.hit("intent:after")
	return seq, nil
}

func (r *run) status() string {
	if r.aborted {
		return journal.StatusAborting
	}
	return journal.StatusRunning
}

// commit durably records that the step seq brought the run to next.
func (r *run) commit(seq uint64, next State) error {
	r.hit("commit:before")
	if err := r.j.Complete(seq, "done", r.journalState(next)); err != nil {
		return err
	}
	r.hit("commit:after")
	r.st = next
	return nil
}

func (r *run) journalState(next State) *journal.State {
	status := r.status()
	if r.plan.Done(next) {
		status = journal.StatusDone
		if r.aborted {
			status = journal.StatusAborted
		}
	}
	return &journal.State{
		Status: status, Phase: next.Phase, Boundary: uint64(next.Boundary),
		DoneBytes: r.plan.BytesDone(next),
	}
}

// commitChunk is commit for a chunk step; when the next step is another
// chunk of the same phase, its intent goes into the same journal
// transaction (one commit to the disk per chunk instead of two). The
// durable states are those of commit then intend with nothing between:
// the failpoints of both are hit on either side of the transaction.
func (r *run) commitChunk(seq uint64, next State) error {
	ph := r.plan.Phases[r.st.Phase]
	if next.Phase != r.st.Phase || r.plan.Done(next) || r.stop != nil && r.stop() {
		// (A stop request: no next intent, so the loop honours it.)
		return r.commit(seq, next)
	}
	s, e, ok := ph.NextChunk(next.Boundary)
	if !ok {
		return r.commit(seq, next)
	}
	r.hit("commit:before")
	r.hit("intent:before")
	nseq, err := r.j.CompleteAndIntend(seq, "done", r.journalState(next),
		journal.Step{Kind: "chunk", Phase: next.Phase, Start: uint64(s), End: uint64(e)})
	if err != nil {
		return err
	}
	r.st = next
	r.pre = preIntent{seq: nseq, phase: next.Phase, s: s, e: e}
	r.hit("commit:after")
	r.hit("intent:after")
	return nil
}

func (r *run) setStatus(status, msg string) error {
	return r.j.SetState(journal.State{
		Status: status, Phase: r.st.Phase, Boundary: uint64(r.st.Boundary),
		DoneBytes: r.plan.BytesDone(r.st), Message: msg,
	})
}

// headerLive reports whether the on-disk header carries checkpoints at
// state st of the current plan.
func (r *run) headerLive(st State) bool {
	if r.hdr == nil || r.plan.Done(st) {
		return false
	}
	return r.plan.headerLiveAt(st.Phase)
}

// checkpoint writes the on-disk record of next, if the header is live.
func (r *run) checkpoint(next State) error {
	if !r.headerLive(next) {
		return nil
	}
	if d := r.e.CheckpointEvery; d > 0 && next.Phase == r.st.Phase && !r.lastCP.IsZero() && time.Since(r.lastCP) < d {
		// A chunk in the middle of a move: the journal's commit, next,
		// records it; the header's copy catches up within d.
		return nil
	}
	r.hit("checkpoint:before")
	ws, err := r.hdr.CheckpointWrites(r.cp(next))
	if err != nil {
		return err
	}
	if err := r.writeDisk(ws); err != nil {
		return fmt.Errorf("writing the checkpoint to %s: %w", r.spec.Disk.Path, err)
	}
	r.lastCP = time.Now()
	r.hit("checkpoint:after")
	return nil
}

func (r *run) cp(st State) Checkpoint {
	return Checkpoint{Run: r.spec.ID, Op: r.spec.Op, Plan: r.planName(), Phase: st.Phase, Boundary: st.Boundary, Journal: r.j.Path()}
}

// writeDisk writes ws in order, flushing after each write that asks for
// it and at the end (not twice in a row: a flush with nothing written
// since the last one is a round trip to the disk for nothing).
func (r *run) writeDisk(ws []Write) error {
	dirty := false
	for _, w := range ws {
		if _, err := r.disk.WriteAt(w.Data, w.Off); err != nil {
			return err
		}
		dirty = true
		if w.Flush {
			if err := r.disk.Flush(); err != nil {
				return err
			}
			dirty = false
		}
	}
	if !dirty && len(ws) > 0 {
		return nil
	}
	return r.disk.Flush()
}

// swap makes t F's live table: load, suspend, then (while suspended)
// during(), then resume. F is resumed on every path out; when during()
// fails, with the table it had: t was loaded for a step that did not
// happen (resuming would make it live, an identity switch's table
// without its write), and the caller's settle decides what maps F.
func (r *run) swap(name string, t dmtable.Table, during func() error) (stall time.Duration, err error) {
	r.hit("load:before")
	if err := r.e.DM.Load(name, t); err != nil {
		return 0, fmt.Errorf("loading the table of %s: %w", name, err)
	}
	r.hit("load:after")
	t0 := time.Now()
	// F is suspended without flush: a write its mirror holds because a
	// leg failed it (handle_errors) is requeued into the table live
	// after the resume, where it goes to the copy that table keeps,
	// instead of failing or (without handle_errors) being acknowledged
	// with only the other leg holding it (design.md section 2). Devices
	// above F are suspended as LVM does, with flush and freeze.
	suspend := r.e.DM.Suspend
	if name == r.spec.Name {
		suspend = r.e.DM.SuspendNoFlush
	}
	if err := suspend(name); err != nil {
		return 0, fmt.Errorf("suspending %s: %w", name, err)
	}
	resumed := false
	defer func() {
		if !resumed {
			// Never leave a device suspended on an error path.
			if rerr := r.e.DM.Resume(name); rerr != nil {
				err = errors.Join(err, fmt.Errorf("resuming %s after an error: %w", name, rerr))
			}
		}
	}()
	r.hit("suspend:after")
	if during != nil {
		if err := during(); err != nil {
			if cerr := r.e.DM.ClearInactive(name); cerr != nil {
				err = errors.Join(err, fmt.Errorf("dropping the table loaded for %s: %w", name, cerr))
			}
			return 0, err
		}
	}
	r.hit("resume:before")
	resumed = true
	if err := r.e.DM.Resume(name); err != nil {
		return 0, fmt.Errorf("resuming %s: %w", name, err)
	}
	stall = time.Since(t0)
	r.hit("resume:after")
	return stall, nil
}

// doChunk moves one chunk through a mirror. The order below is the
// write-ahead order of docs/design.md section 2.
func (r *run) doChunk(ctx context.Context, ph Phase) error {
	if ph.InPlace {
		return r.doRewrite(ph)
	}
	s, e, ok := ph.NextChunk(r.st.Boundary)
	if !ok {
		return fmt.Errorf("internal error: no chunk at %+v", r.st)
	}
	next := r.plan.Advance(r.st)
	seq := r.pre.seq
	if seq == 0 || r.pre.phase != r.st.Phase || r.pre.s != s || r.pre.e != e {
		var err error
		if seq, err = r.intend("chunk", s, e); err != nil {
			return err
		}
	}
	r.pre = preIntent{}
	// This table also routes every chunk committed before to its new
	// place: only now, after their commit, may writes stop reaching the
	// old copies.
	t, err := r.plan.tableFor(r.st, &chunkRef{start: s, end: e, from: ph.From, to: ph.To}, r.devs, r.e.RegionSize)
	if err != nil {
		return err
	}
	stall, err := r.swap(r.spec.Name, t, nil)
	if err != nil {
		return err
	}
	if err := r.waitSync(ctx, s, e); err != nil {
		return err
	}
	r.hit("sync:after")
	// The kernel's copies and every write acknowledged through the mirror
	// are on the disk; make them durable before anything records them.
	if err := r.disk.Flush(); err != nil {
		return fmt.Errorf("flushing %s: %w", r.spec.Disk.Path, err)
	}
	r.hit("flush:after")
	if err := r.checkpoint(next); err != nil {
		return err
	}
	if err := r.commitChunk(seq, next); err != nil {
		return err
	}
	r.event(Event{Kind: EventChunk, Stall: stall})
	return nil
}

// waitSync waits until the mirror over F[s,e) has copied every region
// and every leg is healthy. It waits on the device's event counter (the
// kernel raises an event when recovery ends) and reads the status after
// each event or poll interval. Cancellation of ctx does not cut a chunk
// short: the user's stop request is honoured between steps.
func (r *run) waitSync(ctx context.Context, s, e Sectors) error {
	wctx := context.WithoutCancel(ctx)
	poll := r.e.PollInterval
	if poll == 0 {
		poll = 2 * time.Second
	}
	for {
		info, err := r.e.DM.Info(r.spec.Name)
		if err != nil {
			return fmt.Errorf("waiting for the copy of F[%d,%d): %w", s, e, err)
		}
		st, err := r.e.DM.Status(r.spec.Name)
		if err != nil {
			return fmt.Errorf("reading the status of %s: %w", r.spec.Name, err)
		}
		var ms *dmtable.MirrorStatus
		for i := range st {
			if st[i].Mirror != nil && Sectors(st[i].Start) == s {
				ms = st[i].Mirror
			}
		}
		if ms == nil {
			return fmt.Errorf("internal error: %s has no mirror at sector %d", r.spec.Name, s)
		}
		if failed := ms.Failed(); len(failed) > 0 {
			return fmt.Errorf("a leg of the mirror over F[%d,%d) on %s failed (status %q): the disk reported I/O errors; nothing was committed for this chunk, fix the disk and run `dmconvert resume`", s, e, r.spec.Disk.Path, ms.String())
		}
		if ms.Synced() {
			return nil
		}
		if _, err := r.e.DM.WaitEvent(wctx, r.spec.Name, info.EventNr, poll); err != nil && !errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("waiting for an event of %s: %w", r.spec.Name, err)
		}
	}
}

// doToLUKS is the identity switch label -> header (design.md section 3):
// with F suspended and the head's copies equal, the header's first 4 KiB
// overwrite the LVM label; F resumes with its head on the tail; then the
// rest of the header is written.
func (r *run) doToLUKS(ctx context.Context) error {
	next := r.plan.Advance(r.st)
	seq, err := r.intend("to-luks", 0, 0)
	if err != nil {
		return err
	}
	img, err := r.hdr.Image(r.cp(next))
	if err != nil {
		return err
	}
	t, err := r.plan.tableFor(next, nil, r.devs, r.e.RegionSize)
	if err != nil {
		return err
	}
	first := img[:labelSectors*512]
	if _, err := r.swap(r.spec.Name, t, func() error {
		if _, err := r.disk.WriteAt(first, 0); err != nil {
			return fmt.Errorf("writing the header's first block to %s: %w", r.spec.Disk.Path, err)
		}
		if err := r.disk.Flush(); err != nil {
			return fmt.Errorf("flushing %s: %w", r.spec.Disk.Path, err)
		}
		r.hit("switch:label-written")
		return nil
	}); err != nil {
		return err
	}
	if err := r.writeHeaderRest(img); err != nil {
		return err
	}
	r.hit("switch:header-written")
	return r.commit(seq, next)
}

func (r *run) writeHeaderRest(img []byte) error {
	if err := r.writeDisk([]Write{{Off: int64(labelSectors * 512), Data: img[labelSectors*512:]}}); err != nil {
		return fmt.Errorf("writing the header to %s: %w", r.spec.Disk.Path, err)
	}
	return nil
}

// doMark marks the header of a decrypt or rekey as in progress, before
// anything moves: from then on stock cryptsetup refuses to open the disk
// (its data no longer matches one key and one offset), and the header
// carries the run's checkpoint.
func (r *run) doMark(ctx context.Context) error {
	next := r.plan.Advance(r.st)
	seq, err := r.intend("mark", 0, 0)
	if err != nil {
		return err
	}
	ws, err := r.hdr.MarkWrites(r.cp(next))
	if err != nil {
		return err
	}
	// One write at a time, each flushed (MarkWrites orders them): a
	// crash between two leaves a mark that reconcile redoes whole (the
	// record on the disk does not say the writes after it happened).
	for _, w := range ws {
		if err := r.writeDisk([]Write{w}); err != nil {
			return fmt.Errorf("marking the header of %s: %w", r.spec.Disk.Path, err)
		}
		r.hit("mark:part-written")
	}
	return r.commit(seq, next)
}

// doToLabel is the identity switch header -> label: every other sector of
// the head is already back in place and flushed; with F suspended, its
// first 4 KiB are copied from the tail over the header's first block, and
// F resumes mapping its head on the disk.
func (r *run) doToLabel(ctx context.Context, ph Phase) error {
	next := r.plan.Advance(r.st)
	src, _, err := r.plan.Geometry.Phys(ph.From, ph.Start, ph.End)
	if err != nil {
		return err
	}
	dst, _, err := r.plan.Geometry.Phys(ph.To, ph.Start, ph.End)
	if err != nil {
		return err
	}
	var detail json.RawMessage
	if r.spec.VG == "" {
		// No LVM label will say the switch happened: the intent keeps a
		// digest of the block it replaces, and reconcile compares
		// (switchDone). F's live table may still be the last chunk's
		// mirror, whose old leg is that block: F first gets the table of
		// the committed state, which maps nothing there.
		t0, err := r.plan.tableFor(r.st, nil, r.devs, r.e.RegionSize)
		if err != nil {
			return err
		}
		if _, err := r.swap(r.spec.Name, t0, nil); err != nil {
			return err
		}
		old := make([]byte, labelSectors*512)
		if _, err := r.disk.ReadAt(old, int64(dst*512)); err != nil {
			return fmt.Errorf("reading the first block of %s: %w", r.spec.Disk.Path, err)
		}
		sum := sha256.Sum256(old)
		if detail, err = json.Marshal(switchDetail{Replaces: hex.EncodeToString(sum[:])}); err != nil {
			return err
		}
	}
	seq, err := r.intendDetail("to-label", ph.Start, ph.End, detail)
	if err != nil {
		return err
	}
	t, err := r.plan.tableFor(next, nil, r.devs, r.e.RegionSize)
	if err != nil {
		return err
	}
	buf := make([]byte, (ph.End-ph.Start)*512)
	first := int(labelSectors * 512)
	if dst != 0 || len(buf) < first {
		first = len(buf)
	}
	if _, err := r.swap(r.spec.Name, t, func() error {
		if _, err := r.disk.ReadAt(buf, int64(src*512)); err != nil {
			return fmt.Errorf("reading the head's first block from %s: %w", r.spec.Disk.Path, err)
		}
		if first < len(buf) {
			// The rest of the head before its first block, which says
			// what the disk is.
			if _, err := r.disk.WriteAt(buf[first:], int64(dst*512)+int64(first)); err != nil {
				return fmt.Errorf("writing the head to %s: %w", r.spec.Disk.Path, err)
			}
			if err := r.disk.Flush(); err != nil {
				return fmt.Errorf("flushing %s: %w", r.spec.Disk.Path, err)
			}
			r.hit("switch:head-written")
		}
		if _, err := r.disk.WriteAt(buf[:first], int64(dst*512)); err != nil {
			return fmt.Errorf("writing the head's first block to %s: %w", r.spec.Disk.Path, err)
		}
		if err := r.disk.Flush(); err != nil {
			return fmt.Errorf("flushing %s: %w", r.spec.Disk.Path, err)
		}
		r.hit("switch:label-written")
		return nil
	}); err != nil {
		return err
	}
	return r.commit(seq, next)
}

// switchDetail is the detail of a to-label intent without an LVM label.
type switchDetail struct {
	Replaces string `json:"replaces"` // sha256 of the disk's first block before the switch
}

// switchHappened reads the disk's first block and says whether the
// identity switch of phase i (to-luks or to-label) happened, by the
// rules reconcile applies: the label gone (to-luks), back (to-label), or
// for a file system's head, the first block changed (switchDone).
func (r *run) switchHappened(i int) (bool, error) {
	first := make([]byte, labelSectors*512)
	if _, err := r.disk.ReadAt(first, 0); err != nil {
		return false, fmt.Errorf("reading the start of %s: %w", r.spec.Disk.Path, err)
	}
	id := Identify(first)
	switch {
	case r.plan.Phases[i].Kind == PhaseToLUKS:
		return id != IdentityLVM, nil
	case r.spec.VG == "":
		return r.switchDone(i, first)
	default:
		return id == IdentityLVM, nil
	}
}

// switchDone reports whether the identity switch whose intent is the
// journal's last step wrote the disk's first block (first): it no longer
// holds what it replaced. A 4 KiB write is taken as atomic, as for the
// LVM label (design.md section 3).
func (r *run) switchDone(tl int, first []byte) (bool, error) {
	ls, ok, err := r.j.LastStep()
	if err != nil || !ok || ls.Kind != "to-label" || ls.Phase != tl || ls.Result != "" {
		return false, err
	}
	var d switchDetail
	if err := json.Unmarshal(ls.Detail, &d); err != nil || d.Replaces == "" {
		return false, fmt.Errorf("journal %s: the switch's intent has no digest of the block it replaces", r.j.Path())
	}
	sum := sha256.Sum256(first)
	return hex.EncodeToString(sum[:]) != d.Replaces, nil
}

// doRewrite re-encrypts one chunk where it is (docs/design.md section 9).
// F is suspended with its current table, so no write reaches the chunk
// until the step ends; the chunk's disk contents are saved in the journal
// before the first byte of it is rewritten, the chunk is read through the
// source's helper and written through the destination's, flushed, and the
// commit (which drops the saved copy) comes before F resumes with the
// chunk on the destination. A crash before the commit leaves the saved
// copy, which reconcile writes back: the chunk is then wholly on the
// source, where the committed state says it is.
func (r *run) doRewrite(ph Phase) (err error) {
	s, e, ok := ph.NextChunk(r.st.Boundary)
	if !ok {
		return fmt.Errorf("internal error: no chunk at %+v", r.st)
	}
	next := r.plan.Advance(r.st)
	g := r.plan.Geometry
	ps, pe, err := g.Phys(ph.From, s, e)
	if err != nil {
		return err
	}
	seq, err := r.intend("rewrite", s, e)
	if err != nil {
		return err
	}
	t, err := r.plan.tableFor(next, nil, r.devs, r.e.RegionSize)
	if err != nil {
		return err
	}
	src, err := r.openHelper(ph.From.Dev)
	if err != nil {
		return err
	}
	defer src.Close()
	dst, err := r.openHelper(ph.To.Dev)
	if err != nil {
		return err
	}
	defer dst.Close()
	saved := make([]byte, (pe-ps)*512)
	buf := make([]byte, len(saved))
	t0 := time.Now()
	if err := r.e.DM.Suspend(r.spec.Name); err != nil {
		return fmt.Errorf("suspending %s: %w", r.spec.Name, err)
	}
	r.hit("suspend:after")
	state := "suspended" // then "saved", then "committed"
	defer func() {
		if err == nil {
			return
		}
		switch state {
		case "saved":
			// The chunk may be half rewritten: put the saved contents
			// back before F, whose table still maps the chunk on the
			// source, sees a byte of it again.
			if rerr := r.restoreZone(journal.Zone{Seq: seq, Off: int64(ps * 512), Data: saved}); rerr != nil {
				err = errors.Join(err, fmt.Errorf("%s is left suspended: F[%d,%d) could not be restored (%v); run `dmconvert resume` once the disk answers", r.spec.Name, s, e, rerr))
				return
			}
		case "committed":
			// The chunk is on the destination and the journal says so;
			// F's live table still maps it on the source. Resuming that
			// table would expose the chunk under the wrong key.
			// execute's settle loads the committed table.
			return
		}
		if rerr := r.e.DM.Resume(r.spec.Name); rerr != nil {
			err = errors.Join(err, fmt.Errorf("resuming %s after an error: %w", r.spec.Name, rerr))
		}
	}()
	if _, err := r.disk.ReadAt(saved, int64(ps*512)); err != nil {
		return fmt.Errorf("reading F[%d,%d) from %s: %w", s, e, r.spec.Disk.Path, err)
	}
	if err := r.j.SaveZone(journal.Zone{Seq: seq, Off: int64(ps * 512), Data: saved}); err != nil {
		return err
	}
	state = "saved"
	r.hit("rewrite:saved")
	so, do := (int64(s)+ph.From.Delta)*512, (int64(s)+ph.To.Delta)*512
	if _, err := src.ReadAt(buf, so); err != nil {
		return fmt.Errorf("reading F[%d,%d) through %s: %w", s, e, r.spec.Helpers[ph.From.Dev], err)
	}
	if _, err := dst.WriteAt(buf, do); err != nil {
		return fmt.Errorf("writing F[%d,%d) through %s: %w", s, e, r.spec.Helpers[ph.To.Dev], err)
	}
	clear(buf)
	if err := dst.Flush(); err != nil {
		return fmt.Errorf("flushing %s: %w", r.spec.Helpers[ph.To.Dev], err)
	}
	r.hit("rewrite:written")
	if err := r.commit(seq, next); err != nil {
		return err
	}
	state = "committed"
	r.hit("load:before")
	if err := r.e.DM.Load(r.spec.Name, t); err != nil {
		return fmt.Errorf("loading the table of %s: %w", r.spec.Name, err)
	}
	r.hit("load:after")
	r.hit("resume:before")
	state = "resumed"
	if err := r.e.DM.Resume(r.spec.Name); err != nil {
		return fmt.Errorf("resuming %s: %w", r.spec.Name, err)
	}
	r.hit("resume:after")
	r.event(Event{Kind: EventChunk, Stall: time.Since(t0)})
	return nil
}

// openHelper opens a helper device for direct I/O.
func (r *run) openHelper(id BackingID) (Disk, error) {
	name, ok := r.spec.Helpers[id]
	if !ok {
		return nil, fmt.Errorf("internal error: no helper %q", id)
	}
	d, err := r.e.Host.OpenDisk(r.e.Host.NodePath(name))
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", name, err)
	}
	return d, nil
}

// restoreZone writes a saved zone back to the disk, flushes, and drops it
// from the journal.
func (r *run) restoreZone(z journal.Zone) error {
	if _, err := r.disk.WriteAt(z.Data, z.Off); err != nil {
		return fmt.Errorf("writing the saved contents of [%d,%d) back to %s: %w", z.Off/512, (z.Off+int64(len(z.Data)))/512, r.spec.Disk.Path, err)
	}
	if err := r.disk.Flush(); err != nil {
		return fmt.Errorf("flushing %s: %w", r.spec.Disk.Path, err)
	}
	return r.j.DropZone()
}
