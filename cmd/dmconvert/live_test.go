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
	"github.com/dmconvert/dmconvert/journal"
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

// TestLiveRunJournalElsewhere: a run whose journal is outside the journal
// directory (--journal) is found while it runs by what its process
// publishes: status lists it, with the device or without, and resume
// refuses it as busy, naming the process and the journal. Before, status
// said there was no unfinished run.
func TestLiveRunJournalElsewhere(t *testing.T) {
	ta := newTestApp(t)
	jp := filepath.Join(ta.dir, "elsewhere", "run.journal")
	if err := os.MkdirAll(filepath.Dir(jp), 0o700); err != nil {
		t.Fatal(err)
	}
	j, err := journal.Open(jp, journal.Options{Create: true})
	if err != nil {
		t.Fatal(err)
	}
	defer j.Close()
	img := filepath.Join(ta.dir, "disk.img")
	if err := os.WriteFile(img, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(ta.dir, "other.img")
	if err := os.WriteFile(other, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}

	ta.mustRun(exitOK, "status")
	if !strings.Contains(ta.out.String(), "no unfinished dmconvert run") {
		t.Fatalf("status before the run publishes:\n%s", ta.out.String())
	}

	pr := ta.a.publish(quietProgress{}, jp, "encrypt", img)
	pr.Event(convert.Event{Kind: convert.EventPhase, Phase: "setup", Done: 1 << 20, Total: 8 << 20, Time: time.Now()})
	defer pr.finish(true)

	for _, args := range [][]string{{"status"}, {"status", img}} {
		ta.mustRun(exitOK, args...)
		out := ta.out.String()
		for _, want := range []string{"journal:   " + jp, "in progress: dmconvert encrypt of " + img + ", process"} {
			if !strings.Contains(out, want) {
				t.Errorf("%v lacks %q:\n%s", args, want, out)
			}
		}
	}
	ta.mustRun(exitOK, "status", other)
	if strings.Contains(ta.out.String(), jp) {
		t.Errorf("status of another disk shows the run:\n%s", ta.out.String())
	}

	ta.mustRun(exitBusy, "resume", img, "--yes")
	if want := "is running this conversion"; !strings.Contains(ta.err.String(), want) || !strings.Contains(ta.err.String(), jp) {
		t.Errorf("resume of the running disk: want %q and the journal:\n%s", want, ta.err.String())
	}
	ta.mustRun(exitBusy, "resume", "--yes")
	if !strings.Contains(ta.err.String(), "another dmconvert is running this conversion") {
		t.Errorf("resume without a device:\n%s", ta.err.String())
	}
}
