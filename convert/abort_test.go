package convert

import (
	"context"
	"errors"
	"testing"
)

// An abort stopped by a signal continues as an abort, whether the user
// then says resume or abort (a helper found it fell back to the forward
// plan and refused).
func TestInterruptedAbortContinues(t *testing.T) {
	for _, again := range []string{"resume", "abort"} {
		t.Run(again, func(t *testing.T) {
			sc := newScenario(t, 5)
			w := sc.world()
			e := sc.engine(w)
			ep, err := e.PlanEncrypt(context.Background(), sc.options())
			if err != nil {
				t.Fatal(err)
			}
			n := 0
			if err := e.Execute(context.Background(), ep, RunOptions{Stop: func() bool { n++; return n > 12 }}); !errors.Is(err, ErrInterrupted) {
				t.Fatal(err)
			}
			m := 0
			o := ResumeOptions{Journal: sc.journal, Open: sc.opener(), RunOptions: RunOptions{Stop: func() bool { m++; return m > 3 }}}
			if err := e.Abort(context.Background(), o); !errors.Is(err, ErrInterrupted) {
				t.Fatalf("first abort: %v", err)
			}
			ri, _ := InspectJournal(sc.journal, 0)
			t.Logf("after interrupted abort: status %s aborting %v phase %d/%d", ri.Status, ri.Aborting, ri.Phase, ri.Phases)
			o2 := ResumeOptions{Journal: sc.journal, Open: sc.opener()}
			if again == "resume" {
				err = e.Resume(context.Background(), o2)
			} else {
				err = e.Abort(context.Background(), o2)
			}
			if err != nil {
				t.Fatalf("%s after an interrupted abort: %v", again, err)
			}
			ri, _ = InspectJournal(sc.journal, 0)
			t.Logf("final: %s", ri.Status)
			sc.verifyPlain(w, e)
		})
	}
}
