package convert

import (
	"errors"
	"fmt"
)

// labelSectors is the part of the disk's start that decides what the disk
// is: LVM looks for its label in sectors 0-3, LUKS has its magic at byte 0.
// It is switched as one 4 KiB write while F is suspended.
const labelSectors Sectors = 8

// EncryptGeometry is what the encrypt builder needs to know.
type EncryptGeometry struct {
	DiskSize Sectors // N
	Payload  Sectors // P, already rounded up to the crypt sector size
	Header   Sectors // H
	Chunk    Sectors // upper bound for a chunk; clamped to H
	Align    Sectors // crypt sector size in 512-byte sectors (1 or 8 ...)
}

// TailNeeded returns how many sectors the disk must have for an encrypt of
// this payload and header: the header in front, the payload, and the
// head's temporary home at the end.
func TailNeeded(payload, header Sectors) Sectors { return payload + 2*header }

// direction reports whether a move from one backing to another must walk
// backward (the destination lies above the source on the disk).
func (g Geometry) backward(from, to Backing) (bool, error) {
	fs, _, err := g.Phys(from, 0, 0)
	if err != nil {
		return false, err
	}
	ts, _, err := g.Phys(to, 0, 0)
	if err != nil {
		return false, err
	}
	return ts > fs, nil
}

func roundDown(x, a Sectors) Sectors { return x / a * a }

// BuildEncrypt returns the header-first encrypt plan (docs/design.md,
// "Encrypt"): setup, restack, head out to the tail, identity switch, body
// backward into the crypt mapping, head in, finalize.
func BuildEncrypt(eg EncryptGeometry) (*Plan, error) {
	N, P, H := eg.DiskSize, eg.Payload, eg.Header
	a := eg.Align
	if a == 0 {
		a = 1
	}
	switch {
	case H == 0 || H%labelSectors != 0 || H%a != 0:
		return nil, fmt.Errorf("header size %d sectors must be a non-zero multiple of 4 KiB and of the sector size", H)
	case P == 0 || P%a != 0:
		return nil, fmt.Errorf("payload size %d sectors must be a non-zero multiple of the sector size", P)
	case TailNeeded(P, H) > N:
		return nil, fmt.Errorf("disk of %d sectors is %d sectors short of header + payload + head space (%d)", N, TailNeeded(P, H)-N, TailNeeded(P, H))
	}
	chunk := min(eg.Chunk, H)
	if chunk == 0 {
		chunk = H
	}
	chunk = roundDown(chunk, a)
	if chunk == 0 {
		return nil, fmt.Errorf("chunk size is smaller than the sector size")
	}
	tail := N - H
	if tail%a != 0 {
		tail = roundDown(tail, a)
	}
	g := Geometry{
		DiskSize: N, Payload: P, Header: H, Tail: tail,
		Devices: []Device{
			{ID: DiskID, Phys: 0, Size: N},
			{ID: NewID, Phys: H, Size: N - H},
		},
	}
	disk := Backing{Dev: DiskID}
	tailB := Backing{Dev: DiskID, Delta: int64(tail)}
	newB := Backing{Dev: NewID}
	head := min(H, P)
	phases := []Phase{
		{Kind: PhaseSetup},
		{Kind: PhaseRestack},
		// The head leaves in one step, whatever the chunk size: until
		// the switch the disk keeps its PV label, so boot-time LVM and
		// a resume take the disk's head as current (docs/design.md
		// section 3). Only the step's mirror keeps it current while
		// the head is copied: a chunk routed to the tail alone would
		// leave the disk's copy stale.
		{Kind: PhaseMove, Start: 0, End: head, From: disk, To: tailB, Chunk: head},
		{Kind: PhaseToLUKS},
	}
	if P > H {
		phases = append(phases, Phase{Kind: PhaseMove, Start: H, End: P, From: disk, To: newB, Chunk: chunk})
	}
	phases = append(phases,
		Phase{Kind: PhaseMove, Start: 0, End: head, From: tailB, To: newB, Chunk: chunk},
		Phase{Kind: PhaseFinalize},
	)
	p := &Plan{
		Version:  PlanVersion,
		Op:       "encrypt",
		Geometry: g,
		Phases:   phases,
		Initial:  Layout{{Start: 0, End: P, On: disk}},
	}
	if err := p.setDirections(); err != nil {
		return nil, err
	}
	if err := p.Verify(); err != nil {
		return nil, fmt.Errorf("internal error: encrypt plan fails verification: %w", err)
	}
	return p, nil
}

