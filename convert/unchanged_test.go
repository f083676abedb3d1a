package convert

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
)

// Execute looks at the PV again before it writes anything: the same VG
// metadata (sequence number) is the plan's PV; a changed one is looked at
// in full, and a PV of another size refuses the plan.
func TestExecuteChecksThePVAgain(t *testing.T) {
	for _, c := range []struct {
		name   string
		change func(pv *PV)
		refuse bool
	}{
		{"unchanged", func(pv *PV) {}, false},
		{"another change to the VG", func(pv *PV) { pv.VGSeqno++ }, false},
		{"the PV resized", func(pv *PV) { pv.Size -= pv.ExtentSize; pv.VGSeqno++ }, true},
		{"the PV recreated", func(pv *PV) { pv.UUID = "other"; pv.VGSeqno = 1 }, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			sc := newScenario(t, 4)
			w := sc.world()
			e := sc.engine(w)
			w.lvm.pv.VGSeqno = 7
			ep, err := e.PlanEncrypt(context.Background(), sc.options())
			if err != nil {
				t.Fatal(err)
			}
			if ep.Spec.VGSeqno != 7 {
				t.Fatalf("the plan recorded seqno %d, want 7", ep.Spec.VGSeqno)
			}
			c.change(&w.lvm.pv)
			err = e.Execute(context.Background(), ep, RunOptions{})
			var re *RefusalError
			switch {
			case c.refuse && (!errors.As(err, &re) || !strings.Contains(err.Error(), "changed since the plan")):
				t.Fatalf("Execute after %s: %v, want a refusal", c.name, err)
			case c.refuse:
				// Refused before the journal recorded the run: no
				// empty journal file is left behind.
				if _, err := os.Stat(ep.Journal); !os.IsNotExist(err) {
					t.Fatalf("the refused run left its journal %s: %v", ep.Journal, err)
				}
			case !c.refuse && err != nil:
				t.Fatalf("Execute after %s: %v", c.name, err)
			case !c.refuse:
				sc.verifyEncrypted(w, e)
			}
		})
	}
}

// A plan executed right after it was made (RunOptions.Fresh: no prompt
// in between) is not looked at again through LVM; the disk still is.
func TestExecuteFreshPlanAsksLVMNothing(t *testing.T) {
	sc := newScenario(t, 4)
	w := sc.world()
	e := sc.engine(w)
	ep, err := e.PlanEncrypt(context.Background(), sc.options())
	if err != nil {
		t.Fatal(err)
	}
	planned := w.lvm.asked
	if planned == 0 {
		t.Fatal("the plan asked LVM nothing")
	}
	if err := e.Execute(context.Background(), ep, RunOptions{Fresh: true}); err != nil {
		t.Fatal(err)
	}
	if n := w.lvm.asked - planned; n != 0 {
		t.Fatalf("a fresh plan's Execute asked LVM %d times, want 0", n)
	}
	sc.verifyEncrypted(w, e)

	// The same plan not fresh: one State call at least.
	sc2 := newScenario(t, 4)
	w2 := sc2.world()
	e2 := sc2.engine(w2)
	ep2, err := e2.PlanEncrypt(context.Background(), sc2.options())
	if err != nil {
		t.Fatal(err)
	}
	planned = w2.lvm.asked
	if err := e2.Execute(context.Background(), ep2, RunOptions{}); err != nil {
		t.Fatal(err)
	}
	if w2.lvm.asked == planned {
		t.Fatal("Execute of a plan that is not fresh did not look at the PV again")
	}
}
