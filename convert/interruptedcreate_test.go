package convert

import (
	"context"
	"fmt"
	"testing"
)

// TestResumeAfterAnInterruptedCreate: after a power cut mid-run, the
// resume is itself killed inside its k-th device create, between the
// kernel's create and the device's first table (as a kill -9 while
// dm-crypt's constructor starts its threads does: the load fails with
// EINTR and the process dies before it can remove the device). The device
// is left with no table, which no other table can use (the kernel has no
// block device for it yet). The next resume must drop it, build the stack
// again and finish with every acknowledged write, for an encrypt of a PV,
// a rekey, and the header-gap decrypt of a file system on the mapping.
// Before the fix, the next resume put the table-less helper in F's table
// (ENXIO from the kernel, seen in the guest) or refused it as a helper
// whose table differs from the run's.
func TestResumeAfterAnInterruptedCreate(t *testing.T) {
	type kind struct {
		name   string
		world  func(t *testing.T, seed int64) (*scenario, *fakeWorld)
		plan   func(sc *scenario) func(*Engine) func() error
		open   func(sc *scenario) ResumeOptions
		verify func(sc *scenario, w *fakeWorld, e *Engine)
	}
	encrypt := func(sc *scenario) func(*Engine) func() error {
		return func(e *Engine) func() error {
			return func() error {
				ep, err := e.PlanEncrypt(context.Background(), sc.options())
				if err != nil {
					return err
				}
				return e.Execute(context.Background(), ep, RunOptions{})
			}
		}
	}
	kinds := []kind{
		{"encrypt", func(t *testing.T, seed int64) (*scenario, *fakeWorld) {
			sc := newScenario(t, seed)
			return sc, sc.world()
		}, encrypt,
			func(sc *scenario) ResumeOptions { return ResumeOptions{Journal: sc.journal, Open: sc.opener()} },
			func(sc *scenario, w *fakeWorld, e *Engine) { sc.verifyEncrypted(w, e) }},
		{"rekey", encryptedWorld, func(sc *scenario) func(*Engine) func() error { return sc.planRekey },
			func(sc *scenario) ResumeOptions { return ResumeOptions{Journal: sc.journal, Open: sc.rekeyOpener()} },
			func(sc *scenario, w *fakeWorld, e *Engine) { sc.verifyRekeyed(w, e) }},
		{"decrypt-fs", fsDecryptWorld, func(sc *scenario) func(*Engine) func() error { return sc.planFSDecrypt },
			func(sc *scenario) ResumeOptions { return ResumeOptions{Journal: sc.journal, Open: sc.opener()} },
			func(sc *scenario, w *fakeWorld, e *Engine) { sc.verifyFSDecrypted(w, e) }},
	}
	for _, kd := range kinds {
		interrupted := 0
		for k := 1; k <= 4; k++ {
			t.Run(fmt.Sprintf("%s/create%d", kd.name, k), func(t *testing.T) {
				sc, w := kd.world(t, int64(700+k))
				w, e := sc.crashAndBoot(t, w, "commit:after", 3, recoverPowerResume, kd.plan(sc), func(w *fakeWorld) {
					if kd.name != "encrypt" {
						t.Fatal("boot-time LVM activated something on the raw encrypted disk")
					}
					sc.verifyLVs(w, "boot-time activation on the raw disk")
				})
				sc.createKill = k
				before := w
				o := kd.open(sc)
				if err := sc.recoverOnce(&w, &e, func(e *Engine) error { return e.Resume(context.Background(), o) }); err != nil {
					t.Fatalf("resume after a resume killed inside its create #%d: %v", k, err)
				}
				if w != before {
					interrupted++
					t.Logf("create #%d killed: %s left without a table; the next resume finished", k, sc.tableless)
				}
				kd.verify(sc, w, e)
			})
		}
		if interrupted < 2 {
			t.Errorf("%s: only %d of the resumes were killed inside a create; the test needs at least 2 (a helper and F)", kd.name, interrupted)
		}
	}
}