func (p *Plan) setDirections() error {
	for i := range p.Phases {
		ph := &p.Phases[i]
		if ph.Kind != PhaseMove || ph.InPlace {
			continue
		}
		b, err := p.Geometry.backward(ph.From, ph.To)
		if err != nil {
			return err
		}
		ph.Backward = b
	}
	return nil
}

// Switched reports whether the identity switch to a header has happened
// before state st (the phase under way is after a to-luks phase).
func (p *Plan) Switched(st State) bool {
	i := p.PhaseIndex(PhaseToLUKS)
	return i >= 0 && st.Phase > i
}

// BuildAbort returns the plan that walks a run at state st back to the
// original layout, online. st must be a reconciled state: every phase
// before st.Phase is complete and a non-move phase at st.Phase has not
// started. The abort plan starts from F's layout at st.
func (p *Plan) BuildAbort(st State) (*Plan, error) {
	if f := p.PhaseIndex(PhaseFinalize); p.FinalHeaderOnDisk && f >= 0 && st.Phase >= f {
		// The final step writes a header over sectors the run never
		// owned before: what was there is not kept.
		return nil, ErrTooLateToAbort
	}
	switch p.Op {
	case "encrypt":
	case "decrypt", "rekey":
		return p.buildDecryptAbort(st)
	default:
		return nil, fmt.Errorf("abort of %s is not supported", p.Op)
	}
	g := p.Geometry
	disk := Backing{Dev: DiskID}
	ab := &Plan{
		Version:  PlanVersion,
		Op:       "abort-" + p.Op,
		Geometry: g,
		Initial:  p.Layout(st),
	}
	if !p.Switched(st) {
		// The disk still carries its LVM label and D is authoritative
		// for every sector (the head mirror, if any, wrote both legs):
		// map F straight onto the disk and take it out of the stack.
		ab.Initial = Layout{{Start: 0, End: g.Payload, On: disk}}
		ab.Phases = []Phase{{Kind: PhaseUnstack}}
		return ab, ab.Verify()
	}
	ab.HeaderAtStart = true
	headOut := p.PhaseIndex(PhaseMove) // the first move is the head going out
	var phases []Phase
	for j := min(st.Phase, len(p.Phases)-1); j > headOut; j-- {
		ph := p.Phases[j]
		if ph.Kind != PhaseMove {
			continue
		}
		s, e := ph.Start, ph.End
		if j == st.Phase {
			s, e = ph.Moved(st.Boundary)
		}
		if s >= e {
			continue
		}
		phases = append(phases, Phase{Kind: PhaseMove, Start: s, End: e, From: ph.To, To: ph.From, Chunk: ph.Chunk})
	}
	// The head is back on the tail; it returns to the start of the disk,
	// its first 4 KiB last, over the header.
	hd := p.Phases[headOut]
	if hd.End > labelSectors {
		phases = append(phases, Phase{Kind: PhaseMove, Start: labelSectors, End: hd.End, From: hd.To, To: hd.From, Chunk: hd.Chunk, DestroysHeader: true})
	}
	phases = append(phases,
		Phase{Kind: PhaseToLabel, Start: 0, End: min(labelSectors, hd.End), From: hd.To, To: hd.From},
		Phase{Kind: PhaseUnstack})
	ab.Phases = phases
	if err := ab.setDirections(); err != nil {
		return nil, err
	}
	if err := ab.Verify(); err != nil {
		return nil, fmt.Errorf("internal error: abort plan fails verification: %w", err)
	}
	return ab, nil
}

// DecryptGeometry is what the decrypt builder needs to know.
type DecryptGeometry struct {
	DiskSize Sectors // N
	Payload  Sectors // P, rounded up to the crypt sector size
	Header   Sectors // H: the LUKS data offset
	Chunk    Sectors
	Align    Sectors
	// HeaderGap: use the header area as the only working space (the
	// payload may fill the mapping); chosen when there is no room after
	// the payload. KeepMapping: F stays, as a linear map of the plain
	// disk, instead of being removed (a file system on the mapping).
	HeaderGap   bool
	KeepMapping bool
}

// headSpanMax bounds the head a header-gap decrypt holds back: 1 MiB covers
// the superblocks blkid looks for near the start of a device (ext2-4, xfs
// and swap in the first 4 KiB, iso9660 at 32 KiB, btrfs at 64 KiB, ...).
const headSpanMax Sectors = 2048

