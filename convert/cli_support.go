package convert

// What the command line needs beyond running plans: reading a run's
// journal for `dmconvert status`, reading the checkpoint a disk carries to
// find its journal, naming phases for humans, and recognising "another
// dmconvert is busy with this" among the engine's errors.

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/dmconvert/dmconvert/journal"
	"github.com/dmconvert/dmconvert/luks"
)

// ErrNoCheckpoint: the disk carries no dmconvert checkpoint (it is not a
// LUKS header of a run in progress).
var ErrNoCheckpoint = errors.New("no dmconvert checkpoint on the disk")

// DiskCheckpoint reads what the start of a disk says about a run: its
// identity (LVM label, LUKS header, disguised LUKS1 header) and, for a
// LUKS header of a run in progress, the checkpoint (LUKS2 token or LUKS1
// record), which names the run's journal. For a disk that is not a LUKS
// header, or a LUKS header without a checkpoint, the error wraps
// ErrNoCheckpoint. The LUKS2 token lives in the JSON area after the first
// 4 KiB, so r must give the whole header region.
func DiskCheckpoint(r io.ReaderAt) (Checkpoint, Identity, error) {
	first := make([]byte, labelSectors*512)
	if _, err := r.ReadAt(first, 0); err != nil {
		return Checkpoint{}, IdentityUnknown, fmt.Errorf("reading the first 4 KiB: %w", err)
	}
	id := Identify(first)
	if id != IdentityLUKS && id != IdentityDisguisedLUKS1 {
		return Checkpoint{}, id, fmt.Errorf("%v: %w", id, ErrNoCheckpoint)
	}
	h, err := luks.Read(r)
	if err != nil {
		return Checkpoint{}, id, fmt.Errorf("reading the LUKS header: %w", err)
	}
	p, err := h.LoadCheckpoint(r)
	if errors.Is(err, luks.ErrNoCheckpoint) {
		return Checkpoint{}, id, fmt.Errorf("LUKS%d header without one: %w", h.Version(), ErrNoCheckpoint)
	}
	if err != nil {
		return Checkpoint{}, id, err
	}
	cp, err := unmarshalCheckpoint(p)
	if err != nil {
		return Checkpoint{}, id, err
	}
	return cp, id, nil
}

// RunInfo is what a journal says about a run (dmconvert status).
type RunInfo struct {
	Journal string `json:"journal"`
	ID      string `json:"id"`
	Op      string `json:"op"`
	Device  string `json:"device"`
	Name    string `json:"name"`
	// Status is the journal's status (running, interrupted, failed,
	// aborting, done, aborted); Message the failure, if any.
	Status  string `json:"status"`
	Message string `json:"message,omitempty"`
	// Aborting: an abort began (the position is in the abort plan).
	Aborting bool `json:"aborting"`
	// Phase is the index of the phase under way in the current plan,
	// Phases their number, PhaseName what the phase does.
	Phase      int     `json:"phase"`
	Phases     int     `json:"phases"`
	PhaseName  string  `json:"phase_name"`
	Boundary   Sectors `json:"boundary"`
	DoneBytes  uint64  `json:"done_bytes"`
	TotalBytes uint64  `json:"total_bytes"`
	// Run facts.
	LUKSVersion int       `json:"luks_version"`
	LUKSUUID    string    `json:"luks_uuid"`
	VG          string    `json:"vg,omitempty"`
	PVUUID      string    `json:"pv_uuid,omitempty"`
	Created     time.Time `json:"created"`
	Updated     time.Time `json:"updated"`
	// Spec is the whole run description.
	Spec *Spec `json:"-"`
}

// Finished reports whether the run needs nothing more (done or aborted).
func (ri *RunInfo) Finished() bool {
	return ri.Status == journal.StatusDone || ri.Status == journal.StatusAborted
}

// Plan is the plan the run's position refers to (the abort plan once an
// abort began).
func (ri *RunInfo) Plan() *Plan {
	if ri.Spec == nil {
		return nil
	}
	if ri.Aborting {
		return ri.Spec.Abort
	}
	return ri.Spec.Forward
}

// InspectJournal reads a run from its journal without taking the write
// lock. If another process runs it, the error wraps journal.ErrLocked
// (after waiting at most timeout).
func InspectJournal(path string, timeout time.Duration) (*RunInfo, error) {
	j, err := journal.Open(path, journal.Options{ReadOnly: true, LockTimeout: timeout})
	if err != nil {
		return nil, err
	}
	defer j.Close()
	jr, err := j.Run()
	if err != nil {
		return nil, fmt.Errorf("journal %s: %w", path, err)
	}
	js, err := j.State()
	if err != nil {
		return nil, fmt.Errorf("journal %s: %w", path, err)
	}
	var spec Spec
	if err := json.Unmarshal(jr.Plan, &spec); err != nil {
		return nil, fmt.Errorf("journal %s: reading the plan: %w", path, err)
	}
	ri := &RunInfo{
		Journal: j.Path(), ID: jr.ID, Op: jr.Op, Device: spec.Disk.Path, Name: spec.Name,
		Status: js.Status, Message: js.Message, Aborting: spec.Abort != nil,
		Phase: js.Phase, Boundary: Sectors(js.Boundary),
		LUKSVersion: spec.LUKSVersion, LUKSUUID: spec.LUKSUUID, VG: spec.VG, PVUUID: spec.PVUUID,
		Created: jr.Created, Updated: js.Updated, Spec: &spec,
	}
	if ri.Device == "" {
		ri.Device = jr.Device
	}
	if p := ri.Plan(); p != nil {
		st := State{Phase: js.Phase, Boundary: Sectors(js.Boundary)}
		ri.Phases = len(p.Phases)
		ri.TotalBytes = p.BytesTotal()
		ri.DoneBytes = p.BytesDone(st)
		if st.Phase < len(p.Phases) {
			ri.PhaseName = DescribePhase(p.Phases[st.Phase])
		} else {
			ri.PhaseName = "complete"
		}
	}
	return ri, nil
}

