package journal

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"time"

	bolt "go.etcd.io/bbolt"
	bolterrors "go.etcd.io/bbolt/errors"
)

// Errors callers test with errors.Is.
var (
	// ErrLocked: another process holds the journal open.
	ErrLocked = errors.New("journal is in use by another dmconvert process")
	// ErrNoRun: the journal holds no run (never initialised).
	ErrNoRun = errors.New("journal holds no conversion run")
	// ErrRunExists: Init was called on a journal that already holds a run.
	ErrRunExists = errors.New("journal already holds a conversion run")
	// ErrNotFound: no such journal file.
	ErrNotFound = errors.New("journal file does not exist")
)

var (
	bucketMeta  = []byte("meta")
	bucketSteps = []byte("steps")
	// The header image lives in a bucket of its own: bbolt rewrites a
	// whole leaf on every change, and the state changes at every step.
	bucketHeader = []byte("header")
	// The saved contents of a range about to be rewritten in place (at
	// most one at a time), in a bucket of its own for the same reason.
	bucketZone = []byte("zone")
	keyZone    = []byte("zone")
	keyRun     = []byte("run")
	keyState   = []byte("state")
	keyHeader  = []byte("header")
	keyVersion = []byte("version")
)

// formatVersion is bumped when the on-disk layout changes incompatibly.
const formatVersion = 1

// Options for Open.
type Options struct {
	// Create the file (and its directory) when it does not exist.
	Create bool
	// LockTimeout bounds the wait for another process's lock. Zero means
	// one second.
	LockTimeout time.Duration
	// ReadOnly opens without taking the write lock (status from another
	// process while a run is going). bbolt then takes a shared lock, which
	// still waits for a writer; LockTimeout applies.
	ReadOnly bool
}

// Journal is an open journal file.
type Journal struct {
	db   *bolt.DB
	path string
}

// Run is the immutable description of a conversion, written once by Init.
// Plan and Identity are opaque JSON owned by the engine.
type Run struct {
	ID       string          `json:"id"`
	Op       string          `json:"op"`
	Device   string          `json:"device"`
	Identity json.RawMessage `json:"identity"`
	Plan     json.RawMessage `json:"plan"`
	Created  time.Time       `json:"created"`
}

// State is the mutable position of a run. Phase and Boundary are the
// engine's; Status is one of the Status* constants.
type State struct {
	Status    string    `json:"status"`
	Phase     int       `json:"phase"`
	Boundary  uint64    `json:"boundary"`
	DoneBytes uint64    `json:"done_bytes"`
	Message   string    `json:"message,omitempty"`
	Updated   time.Time `json:"updated"`
	// Seq is the sequence number of the last step that changed the state.
	Seq uint64 `json:"seq"`
}

// Run statuses.
const (
	StatusPlanned     = "planned"
	StatusRunning     = "running"
	StatusInterrupted = "interrupted"
	StatusAborting    = "aborting"
	StatusAborted     = "aborted"
	StatusDone        = "done"
	StatusFailed      = "failed"
)

// Step is the record of one step: its intent is written before the step
// acts, its result after.
type Step struct {
	Seq      uint64          `json:"seq"`
	Kind     string          `json:"kind"`
	Phase    int             `json:"phase"`
	Start    uint64          `json:"start"`
	End      uint64          `json:"end"`
	Detail   json.RawMessage `json:"detail,omitempty"`
	Intended time.Time       `json:"intended"`
	Finished time.Time       `json:"finished,omitempty"`
	Result   string          `json:"result,omitempty"` // "", "done" or an error text
}

