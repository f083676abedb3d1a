package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/convert"
)

// TestLiveProgress: a run publishes its position for status while it
// runs (throttled, but phase changes at once), removes it at the end;
// status prints it; a file left by a dead process is ignored.
func TestLiveProgress(t *testing.T) {
	dir := t.TempDir()
	a := &app{liveDir: filepath.Join(dir, "live")}
	j := filepath.Join(dir, "run.journal")
	pr := a.publish(quietProgress{}, j, "encrypt", "/dev/vdb")
	if readLive(a.liveDir, j) != nil {
		t.Fatal("a position before the first event")
	}
	// A process that ends before its first event leaves the file of the
	// process that runs the journal alone.
	other := a.publish(quietProgress{}, j, "resume", "/dev/vdb")
	t0 := time.Now()
	const total = 100 << 20
	pr.Event(convert.Event{Kind: convert.EventPhase, Phase: "setup", Done: 10 << 20, Total: total, Time: t0})
	pr.Event(convert.Event{Kind: convert.EventChunk, Done: 20 << 20, Total: total, Time: t0.Add(time.Second)})
	// Within the throttle: not written.
	pr.Event(convert.Event{Kind: convert.EventChunk, Done: 21 << 20, Total: total, Time: t0.Add(time.Second + time.Millisecond)})
	l := readLive(a.liveDir, j)
	if l == nil {
		t.Fatal("no position published")
	}
	abs, _ := filepath.Abs(j)
	if l.PID != os.Getpid() || l.Journal != abs || l.Command != "encrypt" || l.Device != "/dev/vdb" || l.Done != 20<<20 || l.Total != total || l.StartDone != 10<<20 {
		t.Fatalf("published %+v", l)
	}
	if r := l.Rate(); r < 9.9*(1<<20) || r > 10.1*(1<<20) {
		t.Fatalf("rate %v, want 10 MiB/s", r)
	}
	// The same journal by another spelling finds the same file.
	if l2 := readLive(a.liveDir, filepath.Join(dir, ".", "run.journal")); l2 == nil || l2.Done != l.Done {
		t.Fatalf("another spelling of the path: %+v", l2)
	}

	var out bytes.Buffer
	a.stdout = &out
	a.printStatus(&runStatus{Journal: j, InProgressElsewhere: true, Live: l})
	for _, want := range []string{"in progress: dmconvert encrypt of /dev/vdb, process", "position:  " + convert.DescribePhaseString("setup") + "; 20.0% (20.0 MiB of 100.0 MiB) copied, 10.0 MiB/s, about 8s left"} {
		if !strings.Contains(out.String(), want) {
			t.Fatalf("status output lacks %q:\n%s", want, out.String())
		}
	}

	other.finish(false)
	if readLive(a.liveDir, j) == nil {
		t.Fatal("a process that published nothing removed the running one's position")
	}
	pr.finish(true)
	if _, err := os.Stat(liveFile(a.liveDir, j)); !os.IsNotExist(err) {
		t.Fatalf("the position file is still there after the run: %v", err)
	}

	// Left by a process that is gone.
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Fatal(err)
	}
	l.PID = cmd.Process.Pid
	b, _ := json.Marshal(l)
	if err := os.WriteFile(liveFile(a.liveDir, j), b, 0o644); err != nil {
		t.Fatal(err)
	}
	if got := readLive(a.liveDir, j); got != nil {
		t.Fatalf("a dead process's position was shown: %+v", got)
	}
}
