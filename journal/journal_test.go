package journal

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func newJournal(t *testing.T) (*Journal, string) {
	t.Helper()
	p := filepath.Join(t.TempDir(), "sub", "run.db")
	j, err := Open(p, Options{Create: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { j.Close() })
	return j, p
}

func TestOpenMissingWithoutCreate(t *testing.T) {
	_, err := Open(filepath.Join(t.TempDir(), "none.db"), Options{})
	if !errors.Is(err, ErrNotFound) {
		t.Fatalf("got %v, want ErrNotFound", err)
	}
}

func TestFilePermissions(t *testing.T) {
	_, p := newJournal(t)
	fi, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("journal mode %v, want 0600", fi.Mode().Perm())
	}
}

func TestSecondOpenIsLocked(t *testing.T) {
	_, p := newJournal(t)
	_, err := Open(p, Options{LockTimeout: 50 * time.Millisecond})
	if !errors.Is(err, ErrLocked) {
		t.Fatalf("second open: got %v, want ErrLocked", err)
	}
}

func TestInitRunStateAndSteps(t *testing.T) {
	j, p := newJournal(t)
	if _, err := j.Run(); !errors.Is(err, ErrNoRun) {
		t.Fatalf("Run on empty journal: %v, want ErrNoRun", err)
	}
	if _, err := j.Intend(Step{Kind: "x"}); !errors.Is(err, ErrNoRun) {
		t.Fatalf("Intend before Init: %v, want ErrNoRun", err)
	}
	hdr := make([]byte, 1<<20)
	copy(hdr, "LUKS\xba\xbe")
	hdr[70000] = 7
	run := Run{ID: "r1", Op: "encrypt", Device: "/dev/vda", Plan: json.RawMessage(`{"p":1}`), Identity: json.RawMessage(`{"size":42}`)}
	if err := j.Init(run, hdr, State{Status: StatusPlanned}); err != nil {
		t.Fatal(err)
	}
	if err := j.Init(run, hdr, State{}); !errors.Is(err, ErrRunExists) {
		t.Fatalf("second Init: %v, want ErrRunExists", err)
	}
	seq1, err := j.Intend(Step{Kind: "move", Phase: 2, Start: 0, End: 32768})
	if err != nil {
		t.Fatal(err)
	}
	if err := j.Complete(seq1, "done", &State{Status: StatusRunning, Phase: 2, Boundary: 0}); err != nil {
		t.Fatal(err)
	}
	seq2, err := j.Intend(Step{Kind: "move", Phase: 3, Start: 10, End: 20})
	if err != nil {
		t.Fatal(err)
	}
	if seq2 <= seq1 {
		t.Fatalf("sequence did not grow: %d then %d", seq1, seq2)
	}
	// Reopen: everything durable is there, the unfinished intent too.
	j.Close()
	j2, err := Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer j2.Close()
	got, err := j2.Run()
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != "r1" || got.Op != "encrypt" || string(got.Plan) != `{"p":1}` {
		t.Fatalf("run read back as %+v", got)
	}
	h, err := j2.Header()
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(h, hdr) {
		t.Fatal("header image changed across reopen")
	}
	st, err := j2.State()
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != StatusRunning || st.Phase != 2 || st.Seq != seq1 {
		t.Fatalf("state %+v", st)
	}
	last, ok, err := j2.LastStep()
	if err != nil || !ok {
		t.Fatalf("LastStep: %v %v", ok, err)
	}
	if last.Seq != seq2 || last.Result != "" || last.Start != 10 {
		t.Fatalf("last step %+v, want the unfinished intent %d", last, seq2)
	}
	steps, err := j2.Steps()
	if err != nil {
		t.Fatal(err)
	}
	if len(steps) != 2 || steps[0].Result != "done" {
		t.Fatalf("steps %+v", steps)
	}
}

