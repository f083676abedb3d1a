package convert

import (
	"fmt"
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
	"switch:label-written", "switch:header-written", "switch:head-written",
	"finalize:table-after", "finalize:header-restored", "finalize:header-after", "finalize:helpers-removed",
	"lvm-refresh:before", "lvm-refresh:after",
	"unstack:device-after",
	"rewrite:saved", "rewrite:written",
	"mark:part-written",
}

var failpointSet = func() map[string]bool {
	m := make(map[string]bool, len(Failpoints))
	for _, f := range Failpoints {
		m[f] = true
	}
	return m
}()

// failHook is the process-wide hook: nil in production, set from the
// environment in binaries built with -tags failpoints (failpoint_env.go).
// Unit tests use Engine.FailHook instead. A hook that simulates process
// death does not return.
var failHook func(name string)

// lvmTrace, when set (DMCONVERT_FP_TRACE=1 in failpoint builds), is
// called after every lvm command.
var lvmTrace func(args []string, stdout, stderr []byte, exitCode int)

// stepTrace, when set (DMCONVERT_FP_TRACE=1 in failpoint builds), is
// called at a few steps of a run's start that are not failpoints.
var stepTrace func(name string)

func traceStep(name string) {
	if stepTrace != nil {
		stepTrace(name)
	}
}

// hit marks the failpoint name.
func hit(name string) {
	if !failpointSet[name] {
		panic(fmt.Sprintf("convert: undeclared failpoint %q", name))
	}
	if failHook != nil {
		failHook(name)
	}
}
