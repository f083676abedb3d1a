package convert

import (
	"context"
	"errors"
	"strings"
	"testing"
)

// TestSwitchWriteErrorKeepsWrites: a write of an identity switch fails
// (an I/O error, not a crash): the run stops with the error, and F must
// map the disk's head where the next reconcile will look for it, on the
// disk or on the tail, as the disk's first block then says. The
// application goes on writing to its LVs (over the disk's head too)
// until the resume, which must finish with every write. Before the fix
// (each proven by these cases failing without it):
//   - encrypt/header-rest: the header's first block had replaced the
//     label, the rest of the header failed, and settle mapped F's head
//     back on the disk: the header's bytes read as the LVs', their writes
//     went over it, and resume then rewrote the header and mapped the
//     head on the stale tail;
//   - encrypt/first-block: the first block's own write failed, swap's
//     resume made the switch's table live anyway until settle swapped it
//     back, and the writes in between went where nothing looks.
//
// decrypt/first-block passes either way (its case is the same code).
func TestSwitchWriteErrorKeepsWrites(t *testing.T) {
	errInjected := errors.New("injected I/O error")
	for _, c := range []struct {
		name    string
		decrypt bool
		fails   func(off int64, p []byte) bool // the switch's write
	}{
		// Encrypt writes nothing on the disk directly before its
		// switch: the first write at 0 is the header's first block,
		// the first at 4 KiB the rest of the header.
		{"encrypt/first-block", false, func(off int64, p []byte) bool { return off == 0 }},
		{"encrypt/header-rest", false, func(off int64, p []byte) bool { return off == int64(labelSectors*512) }},
		// Decrypt's switch writes the head's first block, the LVM label.
		{"decrypt/first-block", true, func(off int64, p []byte) bool { return off == 0 && Identify(p) == IdentityLVM }},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			var sc *scenario
			var w *fakeWorld
			if c.decrypt {
				sc, w = encryptedWorld(t, 71)
			} else {
				sc = newScenario(t, 72)
				w = sc.world()
			}
			sc.chunk = sc.H / 4 // half the writes go to the disk's head
			e := sc.engine(w)
			failed, burst := false, false
			e.FailHook = func(string) {
				sc.write(w)
				if failed && !burst {
					// The first failpoint after the failure (settle's
					// swap): the application writes a burst through what
					// is live then.
					burst = true
					for range 40 {
						sc.write(w)
					}
				}
			}
			w.writeFault = func(off int64, p []byte) error {
				if !failed && c.fails(off, p) {
					failed = true
					return errInjected
				}
				return nil
			}
			var err error
			if c.decrypt {
				ep, perr := e.PlanDecrypt(context.Background(), sc.decryptOptions())
				if perr != nil {
					t.Fatal(perr)
				}
				err = e.Execute(context.Background(), ep, RunOptions{})
			} else {
				ep, perr := e.PlanEncrypt(context.Background(), sc.options())
				if perr != nil {
					t.Fatal(perr)
				}
				err = e.Execute(context.Background(), ep, RunOptions{})
			}
			if !failed {
				t.Fatalf("the run never made the switch's write (err %v)", err)
			}
			if err == nil || !strings.Contains(err.Error(), errInjected.Error()) {
				t.Fatalf("the run with a failed switch write: %v", err)
			}
			w.writeFault = nil
			e.FailHook = nil
			for range 40 {
				sc.write(w)
			}
			sc.verifyLVs(w, "after the failed switch, before resume")
			e.FailHook = func(string) { sc.write(w) }
			open := sc.opener()
			if err := e.Resume(context.Background(), ResumeOptions{Journal: sc.journal, Open: open}); err != nil {
				t.Fatalf("resume after the failed switch: %v", err)
			}
			if c.decrypt {
				sc.verifyPlain(w, e)
			} else {
				sc.verifyEncrypted(w, e)
			}
		})
	}
}
