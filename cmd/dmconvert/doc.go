// Command dmconvert changes how a live block device is encrypted while it is
// in use. This package is the command line only: cobra commands, the
// progress bar, --json output and exit codes. All logic lives in the
// library packages (convert, luks, lvm, journal, dmtable).
//
// # Commands
//
//	dmconvert encrypt DEVICE   LVM PV -> LVM on LUKS, in place, online
//	dmconvert status [DEVICE]  where a run is (no passphrase; works while it runs)
//	dmconvert resume [DEVICE]  continue an interrupted run (or abort)
//	dmconvert abort [DEVICE]   walk an interrupted run back to plaintext, online
//
// encrypt takes cryptsetup's names where they overlap (--type, --cipher,
// --key-size, --sector-size, --key-file, --keyfile-offset, --keyfile-size,
// --pbkdf, --pbkdf-memory, --pbkdf-parallel, --pbkdf-force-iterations,
// --iter-time, --hash, --label, --subsystem, --uuid, --header-size,
// --batch-mode/-q) plus dmconvert's own (--name, --journal, --chunk-size,
// --region-size, --dry-run, --yes, --crypttab, --crypttab-file,
// --shrink-pv). --json and --quiet are global.
//
// resume, abort and status find the run from --journal; else from DEVICE
// (a LUKS header of a run in progress names its journal in its dmconvert
// checkpoint; an LVM label's PV UUID gives /var/lib/dmconvert/<uuid>.journal;
// else a journal in /var/lib/dmconvert recording DEVICE); with no argument,
// the only unfinished journal in /var/lib/dmconvert.
//
// # Structure
//
// Every cobra RunE is one call into an app method (runEncrypt, runResume,
// runAbort, runStatus) that tests call in-process with an app built around
// buffers and a fake machine (restic style). Errors are printed once, by
// app.main, as "dmconvert: <error>", followed by what to do next when a
// journal holds the state. Exit codes are defined in exitcodes.go and
// listed by `dmconvert --help`: 0 done, 1 failed (state kept), 2 refused
// or bad input (nothing written), 3 wrong passphrase, 4 busy, 5
// interrupted (resumable), 113 a failpoint of a test build.
//
// # Output
//
// On a terminal a progress bar (bytes copied of the total, rate, ETA, the
// phase); with --json one JSON object per engine event and a final
// {"result": {...}}; with --quiet nothing but errors; otherwise a line per
// phase and a progress line at most every 10 s.
//
// # Signals and process hygiene
//
// The first SIGINT or SIGTERM asks the engine to stop at the next step
// boundary (it commits a resumable state; exit 5); later ones only say
// that the current step is finishing. Before encrypt, resume or abort run
// (not for status or --dry-run), the process re-executes itself from a
// sealed memfd copy of its executable (design.md section 4, invariant 6),
// so no page of the binary is read from a file system that may sit on the
// stack being suspended; DMCONVERT_MEMFD=1 marks the re-executed process.
package main
