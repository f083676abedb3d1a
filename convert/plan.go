package convert

import (
	"encoding/json"
	"fmt"
	"sort"
)

// PlanVersion is recorded in every plan; a journal with another version is
// refused by resume.
const PlanVersion = 1

// Sectors counts 512-byte sectors.
type Sectors = uint64

// BackingID names a block device a plan maps F's sectors onto.
type BackingID string

// The backings every plan can use. DiskID is the disk being converted
// itself; NewID is the private crypt mapping of the target layout (C);
// OldID is the private crypt mapping of the source layout (rekey/decrypt).
const (
	DiskID BackingID = "disk"
	NewID  BackingID = "new"
	OldID  BackingID = "old"
	// HeadID is the private crypt mapping, with the source's key, of the
	// first sectors of the disk, where a header-gap decrypt keeps F's head
	// while the rest moves (docs/design.md, "Decrypt without room").
	HeadID BackingID = "head"
)

// Backing says where a range of F lives: F's sector x is sector x+Delta of
// device Dev.
type Backing struct {
	Dev   BackingID `json:"dev"`
	Delta int64     `json:"delta"`
}

func (b Backing) String() string { return fmt.Sprintf("%s%+d", b.Dev, b.Delta) }

// PhaseKind is the type of a phase.
type PhaseKind string

// Phase kinds; see docs/design.md section 1.
const (
	PhaseSetup    PhaseKind = "setup"    // create the helper devices and F
	PhaseRestack  PhaseKind = "restack"  // dm devices on the disk -> on F
	PhaseMove     PhaseKind = "move"     // relocate a range through mirrors
	PhaseToLUKS   PhaseKind = "to-luks"  // identity switch: LVM label -> header
	PhaseToLabel  PhaseKind = "to-label" // identity switch: header -> LVM label
	PhaseFinalize PhaseKind = "finalize" // final table, clear marks, refresh
	PhaseUnstack  PhaseKind = "unstack"  // dm devices on F -> on the disk, F removed
	PhaseMark     PhaseKind = "mark"     // mark the live header "conversion in progress"
)

// Phase is one step of a plan. Move phases relocate F[Start,End) from From
// to To, Chunk sectors at a time, walking backward (from End down) or
// forward (from Start up).
type Phase struct {
	Kind     PhaseKind `json:"kind"`
	Start    Sectors   `json:"start,omitempty"`
	End      Sectors   `json:"end,omitempty"`
	From     Backing   `json:"from,omitzero"`
	To       Backing   `json:"to,omitzero"`
	Backward bool      `json:"backward,omitempty"`
	Chunk    Sectors   `json:"chunk,omitempty"`
	// DestroysHeader marks the move that overwrites the on-disk header
	// (the head's way back in abort and decrypt). From its start on, the
	// journal is the only checkpoint.
	DestroysHeader bool `json:"destroys_header,omitempty"`
	// InPlace marks a move whose source and destination are the same
	// disk sectors under two keys (a rekey without free space): each
	// chunk is rewritten with F suspended, its old contents saved in the
	// journal first (docs/design.md section 9). The builder sets its
	// direction.
	InPlace bool `json:"in_place,omitempty"`
}

func (p Phase) String() string {
	if p.Kind != PhaseMove {
		return string(p.Kind)
	}
	dir := "forward"
	if p.Backward {
		dir = "backward"
	}
	verb := "move"
	if p.InPlace {
		verb = "rewrite"
	}
	return fmt.Sprintf("%s [%d,%d) %s -> %s %s by %d", verb, p.Start, p.End, p.From, p.To, dir, p.Chunk)
}

// Length is the number of sectors a move relocates.
func (p Phase) Length() Sectors { return p.End - p.Start }

// InitialBoundary is a move's boundary before its first chunk.
func (p Phase) InitialBoundary() Sectors {
	if p.Backward {
		return p.End
	}
	return p.Start
}

// FinalBoundary is a move's boundary once every chunk is done.
func (p Phase) FinalBoundary() Sectors {
	if p.Backward {
		return p.Start
	}
	return p.End
}

// NextChunk returns the chunk [s,e) after boundary b, and ok=false when
// the move is complete.
func (p Phase) NextChunk(b Sectors) (s, e Sectors, ok bool) {
	if p.Backward {
		if b <= p.Start {
			return 0, 0, false
		}
		s = p.Start
		if b-p.Start > p.Chunk {
			s = b - p.Chunk
		}
		return s, b, true
	}
	if b >= p.End {
		return 0, 0, false
	}
	e = p.End
	if p.End-b > p.Chunk {
		e = b + p.Chunk
	}
	return b, e, true
}

