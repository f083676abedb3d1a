package testvm

import (
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"
)

// EnvSlots, when set on the host to n > 0, lets at most n guests of one
// test process run at a time, started in priority order (Slot). make test
// sets it and runs go test with a -parallel above it: go test itself
// starts parallel tests in no documented order, and in one run the two
// longest VMs started last and ran on alone at the end while a core idled.
const EnvSlots = "DMCONVERT_VM_SLOTS"

// slotGrace is how long the first request waits before any slot is given:
// long enough for every parallel test released at the same instant to
// queue, so that the first slots go to the first in priority.
const slotGrace = 2 * time.Second

type slotQueue struct {
	mu      sync.Mutex
	cond    *sync.Cond
	first   time.Time // the first request
	running int
	waiting []slotWaiter
	seq     int
}

type slotWaiter struct {
	priority, seq int
}

var slots = func() *slotQueue {
	q := &slotQueue{}
	q.cond = sync.NewCond(&q.mu)
	return q
}()

// Slot waits until this test may boot its guest(s) and holds the slot
// until the test ends. Lower priority values go first (among the tests
// waiting when a slot frees); equal ones in the order they asked. Without
// DMCONVERT_VM_SLOTS it returns at once.
func Slot(t testing.TB, priority int) {
	n, err := strconv.Atoi(os.Getenv(EnvSlots))
	if err != nil || n <= 0 {
		return
	}
	start := time.Now()
	slots.acquire(n, priority)
	if d := time.Since(start); d > slotGrace+time.Second {
		t.Logf("waited %v for a guest slot (%s=%d, priority %d)", d.Round(time.Second), EnvSlots, n, priority)
	}
	t.Cleanup(slots.release)
}

func (q *slotQueue) acquire(n, priority int) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.first.IsZero() {
		q.first = time.Now()
	}
	q.seq++
	me := slotWaiter{priority: priority, seq: q.seq}
	q.waiting = append(q.waiting, me)
	for {
		if wait := slotGrace - time.Since(q.first); wait > 0 {
			q.mu.Unlock()
			time.Sleep(wait)
			q.mu.Lock()
			continue
		}
		best := slices.MinFunc(q.waiting, func(a, b slotWaiter) int {
			if a.priority != b.priority {
				return a.priority - b.priority
			}
			return a.seq - b.seq
		})
		if q.running < n && best == me {
			q.waiting = slices.DeleteFunc(q.waiting, func(w slotWaiter) bool { return w == me })
			q.running++
			// The next in line may fit as well.
			q.cond.Broadcast()
			return
		}
		q.cond.Wait()
	}
}

func (q *slotQueue) release() {
	q.mu.Lock()
	q.running--
	q.mu.Unlock()
	q.cond.Broadcast()
}
