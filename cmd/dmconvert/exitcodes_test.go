package main

import (
	"errors"
	"fmt"
	"regexp"
	"strings"
	"testing"

	"github.com/dmconvert/dmconvert/convert"
	"github.com/dmconvert/dmconvert/journal"
	"github.com/dmconvert/dmconvert/luks"
)

// The values are a contract with scripts and the guest end-to-end tests.
func TestExitCodeValues(t *testing.T) {
	for _, c := range []struct {
		got, want int
		name      string
	}{
		{exitOK, 0, "ok"}, {exitFailed, 1, "failed"}, {exitRefused, 2, "refused"}, {exitPassphrase, 3, "passphrase"},
		{exitBusy, 4, "busy"}, {exitInterrupted, 5, "interrupted"}, {exitFailpoint, 113, "failpoint"},
	} {
		if c.got != c.want {
			t.Errorf("exit code %s is %d, want %d", c.name, c.got, c.want)
		}
	}
}

func TestExitCodeMapping(t *testing.T) {
	refusal := &convert.RefusalError{Device: "/dev/vda", Reason: "the PV ends 10 sectors short"}
	for _, c := range []struct {
		err  error
		want int
	}{
		{nil, 0},
		{errors.New("loading the table of vda_crypt: device or resource busy"), 1},
		{refusal, 2},
		{fmt.Errorf("planning: %w", refusal), 2},
		{usagef("--type luks3: use luks2 or luks1"), 2},
		{fmt.Errorf("reading the passphrase: %w", luks.ErrKeyInput), 2},
		{fmt.Errorf("journal /x: %w", journal.ErrNotFound), 2},
		{fmt.Errorf("unlocking the header of /dev/vda: %w", convert.ErrWrongPassphrase), 3},
		{fmt.Errorf("x: %w", luks.ErrWrongPassphrase), 3},
		{fmt.Errorf("journal /x is in use: %w", journal.ErrLocked), 4},
		{&convert.RefusalError{Device: "/dev/vda", Reason: "another dmconvert process is working on it", Err: convert.ErrBusy}, 4},
		{convert.ErrInterrupted, 5},
		{fmt.Errorf("run: %w", convert.ErrInterrupted), 5},
	} {
		if got := exitCode(c.err); got != c.want {
			t.Errorf("exitCode(%v) = %d, want %d", c.err, got, c.want)
		}
	}
}

func TestHelpListsExitCodes(t *testing.T) {
	ta := newTestApp(t)
	ta.mustRun(exitOK, "--help")
	help := ta.out.String()
	if !strings.Contains(help, "Exit codes:") {
		t.Fatalf("no exit code section:\n%s", help)
	}
	for _, c := range []struct {
		code int
		word string
	}{{0, "done"}, {1, "failed"}, {2, "refused"}, {3, "wrong passphrase"}, {4, "busy"}, {5, "interrupted"}, {113, "failpoint"}} {
		re := regexp.MustCompile(fmt.Sprintf(`(?m)^\s+%d\s+.*%s`, c.code, regexp.QuoteMeta(c.word)))
		if !re.MatchString(help) {
			t.Errorf("help does not list exit code %d (%s):\n%s", c.code, c.word, help)
		}
	}
	for _, cmd := range []string{"encrypt", "resume", "abort", "status"} {
		if !strings.Contains(help, "  "+cmd+" ") {
			t.Errorf("help does not list command %s", cmd)
		}
	}
}

func TestCobraErrorsAreUsageErrors(t *testing.T) {
	ta := newTestApp(t)
	for _, args := range [][]string{
		{"frobnicate"},
		{"encrypt"},
		{"encrypt", "a", "b"},
		{"encrypt", "--no-such-flag", "/dev/vda"},
		{"status", "a", "b"},
		{"resume", "--keyfile-offset", "x"},
	} {
		ta.mustRun(exitRefused, args...)
		e := ta.err.String()
		if !strings.HasPrefix(e, "dmconvert: ") || strings.Count(e, "dmconvert: ") != 1 {
			t.Errorf("%v: error not printed once with the prefix: %q", args, e)
		}
	}
}
