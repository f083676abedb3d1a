package convert

import (
	"errors"
	"fmt"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"github.com/dmconvert/dmconvert/dmtable"
)

// A plan's transient devices (the cipher probe, the old-key check) live
// from a create to a remove a few milliseconds later. A plan killed in
// between leaves one behind: a private device that, for a key check, is a
// crypt mapping of the disk holding it open. Their names and dm UUIDs
// carry the planning process's PID, so the next plan removes the ones
// whose process is gone and leaves another running plan's alone.

// transientDevice returns the name and dm UUID of run id's transient
// device of kind ("probe", "keycheck").
func transientDevice(id, kind string) (name, uuid string) {
	tag := fmt.Sprintf("%s-pid%d", id, os.Getpid())
	return helperNamePrefix + tag + "-" + kind, helperUUID(tag, BackingID(kind))
}

var transientRE = regexp.MustCompile(`^` + helperUUIDPrefix + `[0-9a-f]+-pid([0-9]+)-(probe|keycheck)$`)

// transientPID returns the PID in a transient device's dm UUID.
func transientPID(uuid string) (int, bool) {
	m := transientRE.FindStringSubmatch(uuid)
	if m == nil {
		return 0, false
	}
	pid, err := strconv.Atoi(m[1])
	return pid, err == nil && pid > 0
}

// Processes is implemented by hosts that can tell whether a process
// exists.
type Processes interface {
	ProcessExists(pid int) bool
}

// dropStaleTransients removes the transient devices of plans whose
// process no longer exists. (dm devices do not outlive a boot, so a PID
// reused since can only make it keep a stale one.) A removal that fails
// (the device is open) is left for a later plan: findMapping never takes
// a dmconvert device for the user's mapping.
func (e *Engine) dropStaleTransients() {
	h, ok := e.Host.(Processes)
	if !ok {
		return
	}
	list, err := e.DM.List()
	if err != nil {
		return
	}
	for _, d := range list {
		if pid, ok := transientPID(d.UUID); ok && pid != os.Getpid() && !h.ProcessExists(pid) {
			_ = e.DM.Remove(d.Name)
		}
	}
}

// runHelpers returns the names, sorted, of the run helpers for which uses
// reports true.
func (e *Engine) runHelpers(uses func(d DevInfo) (bool, error)) ([]string, error) {
	list, err := e.DM.List()
	if err != nil {
		return nil, fmt.Errorf("listing device-mapper devices: %w", err)
	}
	var ours []string
	for _, d := range list {
		if !isRunHelper(d) {
			continue
		}
		if ok, err := uses(d); err != nil {
			return nil, err
		} else if ok {
			ours = append(ours, d.Name)
		}
	}
	slices.Sort(ours)
	return ours, nil
}

// DiskLocks is implemented by hosts that can tell, without taking it,
// which process holds a disk's run lock (Host.Lock).
type DiskLocks interface {
	LockHolder(disk dmtable.Dev) (pid int, held bool)
}

// refuseLocked refuses, as busy, a disk whose run lock another process
// holds: a dmconvert run is going on there. A plan says so before it
// shows itself or asks for a passphrase, rather than at the run's start,
// and rather than calling the running run's devices a stopped run's.
func (e *Engine) refuseLocked(disk dmtable.Dev, path string) error {
	dl, ok := e.Host.(DiskLocks)
	if !ok {
		return nil
	}
	if pid, held := dl.LockHolder(disk); held && pid != os.Getpid() {
		return busy(path, "dmconvert process %d is working on it", pid)
	}
	return nil
}

// refuseRunsDisk refuses a disk that a dmconvert run's devices use: a run
// stopped or killed mid-way, whose journal may be elsewhere. Without it
// the plan would refuse for a reason the run's state shows (the disk's
// label hidden, its mapping a mirror), not the run.
func (e *Engine) refuseRunsDisk(disk dmtable.Dev, path string) error {
	ours, err := e.runHelpers(func(d DevInfo) (bool, error) {
		deps, err := e.DM.Deps(d.Name)
		if errors.Is(err, ErrNoDevice) {
			return false, nil
		}
		if err != nil {
			return false, fmt.Errorf("reading the dependencies of %s: %w", d.Name, err)
		}
		return slices.Contains(deps, disk), nil
	})
	if err != nil || ours == nil {
		return err
	}
	return refuse(path, "run dmconvert status, then resume or abort that run", "a dmconvert run's devices use it: %s", strings.Join(ours, ", "))
}

// refuseRunsMapping refuses mapping name when its table uses a dmconvert
// run's devices: the run's F, the mapping a run stopped or killed mid-way
// left restacked onto its helpers.
func (e *Engine) refuseRunsMapping(name string) error {
	deps, err := e.DM.Deps(name)
	if err != nil {
		return fmt.Errorf("reading the dependencies of %s: %w", name, err)
	}
	ours, err := e.runHelpers(func(d DevInfo) (bool, error) { return slices.Contains(deps, d.Dev), nil })
	if err != nil || ours == nil {
		return err
	}
	// The run's disk is under its helpers: a process may be running it.
	for _, h := range ours {
		hdeps, err := e.DM.Deps(h)
		if err != nil {
			continue
		}
		for _, d := range hdeps {
			if err := e.refuseLocked(d, name); err != nil {
				return err
			}
		}
	}
	return refuse(name, "run dmconvert status, then resume or abort that run", "a dmconvert run is converting it (its devices: %s)", strings.Join(ours, ", "))
}

// refuseRunsHeader refuses a disk that starts with the LUKS header of a
// dmconvert run in progress: after a reboot mid-run the run's devices are
// gone and the disk shows the run's checkpoint, which names its journal.
// (An encrypt asks when LVM finds no physical volume on the disk, which
// it would otherwise report.) A disk whose start is anything else is left
// to the other checks.
func (e *Engine) refuseRunsHeader(path string) error {
	disk, err := e.Host.OpenDisk(path)
	if err != nil {
		return fmt.Errorf("opening %s: %w", path, err)
	}
	defer disk.Close()
	cp, _, err := DiskCheckpoint(disk)
	if err != nil {
		return nil
	}
	journal := ""
	if cp.Journal != "" {
		journal = ", journal " + cp.Journal
	}
	return refuse(path, "run dmconvert status "+path+", then resume or abort that run",
		"a dmconvert %s (run %s%s) is in progress on it: its LUKS header carries the run's checkpoint", cp.Op, cp.Run, journal)
}
