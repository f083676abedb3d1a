package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	// A write to a closed pipe on standard output or error (the ssh
	// session or the pager that read it went away) returns an error
	// instead of killing the process wherever it is, possibly between a
	// suspend and its resume. SIGHUP stops a run at its next safe point
	// (root.go, stopper).
	signal.Notify(make(chan os.Signal, 1), syscall.SIGPIPE)
	os.Exit(run(os.Args[1:]))
}
