package main

import (
	"errors"
	"fmt"
	"strings"

	"github.com/dmconvert/dmconvert/convert"
	"github.com/dmconvert/dmconvert/journal"
	"github.com/dmconvert/dmconvert/luks"
)

// Exit codes: the one place they are defined. exitCodeHelp lists them in
// `dmconvert --help`.
const (
	exitOK          = 0 // done
	exitFailed      = 1 // failed; the state is kept: resume or abort
	exitRefused     = 2 // refused or bad input; nothing was written
	exitPassphrase  = 3 // wrong passphrase or key file
	exitBusy        = 4 // another dmconvert holds the disk or the journal
	exitInterrupted = 5 // stopped at a safe point by a signal; resumable
	exitFailpoint   = convert.FailpointExitCode
)

var exitCodeHelp = []struct {
	code int
	text string
}{
	{exitOK, "done"},
	{exitFailed, "failed; the conversion's state is kept: run `dmconvert resume` or `dmconvert abort`"},
	{exitRefused, "refused or bad input (flags, device, plan); nothing was written"},
	{exitPassphrase, "wrong passphrase or key file"},
	{exitBusy, "busy: another dmconvert works on this disk or holds its journal"},
	{exitInterrupted, "interrupted by SIGINT/SIGTERM at a safe point; run `dmconvert resume` or `dmconvert abort`"},
	{exitFailpoint, "test builds only (-tags failpoints): the process stopped at a failpoint"},
}

func exitCodesText() string {
	var b strings.Builder
	b.WriteString("Exit codes:\n")
	for _, e := range exitCodeHelp {
		fmt.Fprintf(&b, "  %3d  %s\n", e.code, e.text)
	}
	return b.String()
}

// usageError is bad input found by the command line itself (flags,
// arguments, an unconfirmed operation).
type usageError struct{ msg string }

func (e *usageError) Error() string { return e.msg }

func usagef(format string, args ...any) error {
	return &usageError{msg: fmt.Sprintf(format, args...)}
}

// exitCode maps an error to the process exit code.
func exitCode(err error) int {
	var ue *usageError
	var re *convert.RefusalError
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, convert.ErrInterrupted):
		return exitInterrupted
	case errors.Is(err, convert.ErrWrongPassphrase), errors.Is(err, luks.ErrWrongPassphrase):
		return exitPassphrase
	case convert.IsBusy(err):
		return exitBusy
	case errors.As(err, &ue), errors.As(err, &re), errors.Is(err, luks.ErrKeyInput), errors.Is(err, journal.ErrNotFound):
		return exitRefused
	}
	return exitFailed
}

// outcome names an exit code in JSON results.
func outcome(code int) string {
	switch code {
	case exitOK:
		return "done"
	case exitRefused:
		return "refused"
	case exitPassphrase:
		return "wrong-passphrase"
	case exitBusy:
		return "busy"
	case exitInterrupted:
		return "interrupted"
	}
	return "failed"
}
