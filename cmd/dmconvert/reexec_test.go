package main

import (
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
)

// reexecProbe makes the test binary, started by TestReexecFromMemfd,
// re-execute itself from a memfd and report where it runs from.
const reexecProbe = "DMCONVERT_TEST_REEXEC_PROBE"

func TestMain(m *testing.M) {
	if os.Getenv(reexecProbe) != "" {
		if err := reexecFromMemfd(); err != nil {
			fmt.Println("error:", err)
			os.Exit(1)
		}
		exe, err := os.Readlink("/proc/self/exe")
		fmt.Printf("exe=%s marker=%s args=%s\n", exe, os.Getenv(memfdMarker), strings.Join(os.Args[1:], " "))
		if err != nil {
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func TestReexecFromMemfd(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^$", "extra-arg")
	cmd.Env = append(os.Environ(), reexecProbe+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("probe: %v\n%s", err, out)
	}
	s := strings.TrimSpace(string(out))
	if !strings.HasPrefix(s, "exe=/memfd:dmconvert") || !strings.Contains(s, "marker=1") || !strings.HasSuffix(s, "args=-test.run=^$ extra-arg") {
		t.Fatalf("after the re-exec: %q", s)
	}
	// Already running from the memfd (marker set): no second re-exec.
	cmd = exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), reexecProbe+"=1", memfdMarker+"=1")
	out, err = cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("probe with the marker: %v\n%s", err, out)
	}
	if s := string(out); strings.Contains(s, "/memfd:") {
		t.Fatalf("re-executed although the marker was set: %q", s)
	}
}