// BuildDecrypt returns the plan that turns a LUKS disk whose mapping F
// carries the payload back into plaintext on the disk, online: the exact
// reverse of BuildEncrypt (docs/design.md, "Decrypt"). The header stays
// valid, marked in progress, until the head's way back destroys it; the
// first 4 KiB (the LVM label) come back last.
func BuildDecrypt(dg DecryptGeometry) (*Plan, error) {
	N, P, H := dg.DiskSize, dg.Payload, dg.Header
	a := dg.Align
	if a == 0 {
		a = 1
	}
	if err := checkDataOffset(H, a); err != nil {
		return nil, err
	}
	if dg.HeaderGap || dg.KeepMapping {
		return buildDecryptHeaderGap(dg, a)
	}
	switch {
	case P == 0 || P%a != 0:
		return nil, fmt.Errorf("payload size %d sectors must be a non-zero multiple of the sector size", P)
	case TailNeeded(P, H) > N:
		return nil, fmt.Errorf("disk of %d sectors is %d sectors short of header + payload + head space (%d)", N, TailNeeded(P, H)-N, TailNeeded(P, H))
	}
	chunk := roundDown(min(dg.Chunk, H), a)
	if dg.Chunk == 0 {
		chunk = H
	}
	if chunk == 0 {
		return nil, fmt.Errorf("chunk size is smaller than the sector size")
	}
	tail := roundDown(N-H, a)
	g := Geometry{
		DiskSize: N, Payload: P, Header: H, Tail: tail,
		Devices: []Device{
			{ID: DiskID, Phys: 0, Size: N},
			{ID: OldID, Phys: H, Size: N - H},
		},
	}
	disk := Backing{Dev: DiskID}
	tailB := Backing{Dev: DiskID, Delta: int64(tail)}
	old := Backing{Dev: OldID}
	head := min(H, P)
	phases := []Phase{
		{Kind: PhaseSetup},
		{Kind: PhaseMark},
		{Kind: PhaseMove, Start: 0, End: head, From: old, To: tailB, Chunk: chunk},
	}
	if P > H {
		phases = append(phases, Phase{Kind: PhaseMove, Start: H, End: P, From: old, To: disk, Chunk: chunk})
	}
	if head > labelSectors {
		phases = append(phases, Phase{Kind: PhaseMove, Start: labelSectors, End: head, From: tailB, To: disk, Chunk: chunk, DestroysHeader: true})
	}
	phases = append(phases,
		Phase{Kind: PhaseToLabel, Start: 0, End: min(labelSectors, head), From: tailB, To: disk},
		Phase{Kind: PhaseUnstack},
	)
	p := &Plan{
		Version: PlanVersion, Op: "decrypt", Geometry: g, Phases: phases,
		Initial:       Layout{{Start: 0, End: P, On: old}},
		HeaderAtStart: true,
	}
	if err := p.setDirections(); err != nil {
		return nil, err
	}
	if err := p.Verify(); err != nil {
		return nil, fmt.Errorf("internal error: decrypt plan fails verification: %w", err)
	}
	return p, nil
}

// buildDecryptHeaderGap is the decrypt plan that needs no room after the
// payload (docs/design.md, "Decrypt without room"): the head F[0,K) first
// goes, still encrypted with the source's key, over the start of the
// header (which the journal keeps); the body F[K,P) then moves H sectors
// toward the start through the rest of the header area; the head waits
// in plaintext after the body and comes back in one suspended step, its
// first 4 KiB last.
// While the run lasts the disk's first sectors are ciphertext: no tool
// finds a file system, a PV or a LUKS header there.
func buildDecryptHeaderGap(dg DecryptGeometry, a Sectors) (*Plan, error) {
	N, P, H := dg.DiskSize, dg.Payload, dg.Header
	K := roundDown(min(H, headSpanMax), max(a, labelSectors))
	switch {
	case P == 0 || P%a != 0:
		return nil, fmt.Errorf("payload size %d sectors must be a non-zero multiple of the sector size", P)
	case P+H > N:
		return nil, fmt.Errorf("payload of %d sectors does not fit a disk of %d sectors after a %d-sector header", P, N, H)
	case P <= K:
		return nil, fmt.Errorf("payload of %d sectors is too small for a header-gap decrypt (it must exceed %d sectors)", P, K)
	}
	chunk := roundDown(min(dg.Chunk, H), a)
	if dg.Chunk == 0 {
		chunk = H
	}
	if chunk == 0 {
		return nil, fmt.Errorf("chunk size is smaller than the sector size")
	}
	g := Geometry{
		DiskSize: N, Payload: P, Header: H, Tail: P,
		Devices: []Device{
			{ID: DiskID, Phys: 0, Size: N},
			{ID: OldID, Phys: H, Size: N - H},
			{ID: HeadID, Phys: 0, Size: K},
		},
	}
	disk := Backing{Dev: DiskID}
	tail := Backing{Dev: DiskID, Delta: int64(P)}
	old := Backing{Dev: OldID}
	head := Backing{Dev: HeadID}
	hc := min(chunk, K)
	last := Phase{Kind: PhaseUnstack}
	if dg.KeepMapping {
		last = Phase{Kind: PhaseFinalize}
	}
	p := &Plan{
		Version: PlanVersion, Op: "decrypt", Geometry: g,
		Phases: []Phase{
			{Kind: PhaseSetup},
			{Kind: PhaseMark},
			{Kind: PhaseMove, Start: 0, End: K, From: old, To: head, Chunk: hc, DestroysHeader: true},
			{Kind: PhaseMove, Start: K, End: P, From: old, To: disk, Chunk: chunk},
			{Kind: PhaseMove, Start: 0, End: K, From: head, To: tail, Chunk: hc},
			// The whole head in one suspended step, its first block last
			// (doToLabel): a file system whose superblock lies past 4 KiB
			// (btrfs) would show on a half-written head.
			{Kind: PhaseToLabel, Start: 0, End: K, From: tail, To: disk},
			last,
		},
		Initial:       Layout{{Start: 0, End: P, On: old}},
		HeaderAtStart: true,
		HeaderRestore: true,
	}
	if err := p.setDirections(); err != nil {
		return nil, err
	}
	if err := p.Verify(); err != nil {
		return nil, fmt.Errorf("internal error: header-gap decrypt plan fails verification: %w", err)
	}
	return p, nil
}

