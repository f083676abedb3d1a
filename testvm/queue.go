package testvm

import (
	"os"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"
)

// EnvSlots, when set, is how many VMs a Queue runs at once (default: the
// host's CPUs plus one: a guest keeps about 0.6-0.7 of a core busy, and
// four VMs on two cores cost 14% more QEMU CPU than three).
const EnvSlots = "DMCONVERT_VM_SLOTS"

// Queue hands a fixed number of VM slots to the parallel tests of one
// test binary, lowest rank first. go test starts parallel tests in no
// particular order, so a long VM could start last and alone; with every
// VM test admitted by go test (-parallel at least their number) and
// then queued here by rank (longest first), the run ends when the
// shortest VMs do.
type Queue struct {
	mu      sync.Mutex
	slots   int
	busy    int
	waiting []queued
	gather  time.Duration
	open    bool // the gathering time after the first arrival is over
	timer   bool // the gathering timer runs
}

type queued struct {
	rank  int
	grant chan struct{}
}

// NewQueue returns a queue of slots VMs (0: $DMCONVERT_VM_SLOTS, else
// the host's CPUs plus one). The first slot is handed out gather after the
// first Acquire, so that the tests go test releases together are all
// queued before the lowest rank is chosen.
func NewQueue(slots int, gather time.Duration) *Queue {
	if slots <= 0 {
		slots = runtime.NumCPU() + 1
		if n, err := strconv.Atoi(os.Getenv(EnvSlots)); err == nil && n > 0 {
			slots = n
		}
	}
	return &Queue{slots: slots, gather: gather}
}

// Slots is how many VMs the queue runs at once.
func (q *Queue) Slots() int { return q.slots }

// Acquire waits for a slot (Wait) and releases it when t ends.
func (q *Queue) Acquire(t testing.TB, rank int) {
	t.Helper()
	t.Cleanup(q.Wait(rank))
}

// Wait blocks until a slot is free and no caller of a lower rank waits;
// it returns the function that releases the slot.
func (q *Queue) Wait(rank int) (release func()) {
	w := queued{rank: rank, grant: make(chan struct{})}
	q.mu.Lock()
	i := len(q.waiting)
	for i > 0 && q.waiting[i-1].rank > rank {
		i--
	}
	q.waiting = append(q.waiting[:i], append([]queued{w}, q.waiting[i:]...)...)
	if !q.open && !q.timer {
		q.timer = true
		time.AfterFunc(q.gather, func() {
			q.mu.Lock()
			q.open = true
			q.dispatch()
			q.mu.Unlock()
		})
	}
	q.dispatch()
	q.mu.Unlock()
	<-w.grant
	var once sync.Once
	return func() {
		once.Do(func() {
			q.mu.Lock()
			q.busy--
			q.dispatch()
			q.mu.Unlock()
		})
	}
}

// dispatch grants free slots to the lowest ranks waiting (q.mu held).
func (q *Queue) dispatch() {
	for q.open && q.busy < q.slots && len(q.waiting) > 0 {
		w := q.waiting[0]
		q.waiting = q.waiting[1:]
		q.busy++
		close(w.grant)
	}
}