// Moved returns the sub-range of the move already on To at boundary b.
func (p Phase) Moved(b Sectors) (s, e Sectors) {
	if p.Backward {
		return b, p.End
	}
	return p.Start, b
}

// Device is a block device a plan maps sectors onto, with where its sector
// 0 sits on the disk (every backing of a plan lives on the one disk).
type Device struct {
	ID BackingID `json:"id"`
	// Phys is the disk sector that holds this device's sector 0.
	Phys Sectors `json:"phys"`
	// Size of the device in sectors.
	Size Sectors `json:"size"`
}

// Geometry is the fixed shape of a run.
type Geometry struct {
	DiskSize Sectors `json:"disk_size"` // N
	Payload  Sectors `json:"payload"`   // P: sectors of F that hold data
	Header   Sectors `json:"header"`    // H
	Tail     Sectors `json:"tail"`      // disk sector where the head waits
	// HeaderUsed, when set, is how much of [0,Header) a live header
	// occupies (rekey borrows the unused end of the keyslots area).
	HeaderUsed Sectors `json:"header_used,omitempty"`
	// HeaderLive lists the phase indexes during which D[0,Header) holds a
	// header that must not be overwritten (computed by the builders).
	Devices []Device `json:"devices"`
}

func (g Geometry) device(id BackingID) (Device, bool) {
	for _, d := range g.Devices {
		if d.ID == id {
			return d, true
		}
	}
	return Device{}, false
}

// Phys maps a backing range onto disk sectors.
func (g Geometry) Phys(b Backing, s, e Sectors) (ps, pe Sectors, err error) {
	d, ok := g.device(b.Dev)
	if !ok {
		return 0, 0, fmt.Errorf("plan uses unknown device %q", b.Dev)
	}
	ds := int64(s) + b.Delta
	de := int64(e) + b.Delta
	if ds < 0 || de > int64(d.Size) {
		return 0, 0, fmt.Errorf("range [%d,%d) on %s is outside the device (size %d)", ds, de, b.Dev, d.Size)
	}
	return d.Phys + Sectors(ds), d.Phys + Sectors(de), nil
}

// Extent is a piece of F's layout.
type Extent struct {
	Start Sectors `json:"start"`
	End   Sectors `json:"end"`
	On    Backing `json:"on"`
}

// Layout is F's mapping at some state: sorted, contiguous extents covering
// [0, Payload).
type Layout []Extent

// check verifies l covers [0,size) contiguously.
func (l Layout) check(size Sectors) error {
	var at Sectors
	for _, x := range l {
		if x.Start != at || x.End <= x.Start {
			return fmt.Errorf("extent [%d,%d) does not continue at %d", x.Start, x.End, at)
		}
		at = x.End
	}
	if at != size {
		return fmt.Errorf("layout covers [0,%d), want [0,%d)", at, size)
	}
	return nil
}

// Lookup returns the extent containing sector x.
func (l Layout) Lookup(x Sectors) (Extent, bool) {
	i := sort.Search(len(l), func(i int) bool { return l[i].End > x })
	if i < len(l) && l[i].Start <= x {
		return l[i], true
	}
	return Extent{}, false
}

// without returns l less F[s,e).
func (l Layout) without(s, e Sectors) Layout {
	var out Layout
	for _, x := range l {
		if x.Start < s {
			out = append(out, Extent{x.Start, min(x.End, s), x.On})
		}
		if x.End > e {
			out = append(out, Extent{max(x.Start, e), x.End, x.On})
		}
	}
	return out
}

// assign maps [s,e) onto b, splitting extents as needed, and merges
// neighbours that continue each other.
func (l Layout) assign(s, e Sectors, b Backing) Layout {
	var out Layout
	for _, x := range l {
		if x.End <= s || x.Start >= e {
			out = append(out, x)
			continue
		}
		if x.Start < s {
			out = append(out, Extent{x.Start, s, x.On})
		}
		if x.End > e {
			out = append(out, Extent{e, x.End, x.On})
		}
	}
	out = append(out, Extent{s, e, b})
	sort.Slice(out, func(i, j int) bool { return out[i].Start < out[j].Start })
	var merged Layout
	for _, x := range out {
		if n := len(merged); n > 0 && merged[n-1].End == x.Start && merged[n-1].On == x.On {
			merged[n-1].End = x.End
			continue
		}
		merged = append(merged, x)
	}
	return merged
}

// State is a position in a plan: the phase under way and, for a move,
// its boundary. Phase == len(Phases) means the plan is complete.
type State struct {
	Phase    int     `json:"phase"`
	Boundary Sectors `json:"boundary"`
}

