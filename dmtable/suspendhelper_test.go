//go:build linux

package dmtable

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// The suspend helper's protocol, without a kernel: what the child answers
// for a suspend that works and for ones that fail, and what the parent's
// Suspend makes of it (the errno's sentinel and the detail survive).
func TestSuspendHelperProtocol(t *testing.T) {
	var asked []string
	suspend := func(name string, f SuspendFlags) (Info, error) {
		asked = append(asked, fmt.Sprintf("%s/%d", name, f))
		switch name {
		case "gone":
			return Info{}, &OpError{Op: "suspend", Device: name, Err: unix.ENXIO}
		case "bad":
			return Info{}, &OpError{Op: "suspend", Device: name, Err: fmt.Errorf("bad name: %w", unix.EINVAL)}
		case "odd":
			return Info{}, errors.New("no errno here")
		}
		return Info{Name: name, Dev: Dev{Major: 253, Minor: 7}, Suspended: true}, nil
	}
	reqR, reqW := io.Pipe()
	repR, repW := io.Pipe()
	done := make(chan int, 1)
	go func() { done <- serveSuspendHelper(reqR, repW, suspend); repW.Close() }()
	enc, dec := json.NewEncoder(reqW), json.NewDecoder(bufio.NewReader(repR))
	var ready suspendReply
	if err := dec.Decode(&ready); err != nil || ready.Msg != "" || ready.Errno != 0 {
		t.Fatalf("ready line: %+v, %v", ready, err)
	}
	ask := func(name string, f SuspendFlags) (Info, error) {
		t.Helper()
		if err := enc.Encode(suspendRequest{Name: name, Flags: f}); err != nil {
			t.Fatal(err)
		}
		var rep suspendReply
		if err := dec.Decode(&rep); err != nil {
			t.Fatal(err)
		}
		return rep.result(name)
	}

	info, err := ask("vg-lv", NoFlush|SkipLockfs)
	if err != nil || info.Name != "vg-lv" || info.Dev != (Dev{253, 7}) || !info.Suspended {
		t.Fatalf("a suspend that works: %+v, %v", info, err)
	}
	_, err = ask("gone", 0)
	var op *OpError
	if !errors.Is(err, ErrNotFound) || !errors.Is(err, unix.ENXIO) || !errors.As(err, &op) || op.Op != "suspend" || op.Device != "gone" {
		t.Fatalf("ENXIO: %v", err)
	}
	_, err = ask("bad", 0)
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "bad name") || err.Error() != "dm suspend bad: bad name: invalid argument" {
		t.Fatalf("EINVAL with detail: %q", err)
	}
	_, err = ask("odd", 0)
	var errno unix.Errno
	if err == nil || errors.As(err, &errno) || !strings.Contains(err.Error(), "no errno here") {
		t.Fatalf("a failure without an errno: %v", err)
	}
	reqW.Close()
	if rc := <-done; rc != 0 {
		t.Fatalf("the helper ended with %d at the end of its input", rc)
	}
	if want := fmt.Sprintf("vg-lv/%d gone/0 bad/0 odd/0", NoFlush|SkipLockfs); strings.Join(asked, " ") != want {
		t.Fatalf("suspended %q, want %q", asked, want)
	}
}
