package testvm

import (
	"sync"
	"testing"
	"time"
)

// TestSlotsOrder: with every slot taken, the waiters get the freed slots
// by priority, equal priorities in the order they asked.
func TestSlotsOrder(t *testing.T) {
	q := &slotQueue{first: time.Now().Add(-time.Hour), running: 1}
	q.cond = sync.NewCond(&q.mu)
	var mu sync.Mutex
	var got []string
	var wg sync.WaitGroup
	for i, w := range []struct {
		name string
		prio int
	}{{"c", 5}, {"a", 1}, {"b1", 3}, {"b2", 3}} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			q.acquire(1, w.prio)
			mu.Lock()
			got = append(got, w.name)
			mu.Unlock()
			q.release()
		}()
		// Queue them in this order (b1 before b2).
		for deadline := time.Now().Add(5 * time.Second); ; {
			q.mu.Lock()
			n := len(q.waiting)
			q.mu.Unlock()
			if n > i || time.Now().After(deadline) {
				break
			}
			time.Sleep(time.Millisecond)
		}
	}
	for deadline := time.Now().Add(5 * time.Second); ; {
		q.mu.Lock()
		n := len(q.waiting)
		q.mu.Unlock()
		if n == 4 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d waiters queued, want 4", n)
		}
		time.Sleep(time.Millisecond)
	}
	q.release() // the slot held from the start
	wg.Wait()
	want := []string{"a", "b1", "b2", "c"}
	if len(got) != len(want) {
		t.Fatalf("order %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("order %v, want %v", got, want)
		}
	}
}