// ErrTooLateToAbort: a decrypt past the point where the header is
// overwritten cannot be walked back; it can only be finished.
var ErrTooLateToAbort = errors.New("too late to abort: the LUKS header is already being overwritten; run dmconvert resume to finish")

// buildDecryptAbort walks a decrypt back to the LUKS layout: the moved
// parts of the body and of the head go back into the crypt mapping, then
// finalize makes F the crypt mapping again and clears the header's marks.
func (p *Plan) buildDecryptAbort(st State) (*Plan, error) {
	destroyed := false
	for i := 0; i <= min(st.Phase, len(p.Phases)-1); i++ {
		ph := p.Phases[i]
		// A phase that destroys the header may have begun to (its
		// chunk's mirror copies into the header area) even at its
		// initial boundary: from its first intent on, the header on
		// disk is not the one the journal holds.
		destroyed = destroyed || ph.DestroysHeader
		if ph.DestroysHeader && !p.HeaderRestore || ph.Kind == PhaseToLabel {
			return nil, ErrTooLateToAbort
		}
	}
	ab := &Plan{
		Version: PlanVersion, Op: "abort-" + p.Op, Geometry: p.Geometry,
		Initial: p.Layout(st), HeaderAtStart: p.HeaderAtStart && !destroyed,
		HeaderRestore: p.HeaderRestore,
	}
	var phases []Phase
	for j := min(st.Phase, len(p.Phases)-1); j >= 0; j-- {
		ph := p.Phases[j]
		if ph.Kind != PhaseMove || ph.DestroysHeader && !p.HeaderRestore {
			continue
		}
		s, e := ph.Start, ph.End
		if j == st.Phase {
			s, e = ph.Moved(st.Boundary)
		}
		if s >= e {
			continue
		}
		// An in-place rewrite walks back toward the start: the first
		// chunk, which hides the volume from the old key's view while
		// the run goes on (section 9), returns last.
		phases = append(phases, Phase{Kind: PhaseMove, Start: s, End: e, From: ph.To, To: ph.From, Chunk: ph.Chunk, InPlace: ph.InPlace, Backward: ph.InPlace})
	}
	ab.Phases = append(phases, Phase{Kind: PhaseFinalize})
	if err := ab.setDirections(); err != nil {
		return nil, err
	}
	if err := ab.Verify(); err != nil {
		return nil, fmt.Errorf("internal error: abort plan fails verification: %w", err)
	}
	return ab, nil
}

// RekeyGeometry is what the rekey builder needs to know.
type RekeyGeometry struct {
	DiskSize Sectors // N
	Header   Sectors // H: the data offset now
	Gap      Sectors // G: how far the data moves toward the start
	Chunk    Sectors
	Align    Sectors
}