func TestHeaderEncoding(t *testing.T) {
	// A LUKS2-like image: two header copies, a keyslot, zeros, and the
	// checkpoint records in the last 4 KiB.
	luks := make([]byte, 16<<20)
	for i := range 32 << 10 {
		luks[i] = byte(i*7 + 1)
	}
	for i := 32 << 10; i < 290<<10; i++ {
		luks[i] = byte(i)
	}
	copy(luks[len(luks)-4096+100:], "checkpoint")
	odd := make([]byte, 3*sparseBlock+5)
	odd[sparseBlock-1], odd[2*sparseBlock], odd[len(odd)-1] = 1, 2, 3
	for _, h := range [][]byte{{}, {0, 0, 0}, {1}, {1, 0, 0, 2, 0, 0}, luks, odd, make([]byte, 1<<20)} {
		enc := encodeHeader(h)
		got, err := decodeHeader(enc)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, h) {
			t.Fatalf("round trip of %d bytes differs", len(h))
		}
	}
	// The zeros between the keyslot and the records are not stored.
	if n := len(encodeHeader(luks)); n > 300<<10 {
		t.Fatalf("a 16 MiB image with 294 KiB of data is stored in %d bytes", n)
	}
	// Images stored by earlier versions (length, then the bytes up to
	// the last non-zero one) still read.
	old := []byte{0, 0, 0, 0, 0, 0, 0, 6, 1, 0, 0, 2}
	if got, err := decodeHeader(old); err != nil || !bytes.Equal(got, []byte{1, 0, 0, 2, 0, 0}) {
		t.Fatalf("old encoding: %v %v", got, err)
	}
	if _, err := decodeHeader([]byte{0, 0, 0}); err == nil {
		t.Fatal("truncated header image accepted")
	}
	old[7] = 1 // claims 1 byte but carries 4
	if _, err := decodeHeader(old); err == nil {
		t.Fatal("inconsistent old header image accepted")
	}
	for name, corrupt := range map[string]func([]byte) []byte{
		"truncated run":     func(b []byte) []byte { return b[:len(b)-1] },
		"run past the end":  func(b []byte) []byte { b[16+6] = 0xff; return b },
		"length over 1 GiB": func(b []byte) []byte { b[8] = 0x7f; return b },
		"truncated length":  func(b []byte) []byte { return b[:12] },
		"short run record":  func(b []byte) []byte { return append(b, 0, 0, 0) },
	} {
		if _, err := decodeHeader(corrupt(encodeHeader(odd))); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

func TestReadOnlyOpen(t *testing.T) {
	j, p := newJournal(t)
	if err := j.Init(Run{ID: "r"}, nil, State{Status: StatusRunning}); err != nil {
		t.Fatal(err)
	}
	j.Close()
	ro, err := Open(p, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	st, err := ro.State()
	if err != nil || st.Status != StatusRunning {
		t.Fatalf("read-only state %+v %v", st, err)
	}
	if err := ro.SetState(State{}); err == nil {
		t.Fatal("write through a read-only journal succeeded")
	}
}

func TestSetPlan(t *testing.T) {
	j, _ := newJournal(t)
	if err := j.SetPlan(json.RawMessage(`{}`), State{}); !errors.Is(err, ErrNoRun) {
		t.Fatalf("SetPlan before Init: %v", err)
	}
	if err := j.Init(Run{ID: "r", Plan: json.RawMessage(`{"a":1}`)}, nil, State{Status: StatusRunning}); err != nil {
		t.Fatal(err)
	}
	if err := j.SetPlan(json.RawMessage(`{"a":2}`), State{Status: StatusAborting, Phase: 3}); err != nil {
		t.Fatal(err)
	}
	r, _ := j.Run()
	st, _ := j.State()
	if string(r.Plan) != `{"a":2}` || r.ID != "r" || st.Status != StatusAborting || st.Phase != 3 {
		t.Fatalf("after SetPlan: run %+v state %+v", r, st)
	}
}

// A saved zone is pending until its step completes, survives a reopen,
// and is dropped by the completion of its own step only.
func TestZoneLifecycle(t *testing.T) {
	j, p := newJournal(t)
	if err := j.Init(Run{ID: "r", Op: "rekey"}, nil, State{Status: StatusRunning}); err != nil {
		t.Fatal(err)
	}
	if err := j.SaveZone(Zone{Seq: 99, Off: 0, Data: []byte("x")}); err == nil {
		t.Fatal("a zone of a step never intended was saved")
	}
	seq, err := j.Intend(Step{Kind: "rewrite", Start: 8, End: 16})
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte{0xa5, 0x5a}, 2048)
	if err := j.SaveZone(Zone{Seq: seq, Off: 4096, Data: data}); err != nil {
		t.Fatal(err)
	}
	j.Close()
	j, err = Open(p, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	z, ok, err := j.PendingZone()
	if err != nil || !ok || z.Seq != seq || z.Off != 4096 || !bytes.Equal(z.Data, data) {
		t.Fatalf("after reopen: zone %d@%d (%d bytes) ok=%v err=%v", z.Seq, z.Off, len(z.Data), ok, err)
	}
	// Another step's completion leaves it.
	other, err := j.Intend(Step{Kind: "other"})
	if err != nil {
		t.Fatal(err)
	}
	if err := j.Complete(other, "done", nil); err != nil {
		t.Fatal(err)
	}
	if _, ok, _ := j.PendingZone(); !ok {
		t.Fatal("another step's completion dropped the zone")
	}
	if err := j.Complete(seq, "done", &State{Status: StatusRunning, Phase: 1}); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := j.PendingZone(); ok || err != nil {
		t.Fatalf("zone still pending after its step completed (err %v)", err)
	}
}

// CompleteAndIntend records a step's result, the new state and the next
// intent together: afterwards the last step is the new, unfinished one,
// and the state is the completed step's.
func TestCompleteAndIntend(t *testing.T) {
	j, _ := newJournal(t)
	if err := j.Init(Run{ID: "r"}, nil, State{Status: StatusRunning}); err != nil {
		t.Fatal(err)
	}
	seq, err := j.Intend(Step{Kind: "chunk", Start: 0, End: 8})
	if err != nil {
		t.Fatal(err)
	}
	next, err := j.CompleteAndIntend(seq, "done", &State{Status: StatusRunning, Boundary: 8}, Step{Kind: "chunk", Start: 8, End: 16})
	if err != nil {
		t.Fatal(err)
	}
	if next <= seq {
		t.Fatalf("next intent has seq %d after %d", next, seq)
	}
	st, err := j.State()
	if err != nil || st.Seq != seq || st.Boundary != 8 {
		t.Fatalf("state %+v (%v), want the completed step %d at boundary 8", st, err, seq)
	}
	last, ok, err := j.LastStep()
	if err != nil || !ok || last.Seq != next || last.Result != "" || last.Start != 8 || last.End != 16 {
		t.Fatalf("last step %+v (%v %v), want the unfinished intent %d of [8,16)", last, ok, err, next)
	}
	steps, err := j.Steps()
	if err != nil || len(steps) != 2 || steps[0].Result != "done" || steps[0].Finished.IsZero() {
		t.Fatalf("steps %+v (%v)", steps, err)
	}
	// A step that does not exist: nothing is recorded.
	if _, err := j.CompleteAndIntend(99, "done", &State{Boundary: 99}, Step{Kind: "chunk"}); err == nil {
		t.Fatal("CompleteAndIntend of an unknown step succeeded")
	}
	if st, _ := j.State(); st.Boundary != 8 {
		t.Fatalf("a failed CompleteAndIntend changed the state: %+v", st)
	}
	if steps, _ := j.Steps(); len(steps) != 2 {
		t.Fatalf("a failed CompleteAndIntend added a step: %+v", steps)
	}
}
