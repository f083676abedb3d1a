//go:build failpoints

package convert

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// In binaries built with -tags failpoints, DMCONVERT_FAILPOINT=name[:n]
// makes the process exit with code FailpointExitCode at the n-th (default
// first) time it reaches failpoint name, with no cleanup at all: devices
// stay suspended, tables stay loaded, nothing is flushed. That is what a
// process killed at that instant leaves behind.
//
// DMCONVERT_FP_TRACE=1 prints every failpoint reached, with the time
// since the previous one, on standard error (where a run spends its time).
func init() {
	if os.Getenv("DMCONVERT_FP_TRACE") == "1" {
		last := time.Now()
		failHook = func(n string) {
			fmt.Fprintf(os.Stderr, "dmconvert: trace %-26s +%6.3fs\n", n, time.Since(last).Seconds())
			last = time.Now()
		}
		stepTrace = func(n string) {
			fmt.Fprintf(os.Stderr, "dmconvert: trace step %-21s +%6.3fs\n", n, time.Since(last).Seconds())
			last = time.Now()
		}
		lvmTrace = func(args []string, _, _ []byte, code int) {
			fmt.Fprintf(os.Stderr, "dmconvert: trace lvm %s (exit %d) +%6.3fs\n", strings.Join(args, " "), code, time.Since(last).Seconds())
			last = time.Now()
		}
	}
	spec := os.Getenv("DMCONVERT_FAILPOINT")
	if spec == "" {
		return
	}
	name, nth := spec, 1
	if i := strings.LastIndexByte(spec, ':'); i > 0 {
		if n, err := strconv.Atoi(spec[i+1:]); err == nil {
			name, nth = spec[:i], n
		}
	}
	if !failpointSet[name] {
		fmt.Fprintf(os.Stderr, "dmconvert: DMCONVERT_FAILPOINT names unknown failpoint %q\n", name)
		os.Exit(2)
	}
	count := 0
	trace := failHook
	failHook = func(n string) {
		if trace != nil {
			trace(n)
		}
		if n != name {
			return
		}
		count++
		if count == nth {
			fmt.Fprintf(os.Stderr, "dmconvert: failpoint %s reached (hit %d): exiting\n", n, count)
			os.Exit(FailpointExitCode)
		}
	}
}