// Open opens (or with Options.Create, creates) the journal at path.
func Open(path string, opts Options) (*Journal, error) {
	if opts.LockTimeout == 0 {
		opts.LockTimeout = time.Second
	}
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, fmt.Errorf("journal %s: %w", path, err)
	}
	created := false
	if _, err := os.Stat(abs); err != nil {
		if !errors.Is(err, os.ErrNotExist) {
			return nil, fmt.Errorf("journal %s: %w", abs, err)
		}
		if !opts.Create || opts.ReadOnly {
			return nil, fmt.Errorf("journal %s: %w", abs, ErrNotFound)
		}
		if err := os.MkdirAll(filepath.Dir(abs), 0o700); err != nil {
			return nil, fmt.Errorf("creating journal directory for %s: %w", abs, err)
		}
		created = true
	}
	db, err := bolt.Open(abs, 0o600, &bolt.Options{
		Timeout:  opts.LockTimeout,
		ReadOnly: opts.ReadOnly,
		// Durability is the point of this file: never NoSync, and keep
		// the freelist synced so a reopen after a crash is cheap and exact.
		NoSync:         false,
		NoFreelistSync: false,
	})
	if err != nil {
		if errors.Is(err, bolterrors.ErrTimeout) {
			return nil, fmt.Errorf("journal %s: %w", abs, ErrLocked)
		}
		return nil, fmt.Errorf("opening journal %s: %w", abs, err)
	}
	j := &Journal{db: db, path: abs}
	if created {
		// The new directory entry must survive a power cut too.
		if err := syncDir(filepath.Dir(abs)); err != nil {
			db.Close()
			return nil, fmt.Errorf("journal %s: %w", abs, err)
		}
	}
	if !opts.ReadOnly && !created {
		// An existing journal: its format is checked now. A new one gets
		// its buckets in its first transaction (update), not in one of
		// their own: each commit is two syncs of the disk.
		if err := db.Update(func(tx *bolt.Tx) error {
			_, err := ensureBuckets(tx)
			return err
		}); err != nil {
			db.Close()
			return nil, fmt.Errorf("journal %s: %w", abs, err)
		}
	}
	return j, nil
}

// ensureBuckets creates what a journal holds, if missing, and checks the
// format version of what is there.
func ensureBuckets(tx *bolt.Tx) (*bolt.Bucket, error) {
	m, err := tx.CreateBucketIfNotExists(bucketMeta)
	if err != nil {
		return nil, err
	}
	for _, b := range [][]byte{bucketSteps, bucketHeader, bucketZone} {
		if _, err := tx.CreateBucketIfNotExists(b); err != nil {
			return nil, err
		}
	}
	if v := m.Get(keyVersion); v != nil {
		if got := binary.BigEndian.Uint32(v); got != formatVersion {
			return nil, fmt.Errorf("journal format %d is not supported (want %d)", got, formatVersion)
		}
		return m, nil
	}
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], formatVersion)
	return m, m.Put(keyVersion, b[:])
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// Path is the absolute path of the journal file.
func (j *Journal) Path() string { return j.path }

// Close releases the file and its lock.
func (j *Journal) Close() error { return j.db.Close() }

// Init records the run, its header image and an initial state, in one
// durable transaction. header may be nil (operations without a LUKS
// header). It fails with ErrRunExists if the journal already holds a run.
func (j *Journal) Init(run Run, header []byte, st State) error {
	if run.Created.IsZero() {
		run.Created = time.Now().UTC()
	}
	st.Updated = time.Now().UTC()
	return j.update("recording the run", func(m, _ *bolt.Bucket) error {
		if m.Get(keyRun) != nil {
			return ErrRunExists
		}
		if err := putJSON(m, keyRun, run); err != nil {
			return err
		}
		if header != nil {
			if err := m.Tx().Bucket(bucketHeader).Put(keyHeader, encodeHeader(header)); err != nil {
				return err
			}
		}
		return putJSON(m, keyState, st)
	})
}

// Run returns the run recorded by Init.
func (j *Journal) Run() (Run, error) {
	var r Run
	err := j.view(func(m, _ *bolt.Bucket) error { return getJSON(m, keyRun, &r) })
	return r, err
}