// Plan is a complete, verified description of a conversion. It is a value:
// printed by --dry-run, stored in the journal, and executed by the engine.
type Plan struct {
	Version  int      `json:"version"`
	Op       string   `json:"op"`
	Geometry Geometry `json:"geometry"`
	Phases   []Phase  `json:"phases"`
	// Initial is the layout of F before the first phase.
	Initial Layout `json:"initial"`
	// HeaderAtStart: the disk starts with a live header (rekey, decrypt,
	// and abort plans).
	HeaderAtStart bool `json:"header_at_start,omitempty"`
	// HeaderRestore: the plan overwrites the header area early (a
	// header-gap decrypt); an abort writes the whole header back from the
	// journal's image once the data is back on the source.
	HeaderRestore bool `json:"header_restore,omitempty"`
	// FinalHeaderOnDisk: finalize writes a new header on the disk outside
	// the data (a plain volume turned into LUKS2 with its header on the
	// disk); from finalize on, an abort is too late.
	FinalHeaderOnDisk bool `json:"final_header_on_disk,omitempty"`
}

// Layout computes F's layout at state st (chunks of the current move up to
// the boundary are on the move's destination).
func (p *Plan) Layout(st State) Layout {
	l := append(Layout(nil), p.Initial...)
	for i, ph := range p.Phases {
		if i > st.Phase || (ph.Kind != PhaseMove && ph.Kind != PhaseToLabel) {
			continue
		}
		if i < st.Phase {
			l = l.assign(ph.Start, ph.End, ph.To)
			continue
		}
		if ph.Kind != PhaseMove {
			continue
		}
		if s, e := ph.Moved(st.Boundary); s < e {
			l = l.assign(s, e, ph.To)
		}
	}
	return l
}

// Start is the state before the first phase.
func (p *Plan) Start() State { return p.enter(0) }

// crossesMark reports whether going from st to later passes a mark
// phase. A mark's writes are several (the staged keyslot, the record,
// for LUKS1 then the disguised first block): the record on the disk says
// only that its write finished, not the ones after it, so a mark whose
// commit is missing is redone (it writes the same bytes) rather than
// taken as done from the record.
func (p *Plan) crossesMark(st, later State) bool {
	for i := st.Phase; i < later.Phase && i < len(p.Phases); i++ {
		if p.Phases[i].Kind == PhaseMark {
			return true
		}
	}
	return false
}

// enter returns the state at the beginning of phase i.
func (p *Plan) enter(i int) State {
	if i < len(p.Phases) && p.Phases[i].Kind == PhaseMove {
		return State{Phase: i, Boundary: p.Phases[i].InitialBoundary()}
	}
	return State{Phase: i}
}

// Done reports whether st is past the last phase.
func (p *Plan) Done(st State) bool { return st.Phase >= len(p.Phases) }

// Advance returns the state after the current step of st: the next chunk
// of a move, or the next phase.
func (p *Plan) Advance(st State) State {
	ph := p.Phases[st.Phase]
	if ph.Kind == PhaseMove {
		s, e, ok := ph.NextChunk(st.Boundary)
		if ok {
			nb := s
			if !ph.Backward {
				nb = e
			}
			if nb != ph.FinalBoundary() {
				return State{Phase: st.Phase, Boundary: nb}
			}
		}
	}
	return p.enter(st.Phase + 1)
}

// PhaseIndex returns the index of the first phase of kind k, or -1.
func (p *Plan) PhaseIndex(k PhaseKind) int {
	for i, ph := range p.Phases {
		if ph.Kind == k {
			return i
		}
	}
	return -1
}

// BytesTotal is the number of bytes the plan's moves copy.
func (p *Plan) BytesTotal() uint64 {
	var n uint64
	for _, ph := range p.Phases {
		if ph.Kind == PhaseMove {
			n += ph.Length() * 512
		}
	}
	return n
}

// BytesDone is the number of bytes copied (and committed) before st.
func (p *Plan) BytesDone(st State) uint64 {
	var n uint64
	for i, ph := range p.Phases {
		if ph.Kind != PhaseMove || i > st.Phase {
			continue
		}
		if i < st.Phase {
			n += ph.Length() * 512
			continue
		}
		s, e := ph.Moved(st.Boundary)
		n += (e - s) * 512
	}
	return n
}

// Marshal encodes the plan for the journal.
func (p *Plan) Marshal() (json.RawMessage, error) { return json.Marshal(p) }

