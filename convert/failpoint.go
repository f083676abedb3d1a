package convert

import (
	"fmt"
	"sync"
)

// Failpoints name every durability boundary and every table swap of the
// engine. Tests make the process die at each one (see failpoint_env.go,
// built with -tags failpoints, and the unit tests' crash harness) and check
// that resume and abort recover. The list is the contract: Hit refuses a
// name that is not in it, and a test checks that a full run reaches every
// name, so a new step cannot be added without its failpoints.
var Failpoints = []string{
	"intent:before", "intent:after",
	"load:before", "load:after",
	"suspend:after",
	"resume:before", "resume:after",
	"sync:after",
	"flush:after",
	"checkpoint:before", "checkpoint:after",
	"commit:before", "commit:after",
	"restack:device-after",
	"switch:label-written", "switch:header-written",
	"finalize:table-after", "finalize:header-after", "finalize:helpers-removed",
	"lvm-refresh:before", "lvm-refresh:after",
	"unstack:device-after",
}

var failpointSet = func() map[string]bool {
	m := make(map[string]bool, len(Failpoints))
	for _, f := range Failpoints {
		m[f] = true
	}
	return m
}()

// failHook is nil in production. Test builds set it (SetFailHook, or the
// failpoints build tag from the environment). It may not return: a hook
// that simulates process death panics or exits.
var (
	failMu   sync.Mutex
	failHook func(name string)
)

// SetFailHook installs a failpoint hook and returns a function restoring
// the previous one. For tests only.
func SetFailHook(h func(name string)) (restore func()) {
	failMu.Lock()
	prev := failHook
	failHook = h
	failMu.Unlock()
	return func() {
		failMu.Lock()
		failHook = prev
		failMu.Unlock()
	}
}

// hit marks the failpoint name.
func hit(name string) {
	if !failpointSet[name] {
		panic(fmt.Sprintf("convert: undeclared failpoint %q", name))
	}
	failMu.Lock()
	h := failHook
	failMu.Unlock()
	if h != nil {
		h(name)
	}
}