// SetPlan replaces the run's plan and its state in one durable
// transaction (abort switches a run to its abort plan this way).
func (j *Journal) SetPlan(plan json.RawMessage, st State) error {
	st.Updated = time.Now().UTC()
	return j.update("recording the new plan", func(m, _ *bolt.Bucket) error {
		var r Run
		if err := getJSON(m, keyRun, &r); err != nil {
			return err
		}
		r.Plan = plan
		if err := putJSON(m, keyRun, r); err != nil {
			return err
		}
		return putJSON(m, keyState, st)
	})
}

// Header returns the header image recorded by Init or SetHeader (nil if
// none).
func (j *Journal) Header() ([]byte, error) {
	var h []byte
	err := j.view(func(m, _ *bolt.Bucket) error {
		hb := m.Tx().Bucket(bucketHeader)
		if hb == nil {
			return nil
		}
		v := hb.Get(keyHeader)
		if v == nil {
			return nil
		}
		var err error
		h, err = decodeHeader(v)
		return err
	})
	return h, err
}

// SetHeader replaces the stored header image (e.g. rekey's new header).
func (j *Journal) SetHeader(header []byte) error {
	return j.update("recording the header image", func(m, _ *bolt.Bucket) error {
		return m.Tx().Bucket(bucketHeader).Put(keyHeader, encodeHeader(header))
	})
}

// State returns the current state.
func (j *Journal) State() (State, error) {
	var s State
	err := j.view(func(m, _ *bolt.Bucket) error { return getJSON(m, keyState, &s) })
	return s, err
}

// SetState replaces the state durably.
func (j *Journal) SetState(st State) error {
	st.Updated = time.Now().UTC()
	return j.update("recording the state", func(m, _ *bolt.Bucket) error {
		return putJSON(m, keyState, st)
	})
}

// Intend durably records a step before it acts and returns its sequence
// number.
func (j *Journal) Intend(s Step) (uint64, error) {
	err := j.update("recording step intent", func(m, steps *bolt.Bucket) error {
		return intend(m, steps, &s)
	})
	return s.Seq, err
}

func intend(m, steps *bolt.Bucket, s *Step) error {
	s.Intended = time.Now().UTC()
	s.Finished = time.Time{}
	s.Result = ""
	if m.Get(keyRun) == nil {
		return ErrNoRun
	}
	seq, err := steps.NextSequence()
	if err != nil {
		return err
	}
	s.Seq = seq
	return putJSON(steps, seqKey(seq), *s)
}

// Complete durably records a step's result and, when st is not nil, the
// new state, in the same transaction: after a crash either both are there
// or neither.
func (j *Journal) Complete(seq uint64, result string, st *State) error {
	return j.update("recording step result", func(m, steps *bolt.Bucket) error {
		return complete(m, steps, seq, result, st)
	})
}

// CompleteAndIntend is Complete of step seq and Intend of next in one
// transaction (one commit to the disk instead of two): after a crash
// either both are there or neither. It returns next's sequence number.
func (j *Journal) CompleteAndIntend(seq uint64, result string, st *State, next Step) (uint64, error) {
	err := j.update("recording step result and the next intent", func(m, steps *bolt.Bucket) error {
		if err := complete(m, steps, seq, result, st); err != nil {
			return err
		}
		return intend(m, steps, &next)
	})
	return next.Seq, err
}

func complete(m, steps *bolt.Bucket, seq uint64, result string, st *State) error {
	var s Step
	if err := getJSON(steps, seqKey(seq), &s); err != nil {
		return fmt.Errorf("step %d: %w", seq, err)
	}
	s.Finished = time.Now().UTC()
	s.Result = result
	if err := putJSON(steps, seqKey(seq), s); err != nil {
		return err
	}
	if z := m.Tx().Bucket(bucketZone); z != nil {
		if v := z.Get(keyZone); v != nil && len(v) >= 8 && binary.BigEndian.Uint64(v) == seq {
			// The step that saved the zone is over: its contents
			// are no longer what the disk must hold.
			if err := z.Delete(keyZone); err != nil {
				return err
			}
		}
	}
	if st != nil {
		ns := *st
		ns.Seq = seq
		ns.Updated = s.Finished
		return putJSON(m, keyState, ns)
	}
	return nil
}