// headerLiveAt reports whether D[0,Header) holds a header that must not be
// overwritten while phase i runs: from the first to-luks phase (exclusive
// of it: the switch writes the header) until a move that destroys it.
func (p *Plan) headerLiveAt(i int) bool {
	live := p.HeaderAtStart
	for j := 0; j < i && j < len(p.Phases); j++ {
		switch {
		case p.Phases[j].Kind == PhaseToLUKS:
			live = true
		case p.Phases[j].DestroysHeader:
			live = false
		}
	}
	if i < len(p.Phases) && p.Phases[i].DestroysHeader {
		live = false
	}
	return live
}

// Verify simulates every chunk of the plan and checks the safety rules of
// the moving gap:
//   - a chunk's destination never overlaps data still live anywhere else
//     in F (in particular the sources of chunks not yet moved) nor its own
//     source;
//   - no destination overlaps a live header;
//   - every backing range is inside its device;
//   - chunks are non-empty and at most the plan's chunk size, and a move
//     covers its range exactly.
func (p *Plan) Verify() error {
	g := p.Geometry
	if g.Payload == 0 {
		return fmt.Errorf("plan moves an empty payload")
	}
	if p.Version != PlanVersion {
		return fmt.Errorf("plan version %d is not supported (want %d)", p.Version, PlanVersion)
	}
	if err := p.Initial.check(g.Payload); err != nil {
		return fmt.Errorf("initial layout: %w", err)
	}
	st := p.Start()
	for steps := 0; !p.Done(st); steps++ {
		if steps > 1<<24 {
			return fmt.Errorf("plan does not terminate")
		}
		ph := p.Phases[st.Phase]
		if ph.Kind != PhaseMove {
			st = p.Advance(st)
			continue
		}
		if ph.Chunk == 0 || ph.Start >= ph.End || ph.End > g.Payload {
			return fmt.Errorf("phase %d (%s) is malformed", st.Phase, ph)
		}
		s, e, ok := ph.NextChunk(st.Boundary)
		if !ok || e-s == 0 || e-s > ph.Chunk {
			return fmt.Errorf("phase %d (%s): bad chunk at boundary %d", st.Phase, ph, st.Boundary)
		}
		layout := p.Layout(st)
		// The chunk must currently be on the move's source.
		for x := s; x < e; {
			ext, found := layout.Lookup(x)
			if !found || ext.On != ph.From {
				return fmt.Errorf("phase %d (%s): sector %d is on %v, not on the source", st.Phase, ph, x, ext.On)
			}
			x = min(ext.End, e)
		}
		ds, de, err := g.Phys(ph.To, s, e)
		if err != nil {
			return fmt.Errorf("phase %d (%s) chunk [%d,%d) destination: %w", st.Phase, ph, s, e, err)
		}
		if de > g.DiskSize {
			return fmt.Errorf("phase %d chunk [%d,%d): destination ends at %d, past the disk end %d", st.Phase, s, e, de, g.DiskSize)
		}
		live := layout
		if ph.InPlace {
			// The chunk is rewritten where it is: its destination is
			// exactly its source, and nothing else.
			ss, se, err := g.Phys(ph.From, s, e)
			if err != nil {
				return fmt.Errorf("phase %d (%s) chunk [%d,%d) source: %w", st.Phase, ph, s, e, err)
			}
			if ss != ds || se != de {
				return fmt.Errorf("phase %d (%s) chunk [%d,%d): an in-place rewrite from disk sectors [%d,%d) to [%d,%d)", st.Phase, ph, s, e, ss, se, ds, de)
			}
			live = layout.without(s, e)
		}
		// Every other live sector of F, and the chunk's own source.
		for _, ext := range live {
			ps, pe, err := g.Phys(ext.On, ext.Start, ext.End)
			if err != nil {
				return fmt.Errorf("phase %d: layout extent [%d,%d): %w", st.Phase, ext.Start, ext.End, err)
			}
			if overlaps(ds, de, ps, pe) {
				return fmt.Errorf("phase %d (%s) chunk [%d,%d): destination disk sectors [%d,%d) overlap live data of F[%d,%d) at [%d,%d)",
					st.Phase, ph, s, e, ds, de, ext.Start, ext.End, ps, pe)
			}
		}
		hdrEnd := g.Header
		if g.HeaderUsed > 0 {
			hdrEnd = g.HeaderUsed
		}
		if p.headerLiveAt(st.Phase) && overlaps(ds, de, 0, hdrEnd) {
			return fmt.Errorf("phase %d (%s) chunk [%d,%d): destination [%d,%d) overlaps the live header", st.Phase, ph, s, e, ds, de)
		}
		st = p.Advance(st)
	}
	return nil
}

func overlaps(a, b, c, d Sectors) bool { return a < d && c < b }
