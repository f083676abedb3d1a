package main

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/dmconvert/dmconvert/convert"
)

// A running dmconvert holds its journal's lock for the whole run, so
// `dmconvert status` in another terminal cannot read the journal. The
// running process therefore also publishes its position, at most twice a
// second, in a small file under /run (tmpfs: no disk is written, and no
// write can wait on a suspended device), named after the journal's path;
// status reads it when the journal is locked. The file is removed when
// the run ends; one left by a killed process names a dead PID and is
// ignored.

// defaultLiveDir is where running processes publish their position.
const defaultLiveDir = "/run/dmconvert/progress"

// liveProgress is what a running process publishes.
type liveProgress struct {
	PID     int    `json:"pid"`
	Journal string `json:"journal"`
	Command string `json:"command"` // encrypt, resume, abort...
	Device  string `json:"device"`
	// Phase is the current phase, as the progress display describes it.
	Phase string `json:"phase,omitempty"`
	Done  uint64 `json:"done_bytes"`
	Total uint64 `json:"total_bytes"`
	// Started is this process's first event, StartDone what was done
	// then (the rate is this process's own).
	Started   time.Time `json:"started"`
	StartDone uint64    `json:"start_done_bytes"`
	Updated   time.Time `json:"updated"`
}

// Rate is the bytes per second this process has copied, 0 if unknown.
func (l *liveProgress) Rate() float64 {
	el := l.Updated.Sub(l.Started).Seconds()
	if el <= 0 || l.Done <= l.StartDone {
		return 0
	}
	return float64(l.Done-l.StartDone) / el
}

// liveFile is the file of the run whose journal is jpath.
func liveFile(dir, jpath string) string {
	if abs, err := filepath.Abs(jpath); err == nil {
		jpath = abs
	}
	sum := sha256.Sum256([]byte(filepath.Clean(jpath)))
	return filepath.Join(dir, hex.EncodeToString(sum[:12])+".json")
}

// readLive returns the position a live process publishes for the journal
// jpath, or nil if none does.
func readLive(dir, jpath string) *liveProgress {
	if dir == "" {
		return nil
	}
	return readLiveFile(liveFile(dir, jpath))
}

// readLiveFile parses one published position; nil if the file is not
// one, or its process is gone.
func readLiveFile(path string) *liveProgress {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	var l liveProgress
	if json.Unmarshal(b, &l) != nil || l.PID <= 0 {
		return nil
	}
	if err := unix.Kill(l.PID, 0); err != nil && !errors.Is(err, unix.EPERM) {
		return nil // left by a process that is gone
	}
	return &l
}

// liveRuns returns the runs live processes publish, sorted by journal.
// Status and resume find a running conversion by them even when its
// journal is not in the journal directory (--journal elsewhere).
func (a *app) liveRuns() []*liveProgress {
	if a.liveDir == "" {
		return nil
	}
	paths, _ := filepath.Glob(filepath.Join(a.liveDir, "*.json"))
	var out []*liveProgress
	for _, p := range paths {
		if l := readLiveFile(p); l != nil && l.Journal != "" {
			out = append(out, l)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Journal < out[j].Journal })
	return out
}

// publishedProgress passes events on to the display and publishes the
// position.
type publishedProgress struct {
	progress
	mu    sync.Mutex
	path  string
	l     liveProgress
	last  time.Time
	every time.Duration
	wrote bool // this process wrote the file (so removes it)
}

// publish wraps pr so that the run of device whose journal is jpath
// publishes its position in a.liveDir (nothing if that is empty or
// cannot be made).
func (a *app) publish(pr progress, jpath, command, device string) progress {
	if a.liveDir == "" || jpath == "" {
		return pr
	}
	if err := os.MkdirAll(a.liveDir, 0o755); err != nil {
		return pr
	}
	abs, err := filepath.Abs(jpath)
	if err != nil {
		abs = jpath
	}
	return &publishedProgress{progress: pr, path: liveFile(a.liveDir, jpath), every: 500 * time.Millisecond,
		l: liveProgress{PID: os.Getpid(), Journal: abs, Command: command, Device: device}}
}

func (p *publishedProgress) Event(ev convert.Event) {
	p.progress.Event(ev)
	p.mu.Lock()
	defer p.mu.Unlock()
	if ev.Kind == convert.EventMessage {
		return
	}
	if p.l.Started.IsZero() {
		p.l.Started, p.l.StartDone = ev.Time, ev.Done
	}
	if ev.Kind == convert.EventPhase {
		p.l.Phase = convert.DescribePhaseString(ev.Phase)
	}
	p.l.Done, p.l.Total, p.l.Updated = ev.Done, ev.Total, ev.Time
	if ev.Kind == convert.EventChunk && ev.Time.Sub(p.last) < p.every {
		return
	}
	p.last = ev.Time
	b, err := json.Marshal(&p.l)
	if err != nil {
		return
	}
	// Best effort: the run never fails for its status file.
	tmp := p.path + ".tmp"
	if os.WriteFile(tmp, append(b, '\n'), 0o644) == nil {
		if os.Rename(tmp, p.path) == nil {
			p.wrote = true
		} else {
			os.Remove(tmp)
		}
	}
}

func (p *publishedProgress) finish(ok bool) {
	p.progress.finish(ok)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.wrote {
		// (A process that failed before its first event, say on a run
		// another process holds, leaves that one's file alone.)
		os.Remove(p.path)
	}
}