// Zone is the saved contents of a disk range that step Seq rewrites in
// place: until that step completes, Data is what the range must hold.
type Zone struct {
	Seq  uint64
	Off  int64 // byte offset on the disk
	Data []byte
}

// SaveZone durably records z (replacing any zone saved before). A step
// saves its zone after its intent and before it writes the range;
// Complete of that step drops it in the same transaction as the result.
func (j *Journal) SaveZone(z Zone) error {
	if z.Off < 0 {
		return fmt.Errorf("journal %s: zone at negative offset %d", j.path, z.Off)
	}
	v := make([]byte, 20+len(z.Data))
	binary.BigEndian.PutUint64(v, z.Seq)
	binary.BigEndian.PutUint64(v[8:], uint64(z.Off))
	binary.BigEndian.PutUint32(v[16:], crc32.Checksum(z.Data, crc32.MakeTable(crc32.Castagnoli)))
	copy(v[20:], z.Data)
	return j.update("saving the contents of a range rewritten in place", func(m, steps *bolt.Bucket) error {
		if steps.Get(seqKey(z.Seq)) == nil {
			return fmt.Errorf("zone of step %d, which was never intended", z.Seq)
		}
		zb, err := m.Tx().CreateBucketIfNotExists(bucketZone)
		if err != nil {
			return err
		}
		return zb.Put(keyZone, v)
	})
}

// PendingZone returns the zone saved by a step that has not completed,
// or ok=false when there is none.
func (j *Journal) PendingZone() (z Zone, ok bool, err error) {
	err = j.view(func(m, _ *bolt.Bucket) error {
		zb := m.Tx().Bucket(bucketZone)
		if zb == nil {
			return nil
		}
		v := zb.Get(keyZone)
		if v == nil {
			return nil
		}
		if len(v) < 20 {
			return errors.New("saved zone is truncated")
		}
		z.Seq = binary.BigEndian.Uint64(v)
		z.Off = int64(binary.BigEndian.Uint64(v[8:]))
		z.Data = append([]byte(nil), v[20:]...)
		if crc32.Checksum(z.Data, crc32.MakeTable(crc32.Castagnoli)) != binary.BigEndian.Uint32(v[16:]) {
			return errors.New("saved zone fails its checksum")
		}
		ok = true
		return nil
	})
	return z, ok, err
}

// DropZone forgets the saved zone (after it was written back).
func (j *Journal) DropZone() error {
	return j.update("dropping the saved zone", func(m, _ *bolt.Bucket) error {
		if zb := m.Tx().Bucket(bucketZone); zb != nil {
			return zb.Delete(keyZone)
		}
		return nil
	})
}

// Steps returns every step record in order.
func (j *Journal) Steps() ([]Step, error) {
	var out []Step
	err := j.view(func(_, steps *bolt.Bucket) error {
		return steps.ForEach(func(k, v []byte) error {
			var s Step
			if err := json.Unmarshal(v, &s); err != nil {
				return fmt.Errorf("step %x: %w", k, err)
			}
			out = append(out, s)
			return nil
		})
	})
	return out, err
}

// LastStep returns the newest step record, or ok=false if there is none.
func (j *Journal) LastStep() (s Step, ok bool, err error) {
	err = j.view(func(_, steps *bolt.Bucket) error {
		k, v := steps.Cursor().Last()
		if k == nil {
			return nil
		}
		ok = true
		return json.Unmarshal(v, &s)
	})
	return s, ok, err
}