// BuildRekey returns the plan that re-encrypts a LUKS2 data area with a
// new key, online: the whole data area F[0,N-H) moves G sectors toward
// the start of the disk (into the unused end of the keyslots area),
// chunk by chunk through mirrors whose two legs are distinct sectors (the
// old key's crypt mapping at H, the new key's at H-G). Then the header
// switches to the new key and offset.
func BuildRekey(rg RekeyGeometry) (*Plan, error) {
	N, H, G := rg.DiskSize, rg.Header, rg.Gap
	a := rg.Align
	if a == 0 {
		a = 1
	}
	if err := checkDataOffset(H, a); err != nil {
		return nil, err
	}
	switch {
	case G == 0 || G%labelSectors != 0 || G%a != 0 || G >= H:
		return nil, fmt.Errorf("gap of %d sectors must be a non-zero multiple of 4 KiB and of the sector size, below the data offset %d", G, H)
	case N <= H:
		return nil, fmt.Errorf("disk of %d sectors has no data area after a %d-sector header", N, H)
	}
	P := roundDown(N-H, a)
	chunk := roundDown(min(rg.Chunk, G), a)
	if rg.Chunk == 0 {
		chunk = G
	}
	if chunk == 0 {
		return nil, fmt.Errorf("chunk size is smaller than the sector size")
	}
	g := Geometry{
		DiskSize: N, Payload: P, Header: H, HeaderUsed: H - G,
		Devices: []Device{
			{ID: DiskID, Phys: 0, Size: N},
			{ID: OldID, Phys: H, Size: N - H},
			{ID: NewID, Phys: H - G, Size: N - H + G},
		},
	}
	p := &Plan{
		Version: PlanVersion, Op: "rekey", Geometry: g,
		Phases: []Phase{
			{Kind: PhaseSetup},
			{Kind: PhaseMark},
			{Kind: PhaseMove, Start: 0, End: P, From: Backing{Dev: OldID}, To: Backing{Dev: NewID}, Chunk: chunk},
			{Kind: PhaseFinalize},
		},
		Initial:       Layout{{Start: 0, End: P, On: Backing{Dev: OldID}}},
		HeaderAtStart: true,
	}
	if err := p.setDirections(); err != nil {
		return nil, err
	}
	if err := p.Verify(); err != nil {
		return nil, fmt.Errorf("internal error: rekey plan fails verification: %w", err)
	}
	return p, nil
}

// BuildRekeyInPlace returns the plan of a LUKS rekey without room to
// move the data (docs/design.md section 8, "In place"): the header is
// marked as for BuildRekey, then the data area F[0,N-H) is rewritten where
// it is, chunk by chunk, with F suspended and each chunk's old ciphertext
// saved in the journal first (section 9's in-place move), from the old
// key's crypt mapping at H to the new key's, also at H. The data offset
// does not change, and the keyslots area keeps its size.
func BuildRekeyInPlace(rg RekeyGeometry) (*Plan, error) {
	N, H := rg.DiskSize, rg.Header
	a := max(rg.Align, 1)
	if err := checkDataOffset(H, a); err != nil {
		return nil, err
	}
	if N <= H {
		return nil, fmt.Errorf("disk of %d sectors has no data area after a %d-sector header", N, H)
	}
	P := roundDown(N-H, a)
	chunk := roundDown(rg.Chunk, a)
	if chunk == 0 {
		return nil, fmt.Errorf("chunk size is smaller than the sector size")
	}
	g := Geometry{
		DiskSize: N, Payload: P, Header: H, HeaderUsed: H,
		Devices: []Device{
			{ID: DiskID, Phys: 0, Size: N},
			{ID: OldID, Phys: H, Size: N - H},
			{ID: NewID, Phys: H, Size: N - H},
		},
	}
	p := &Plan{
		Version: PlanVersion, Op: "rekey", Geometry: g,
		Phases: []Phase{
			{Kind: PhaseSetup},
			{Kind: PhaseMark},
			{Kind: PhaseMove, Start: 0, End: P, From: Backing{Dev: OldID}, To: Backing{Dev: NewID}, Chunk: chunk, InPlace: true},
			{Kind: PhaseFinalize},
		},
		Initial:       Layout{{Start: 0, End: P, On: Backing{Dev: OldID}}},
		HeaderAtStart: true,
	}
	if err := p.Verify(); err != nil {
		return nil, fmt.Errorf("internal error: in-place rekey plan fails verification: %w", err)
	}
	return p, nil
}

// checkDataOffset checks a LUKS data offset H against the alignment a
// (the crypt sector size in sectors).
func checkDataOffset(H, a Sectors) error {
	if H == 0 || H%labelSectors != 0 || H%a != 0 {
		return fmt.Errorf("data offset %d sectors must be a non-zero multiple of 4 KiB and of the sector size", H)
	}
	return nil
}
