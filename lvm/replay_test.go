package lvm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"

	"github.com/dmconvert/dmconvert/dmtable"
)

// A replay plays back one scene recorded by the guest tests
// (testdata/replay/<scene>, written by the recorder in guest_test.go
// from real lvm 2.03.16 runs in the test VM): every lvm command, device
// stat and label read, in the order the Client made them. The fake
// hooks check that the Client under test makes the same calls with the
// same arguments, in the same order, and answer with what lvm and the
// devices answered then. done() checks that nothing was left unplayed.
type replay struct {
	t      *testing.T
	dir    string
	events []replayEvent
	pos    int
	config string // the --config of the recorded commands
}

type replayEvent struct {
	kind string // "lvm", "stat", "label"
	base string // path without the extension
}

func loadReplay(t *testing.T, scene string) *replay {
	t.Helper()
	dir := filepath.Join("testdata", "replay", scene)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	r := &replay{t: t, dir: dir}
	seen := map[string]bool{}
	for _, e := range ents {
		name := e.Name()
		num, rest, ok := strings.Cut(name, "-")
		if !ok || len(num) != 3 {
			continue // extra files (devices-before)
		}
		kind := strings.SplitN(rest, ".", 2)[0]
		base := filepath.Join(dir, num+"-"+kind)
		if seen[base] {
			continue
		}
		seen[base] = true
		r.events = append(r.events, replayEvent{kind: kind, base: base})
	}
	sort.Slice(r.events, func(i, j int) bool { return r.events[i].base < r.events[j].base })
	for _, e := range r.events {
		if e.kind == "lvm" {
			args := r.lines(e.base + ".args")
			for i := range args {
				if args[i] == "--config" {
					r.config = args[i+1]
				}
			}
			break
		}
	}
	return r
}

func (r *replay) read(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		r.t.Fatal(err)
	}
	return string(b)
}

func (r *replay) lines(path string) []string {
	return strings.Split(strings.TrimSuffix(r.read(path), "\n"), "\n")
}

func (r *replay) next(kind, what string) replayEvent {
	r.t.Helper()
	if r.pos >= len(r.events) {
		r.t.Fatalf("replay %s: unexpected %s %s after the last recorded event", r.dir, kind, what)
	}
	e := r.events[r.pos]
	r.pos++
	if e.kind != kind {
		r.t.Fatalf("replay %s: %s %s, but the recording has %s next (%s)", r.dir, kind, what, e.kind, e.base)
	}
	return e
}

// client returns a Client with the recorded config whose hooks replay
// the scene; set Devices or Env on it as the guest test did.
func (r *replay) client() *Client {
	c := &Client{Config: r.config}
	c.exec = func(ctx context.Context, argv, env []string) ([]byte, []byte, int, error) {
		e := r.next("lvm", strings.Join(argv, " "))
		want := r.lines(e.base + ".args")
		if strings.Join(argv, "\x00") != strings.Join(want, "\x00") {
			r.t.Fatalf("replay %s: command\n  %q\nwas recorded as\n  %q", e.base, argv, want)
		}
		code, err := strconv.Atoi(strings.TrimSpace(r.read(e.base + ".rc")))
		if err != nil {
			r.t.Fatal(err)
		}
		var xerr error
		if code < 0 {
			xerr = fmt.Errorf("signal (recorded)")
		}
		return []byte(r.read(e.base + ".stdout")), []byte(r.read(e.base + ".stderr")), code, xerr
	}
	c.statDev = func(path string) (dmtable.Dev, error) {
		e := r.next("stat", path)
		l := r.lines(e.base + ".txt")
		if l[0] != path {
			r.t.Fatalf("replay %s: stat %s, recorded stat %s", e.base, path, l[0])
		}
		if msg, ok := strings.CutPrefix(l[1], "error "); ok {
			return dmtable.Dev{}, fmt.Errorf("%s", msg)
		}
		var d dmtable.Dev
		if _, err := fmt.Sscanf(l[1], "%d:%d", &d.Major, &d.Minor); err != nil {
			r.t.Fatal(err)
		}
		return d, nil
	}
	c.readLabel = func(path string) (*Label, error) {
		e := r.next("label", path)
		if got := strings.TrimSpace(r.read(e.base + ".path")); got != path {
			r.t.Fatalf("replay %s: label of %s, recorded %s", e.base, path, got)
		}
		if b, err := os.ReadFile(e.base + ".err"); err == nil {
			return nil, fmt.Errorf("reading LVM label of %s: %s", path, strings.TrimSpace(string(b)))
		}
		l, err := ParseLabel([]byte(r.read(e.base + ".bin")))
		if err != nil {
			return nil, fmt.Errorf("%s: %w", path, err)
		}
		return l, nil
	}
	return c
}

func (r *replay) done() {
	r.t.Helper()
	if r.pos != len(r.events) {
		r.t.Errorf("replay %s: %d recorded events not replayed, next %s", r.dir, len(r.events)-r.pos, r.events[r.pos].base)
	}
}