func (j *Journal) update(what string, fn func(meta, steps *bolt.Bucket) error) error {
	err := j.db.Update(func(tx *bolt.Tx) error {
		m := tx.Bucket(bucketMeta)
		if m == nil || tx.Bucket(bucketSteps) == nil || tx.Bucket(bucketZone) == nil || tx.Bucket(bucketHeader) == nil {
			var err error
			if m, err = ensureBuckets(tx); err != nil {
				return err
			}
		}
		return fn(m, tx.Bucket(bucketSteps))
	})
	if err != nil {
		return fmt.Errorf("journal %s: %s: %w", j.path, what, err)
	}
	return nil
}

func (j *Journal) view(fn func(meta, steps *bolt.Bucket) error) error {
	err := j.db.View(func(tx *bolt.Tx) error {
		m, s := tx.Bucket(bucketMeta), tx.Bucket(bucketSteps)
		if m == nil || s == nil {
			return ErrNoRun
		}
		return fn(m, s)
	})
	if err != nil {
		return fmt.Errorf("journal %s: %w", j.path, err)
	}
	return nil
}

func seqKey(seq uint64) []byte {
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], seq)
	return b[:]
}

func putJSON(b *bolt.Bucket, key []byte, v any) error {
	data, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return b.Put(key, data)
}

func getJSON(b *bolt.Bucket, key []byte, v any) error {
	data := b.Get(key)
	if data == nil {
		if string(key) == string(keyRun) || string(key) == string(keyState) {
			return ErrNoRun
		}
		return fmt.Errorf("no record %q", key)
	}
	return json.Unmarshal(data, v)
}

// A LUKS header area is mostly zeros (unused keyslot space), but not at
// its end (dmconvert's checkpoint records are in its last 4 KiB). The
// image is stored sparse: sparseMagic, its length, then the runs of
// 4 KiB blocks that are not all zeros, each as its offset, its length and
// its bytes. (Journals of earlier versions hold the length and the bytes
// up to the last non-zero one: a length below 1 GiB, so a first byte 0,
// never sparseMagic's.)
const (
	sparseMagic = "DMCZ\x00\x00\x00\x01"
	sparseBlock = 4096
)

func encodeHeader(h []byte) []byte {
	out := make([]byte, 0, 1024)
	out = append(out, sparseMagic...)
	out = binary.BigEndian.AppendUint64(out, uint64(len(h)))
	zero := func(b []byte) bool {
		for _, c := range b {
			if c != 0 {
				return false
			}
		}
		return true
	}
	for off := 0; off < len(h); {
		end := min(off+sparseBlock, len(h))
		if zero(h[off:end]) {
			off = end
			continue
		}
		start := off
		for off = end; off < len(h); off = end {
			end = min(off+sparseBlock, len(h))
			if zero(h[off:end]) {
				break
			}
		}
		out = binary.BigEndian.AppendUint64(out, uint64(start))
		out = binary.BigEndian.AppendUint64(out, uint64(off-start))
		out = append(out, h[start:off]...)
	}
	return out
}

func decodeHeader(v []byte) ([]byte, error) {
	if len(v) < 8 {
		return nil, errors.New("stored header image is truncated")
	}
	if string(v[:8]) != sparseMagic {
		n := binary.BigEndian.Uint64(v)
		if n > 1<<30 || uint64(len(v)-8) > n {
			return nil, errors.New("stored header image is corrupt")
		}
		h := make([]byte, n)
		copy(h, v[8:])
		return h, nil
	}
	v = v[8:]
	if len(v) < 8 {
		return nil, errors.New("stored header image is truncated")
	}
	n := binary.BigEndian.Uint64(v)
	if n > 1<<30 {
		return nil, errors.New("stored header image is corrupt")
	}
	h := make([]byte, n)
	for v = v[8:]; len(v) > 0; {
		if len(v) < 16 {
			return nil, errors.New("stored header image is truncated")
		}
		off, l := binary.BigEndian.Uint64(v), binary.BigEndian.Uint64(v[8:])
		v = v[16:]
		if off > n || l > n-off || l > uint64(len(v)) {
			return nil, errors.New("stored header image is corrupt")
		}
		copy(h[off:], v[:l])
		v = v[l:]
	}
	return h, nil
}