// DescribePhase says in words what a phase does.
func DescribePhase(p Phase) string {
	switch p.Kind {
	case PhaseSetup:
		return "setting up the mappings"
	case PhaseRestack:
		return "moving the logical volumes onto the new mapping"
	case PhaseToLUKS:
		return "writing the LUKS header"
	case PhaseToLabel:
		return "writing back the disk's first 4 KiB (the LVM label or the file system's start)"
	case PhaseFinalize:
		return "finalizing"
	case PhaseUnstack:
		return "moving the logical volumes back onto the disk"
	case PhaseMark:
		return "marking the LUKS header as being converted (cryptsetup refuses to open it until the end)"
	case PhaseMove:
		return describeMove(p.From, p.To)
	}
	return string(p.Kind)
}

func describeMove(from, to Backing) string {
	switch {
	case from.Dev == DiskID && to.Dev == NewID && from.Delta == 0:
		return "encrypting"
	case from.Dev == DiskID && to.Dev == NewID:
		return "encrypting the start of the disk"
	case from.Dev == NewID && to.Dev == DiskID && to.Delta == 0:
		return "decrypting"
	case from.Dev == NewID && to.Dev == DiskID:
		return "decrypting the start of the disk"
	case from.Dev == DiskID && to.Dev == DiskID && to.Delta > from.Delta:
		return "copying the start of the disk to its end"
	case from.Dev == DiskID && to.Dev == DiskID:
		return "copying the start of the disk back in place"
	case from.Dev == OldID && to.Dev == DiskID && to.Delta == 0:
		return "decrypting"
	case from.Dev == OldID && to.Dev == DiskID:
		return "decrypting the start of the data to the end of the disk"
	case from.Dev == OldID && to.Dev == HeadID:
		return "holding the start of the data back over the header, still encrypted"
	case from.Dev == HeadID && to.Dev == DiskID:
		return "decrypting the held-back start to the end of the disk"
	case from.Dev == HeadID && to.Dev == OldID:
		return "moving the held-back start back to its place"
	case from.Dev == DiskID && to.Dev == OldID:
		return "encrypting back with the old key"
	case from.Dev == DiskID && to.Dev == HeadID:
		return "holding the start of the data back again"
	case from.Dev == OldID && to.Dev == NewID:
		return "re-encrypting with the new key"
	case from.Dev == NewID && to.Dev == OldID:
		return "re-encrypting back with the old key"
	}
	return fmt.Sprintf("moving data from %s to %s", from, to)
}

// DescribePhaseString names the phase of an Event (Event.Phase is the
// phase kind, or Phase.String() for a move); unknown text is returned as
// is.
func DescribePhaseString(s string) string {
	if !strings.HasPrefix(s, string(PhaseMove)+" ") && !strings.HasPrefix(s, "rewrite ") {
		return DescribePhase(Phase{Kind: PhaseKind(s)})
	}
	// "move [s,e) <from> -> <to> <dir> by <n>"
	f := strings.Fields(s)
	if len(f) < 5 || f[3] != "->" {
		return s
	}
	from, ok1 := parseBacking(f[2])
	to, ok2 := parseBacking(f[4])
	if !ok1 || !ok2 {
		return s
	}
	return describeMove(from, to)
}

// parseBacking reads Backing.String(): "<dev><+|-><delta>".
func parseBacking(s string) (Backing, bool) {
	i := strings.LastIndexAny(s, "+-")
	if i <= 0 {
		return Backing{}, false
	}
	var d int64
	if _, err := fmt.Sscanf(s[i:], "%d", &d); err != nil {
		return Backing{}, false
	}
	return Backing{Dev: BackingID(s[:i]), Delta: d}, true
}

// IsBusy reports whether err says that another dmconvert process holds
// the disk or the journal: journal.ErrLocked, or the engine's refusals for
// a held disk lock (Host.Lock) or journal.
func IsBusy(err error) bool {
	return errors.Is(err, journal.ErrLocked) || errors.Is(err, ErrBusy)
}

// PlainKeyFile is where a plain rekey plan writes its new key (or its
// detached LUKS2 header).
func PlainKeyFile(ep *EncryptPlan) string { return ep.newFile }

// PlainCrypttabLine is the /etc/crypttab line that opens a rekeyed plain
// volume with its new key file, as its mapping is now (off: the data's
// first sector on the disk).
func PlainCrypttabLine(s *Spec, off Sectors) string {
	opts := fmt.Sprintf("plain,cipher=%s,size=%d", s.Crypt.Cipher, s.Crypt.KeyBytes*8)
	if off > 0 {
		opts += fmt.Sprintf(",offset=%d", off)
	}
	if s.Crypt.IVOffset > 0 {
		opts += fmt.Sprintf(",skip=%d", s.Crypt.IVOffset)
	}
	if s.Crypt.SectorSize > 512 {
		opts += fmt.Sprintf(",sector-size=%d", s.Crypt.SectorSize)
	}
	return fmt.Sprintf("%s %s %s %s", s.Name, s.Disk.Path, s.NewKeyFile, opts)
}
