package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"

	"github.com/dmconvert/dmconvert/convert"
	"github.com/dmconvert/dmconvert/journal"
	"github.com/dmconvert/dmconvert/lvm"
)

// diskView is what the start of a disk says about a run.
type diskView struct {
	Path     string `json:"path"`
	Identity string `json:"identity"`
	// Checkpoint is the run position recorded in a LUKS header of a run
	// in progress (LUKS2 token, LUKS1 record).
	Checkpoint *convert.Checkpoint `json:"checkpoint,omitempty"`
	// PVUUID is the PV UUID of an LVM label.
	PVUUID string `json:"pv_uuid,omitempty"`
	Error  string `json:"error,omitempty"`
	// journal is where the disk says the journal is.
	journal string
}

// readDisk reads the start of a disk (or image file): a LUKS header of a
// run in progress names its journal in its checkpoint; an LVM label gives
// the PV UUID, whose journal is <journal dir>/<pv uuid>.journal.
func (a *app) readDisk(path string) (*diskView, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", path, err)
	}
	defer f.Close()
	dv := &diskView{Path: path}
	cp, id, err := convert.DiskCheckpoint(f)
	dv.Identity = id.String()
	switch {
	case err == nil:
		dv.Checkpoint = &cp
		dv.journal = cp.Journal
	case id == convert.IdentityLVM:
		head := make([]byte, 4096)
		if _, err := f.ReadAt(head, 0); err != nil && !errors.Is(err, io.EOF) {
			return nil, fmt.Errorf("reading the start of %s: %w", path, err)
		}
		l, err := lvm.ParseLabel(head)
		if err != nil {
			dv.Error = err.Error()
			break
		}
		dv.PVUUID = l.UUID
		dv.journal = filepath.Join(a.journalDir, l.UUID+".journal")
	case errors.Is(err, convert.ErrNoCheckpoint):
	default:
		dv.Error = err.Error()
	}
	return dv, nil
}

// journalEntry is one journal found in the journal directory.
type journalEntry struct {
	path   string
	info   *convert.RunInfo // nil when locked
	locked bool             // a running dmconvert holds it
}

func (e journalEntry) unfinished() bool { return e.locked || !e.info.Finished() }

// scanJournals reads every journal in the journal directory. Journals
// without a run (a run refused before it began) are skipped.
func (a *app) scanJournals() ([]journalEntry, error) {
	paths, err := filepath.Glob(filepath.Join(a.journalDir, "*.journal"))
	if err != nil {
		return nil, err
	}
	sort.Strings(paths)
	var out []journalEntry
	for _, p := range paths {
		ri, err := convert.InspectJournal(p, a.statusLockTimeout)
		switch {
		case errors.Is(err, journal.ErrLocked):
			out = append(out, journalEntry{path: p, locked: true})
		case err != nil:
			continue
		default:
			out = append(out, journalEntry{path: p, info: ri})
		}
	}
	return out, nil
}

// sameDevice reports whether two paths name the same block device (or
// the same file).
func sameDevice(x, y string) bool {
	if x == y {
		return true
	}
	var sx, sy syscall.Stat_t
	if syscall.Stat(x, &sx) != nil || syscall.Stat(y, &sy) != nil {
		return false
	}
	if sx.Mode&syscall.S_IFMT == syscall.S_IFBLK && sy.Mode&syscall.S_IFMT == syscall.S_IFBLK {
		return sx.Rdev == sy.Rdev
	}
	return sx.Dev == sy.Dev && sx.Ino == sy.Ino
}

// locateRun finds the journal of the run to resume or abort: --journal;
// else what DEVICE's start names, else a journal in the journal directory
// recording DEVICE; with neither, the only unfinished journal there.
func (a *app) locateRun(device, journalFlag string) (string, error) {
	if journalFlag != "" {
		return journalFlag, nil
	}
	if device != "" {
		dv, err := a.readDisk(device)
		if err != nil {
			return "", err
		}
		if dv.journal != "" {
			if _, err := os.Stat(dv.journal); err == nil {
				return dv.journal, nil
			}
		}
		entries, err := a.scanJournals()
		if err != nil {
			return "", err
		}
		var match, locked []string
		for _, e := range entries {
			switch {
			case e.locked:
				locked = append(locked, e.path)
			case !e.info.Finished() && sameDevice(e.info.Device, device):
				match = append(match, e.path)
			}
		}
		switch {
		case len(match) == 1:
			return match[0], nil
		case len(match) > 1:
			return "", usagef("several unfinished runs record %s: %s; name one with --journal", device, strings.Join(match, ", "))
		case len(locked) > 0:
			return "", fmt.Errorf("no journal found for %s, and %s in use by another dmconvert: %w", device, strings.Join(locked, ", "), journal.ErrLocked)
		}
		for _, l := range a.liveRuns() {
			if sameDevice(l.Device, device) {
				return "", fmt.Errorf("%s: dmconvert %s (process %d, journal %s) is running this conversion (dmconvert status shows how far it is): %w",
					device, l.Command, l.PID, l.Journal, journal.ErrLocked)
			}
		}
		what := dv.Identity
		if dv.journal != "" {
			what += fmt.Sprintf("; its journal would be %s, which does not exist", dv.journal)
		}
		return "", usagef("no unfinished dmconvert run found for %s (it carries %s); give the journal with --journal", device, what)
	}
	entries, err := a.scanJournals()
	if err != nil {
		return "", err
	}
	var unfinished []string
	for _, e := range entries {
		if e.unfinished() {
			unfinished = append(unfinished, e.path)
		}
	}
	for _, l := range a.liveRuns() {
		if !containsSameFile(unfinished, l.Journal) {
			unfinished = append(unfinished, l.Journal)
		}
	}
	switch len(unfinished) {
	case 0:
		return "", usagef("no unfinished dmconvert run in %s; name the DEVICE or --journal", a.journalDir)
	case 1:
		return unfinished[0], nil
	}
	return "", usagef("several unfinished runs in %s: %s; name the DEVICE or --journal", a.journalDir, strings.Join(unfinished, ", "))
}
