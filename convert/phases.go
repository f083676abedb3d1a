package convert

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/dmconvert/dmconvert/dmtable"
)

// helperUUID is the dm UUID of a private device of run id.
func helperUUID(id string, b BackingID) string { return helperUUIDPrefix + id + "-" + string(b) }

// The dm UUIDs and names of a run's helpers (and its transient probe and
// key-check devices) start with these.
const (
	helperUUIDPrefix = "DMCONVERT-"
	helperNamePrefix = "dmconvert-"
)

// isRunHelper reports whether d is a run's helper (head, new or old), not
// a plan's transient cipher probe or key check: its dm UUID is helperUUID's.
func isRunHelper(d DevInfo) bool {
	if !strings.HasPrefix(d.UUID, helperUUIDPrefix) {
		return false
	}
	switch BackingID(d.UUID[strings.LastIndexByte(d.UUID, '-')+1:]) {
	case HeadID, NewID, OldID:
		return true
	}
	return false
}

// helperTable is the table of a private crypt device: the whole device as
// one crypt target over the disk at the device's place.
func (r *run) helperTable(id BackingID) (dmtable.Table, error) {
	d, ok := r.plan.Geometry.device(id)
	if !ok {
		return nil, fmt.Errorf("internal error: no geometry for helper %q", id)
	}
	kid := id
	if id == HeadID {
		// The head keeps the source's encryption (IV = F's sector).
		kid = OldID
	}
	key, ok := r.keys[kid]
	if !ok {
		return nil, fmt.Errorf("internal error: no key for helper %q", id)
	}
	switch id {
	case HeadID:
		return dmtable.Table{cryptTarget(0, d.Size, r.spec.OldCrypt, key, 0, r.spec.Disk.Dev, d.Phys)}, nil
	case NewID:
		return dmtable.Table{cryptTarget(0, d.Size, r.spec.Crypt, key, 0, r.spec.Disk.Dev, d.Phys)}, nil
	case OldID:
		return dmtable.Table{cryptTarget(0, d.Size, r.spec.OldCrypt, key, 0, r.spec.Disk.Dev, d.Phys)}, nil
	}
	return nil, fmt.Errorf("internal error: no table for helper %q", id)
}

// ensureHelpers creates the private devices that do not exist and checks
// the ones that do.
func (r *run) ensureHelpers() error {
	ids := make([]string, 0, len(r.spec.Helpers))
	for id := range r.spec.Helpers {
		ids = append(ids, string(id))
	}
	sort.Strings(ids)
	for _, s := range ids {
		id := BackingID(s)
		name := r.spec.Helpers[id]
		want, err := r.helperTable(id)
		if err != nil {
			return err
		}
		info, err := r.e.DM.Info(name)
		switch {
		case errors.Is(err, ErrNoDevice):
			info, err = r.e.DM.Create(name, helperUUID(r.spec.ID, id), want)
			if err != nil {
				return fmt.Errorf("creating %s: %w", name, err)
			}
		case err != nil:
			return fmt.Errorf("looking up %s: %w", name, err)
		default:
			if info.UUID != helperUUID(r.spec.ID, id) {
				return fmt.Errorf("device %s exists but does not belong to run %s (uuid %q); remove it or pick another --name", name, r.spec.ID, info.UUID)
			}
			got, err := r.e.DM.Table(name)
			if err != nil {
				return fmt.Errorf("reading the table of %s: %w", name, err)
			}
			if !got.Equal(want) {
				// A helper's table follows from the run and its key alone.
				// If the live one differs, the key we hold is not the
				// key the data was written with (or the device is not
				// ours): replacing the table would make every converted
				// sector unreadable.
				return fmt.Errorf("the live device %s does not match run %s (its table, key included, differs from the one this run computes): refusing to touch it; check the passphrase/key file and the journal", name, r.spec.ID)
			} else if info.Suspended {
				if err := r.e.DM.Resume(name); err != nil {
					return fmt.Errorf("resuming %s: %w", name, err)
				}
			}
		}
		r.devs[id] = info.Dev
	}
	return nil
}

// ensureF creates F with the table of the current state, or, when it
// exists (a process crash), reloads that table and resumes it.
func (r *run) ensureF() error {
	t, err := r.plan.tableFor(r.st, nil, r.devs, r.e.RegionSize)
	if err != nil {
		return err
	}
	info, err := r.e.DM.Info(r.spec.Name)
	switch {
	case errors.Is(err, ErrNoDevice):
		info, err = r.e.DM.Create(r.spec.Name, "", t)
		if err != nil {
			return fmt.Errorf("creating %s: %w", r.spec.Name, err)
		}
	case err != nil:
		return fmt.Errorf("looking up %s: %w", r.spec.Name, err)
	default:
		if _, err := r.swap(r.spec.Name, t, nil); err != nil {
			return err
		}
	}
	r.fdev = info.Dev
	return nil
}

func (r *run) doSetup(ctx context.Context) error {
	next := r.plan.Advance(r.st)
	seq, err := r.intend("setup", 0, 0)
	if err != nil {
		return err
	}
	if err := r.ensureHelpers(); err != nil {
		return err
	}
	if err := r.ensureF(); err != nil {
		return err
	}
	return r.commit(seq, next)
}

// users returns the dm devices (other than F and the helpers) whose live
// table uses dev.
func (r *run) users(dev dmtable.Dev) ([]string, error) {
	list, err := r.e.DM.List()
	if err != nil {
		return nil, fmt.Errorf("listing device-mapper devices: %w", err)
	}
	own := map[string]bool{r.spec.Name: true}
	for _, n := range r.spec.Helpers {
		own[n] = true
	}
	var out []string
	for _, d := range list {
		if own[d.Name] {
			continue
		}
		deps, err := r.e.DM.Deps(d.Name)
		if err != nil {
			if errors.Is(err, ErrNoDevice) {
				continue
			}
			return nil, fmt.Errorf("reading the dependencies of %s: %w", d.Name, err)
		}
		for _, x := range deps {
			if x == dev {
				out = append(out, d.Name)
				break
			}
		}
	}
	sort.Strings(out)
	return out, nil
}

// restackOne makes device name map onto to wherever it mapped onto from.
// The table is reloaded with suspend (flush, freeze) and resume, as LVM
// does: the sectors it sees do not change, because F maps the disk
// one-to-one at that moment.
func (r *run) restackOne(name string, from, to dmtable.Dev) error {
	t, err := r.e.DM.Table(name)
	if err != nil {
		return fmt.Errorf("reading the table of %s: %w", name, err)
	}
	nt, n := t.ReplaceDevice(from.Ref(), to.Ref())
	if n == 0 {
		return nil
	}
	if _, err := r.swap(name, nt, nil); err != nil {
		return err
	}
	return nil
}

// doRestack moves every dm device that maps the disk onto F (unstack=false),
// or every device on F back onto the disk.
func (r *run) doRestack(ctx context.Context, unstack bool) error {
	from, to, kind, fp := r.spec.Disk.Dev, r.fdev, "restack", "restack:device-after"
	if unstack {
		from, to, kind, fp = r.fdev, r.spec.Disk.Dev, "unstack", "unstack:device-after"
	}
	next := r.plan.Advance(r.st)
	seq, err := r.intend(kind, 0, 0)
	if err != nil {
		return err
	}
	if unstack {
		// F maps the disk one-to-one again; make sure its live table
		// says so before anything above it is pointed back at the disk.
		t, err := r.plan.tableFor(r.st, nil, r.devs, r.e.RegionSize)
		if err != nil {
			return err
		}
		if _, err := r.swap(r.spec.Name, t, nil); err != nil {
			return err
		}
	}
	names, err := r.users(from)
	if err != nil {
		return err
	}
	for _, n := range names {
		if err := r.restackOne(n, from, to); err != nil {
			return err
		}
		r.hit(fp)
	}
	if left, err := r.users(from); err != nil {
		return err
	} else if len(left) > 0 {
		return fmt.Errorf("devices still map %v after %s: %s", from, kind, strings.Join(left, ", "))
	}
	if unstack {
		return r.finishUnstack(ctx, seq, next)
	}
	return r.commit(seq, next)
}

func (r *run) doUnstack(ctx context.Context) error { return r.doRestack(ctx, true) }

func (r *run) finishUnstack(ctx context.Context, seq uint64, next State) error {
	if err := r.removeIfExists(r.spec.Name); err != nil {
		return err
	}
	if err := r.removeHelpers(); err != nil {
		return err
	}
	if err := r.releaseFence(); err != nil {
		return err
	}
	r.hit("lvm-refresh:before")
	if err := r.e.LVM.Refresh(ctx, r.e.Host.NodePath(r.spec.Name), r.spec.Disk.Path); err != nil {
		return fmt.Errorf("refreshing LVM's view of %s: %w", r.spec.Disk.Path, err)
	}
	r.hit("lvm-refresh:after")
	return r.commit(seq, next)
}

// removeIfExists removes a device the run no longer uses (its helpers
// and, after a decrypt's unstack, F) at the end of the run. A process
// can hold it open then: an lvm command scans every device, then waits
// for the VG lock this run holds (seen in the VM: a resume's removal of
// its helper failed, EBUSY, while another dmconvert's lvm waited). If no
// table uses the device, the kernel removes it when that process closes
// it (a deferred remove), once the run releases the lock.
func (r *run) removeIfExists(name string) error {
	info, err := r.e.DM.Info(name)
	if errors.Is(err, ErrNoDevice) {
		return nil
	}
	err = r.e.DM.Remove(name)
	if err == nil || errors.Is(err, ErrNoDevice) {
		return nil
	}
	if !errors.Is(err, dmtable.ErrBusy) {
		return fmt.Errorf("removing %s: %w", name, err)
	}
	if user, uerr := r.tableUser(info.Dev); uerr != nil || user != "" {
		return fmt.Errorf("removing %s: %w (used by %q)", name, err, user)
	}
	if _, derr := r.e.DM.RemoveDeferred(name); derr != nil && !errors.Is(derr, ErrNoDevice) {
		return fmt.Errorf("removing %s: %w; deferred removal: %w", name, err, derr)
	}
	return nil
}

// tableUser returns a dm device whose table uses dev, or "".
func (r *run) tableUser(dev dmtable.Dev) (string, error) {
	list, err := r.e.DM.List()
	if err != nil {
		return "", err
	}
	for _, d := range list {
		deps, err := r.e.DM.Deps(d.Name)
		if err != nil {
			if errors.Is(err, ErrNoDevice) {
				continue
			}
			return "", err
		}
		if slices.Contains(deps, dev) {
			return d.Name, nil
		}
	}
	return "", nil
}

func (r *run) releaseFence() error {
	if r.release == nil {
		return nil
	}
	rel := r.release
	r.release = nil
	if err := rel(); err != nil {
		return fmt.Errorf("releasing the LVM fence: %w", err)
	}
	return nil
}

// doFinalize gives F the table `cryptsetup open` would give it, turns the
// header into a plain LUKS header, removes the helper and hands the PV back
// to LVM.
func (r *run) doFinalize(ctx context.Context) error {
	next := r.plan.Advance(r.st)
	seq, err := r.intend("finalize", 0, 0)
	if err != nil {
		return err
	}
	// The final layout is the whole payload on one crypt helper: F
	// becomes that crypt mapping of the disk directly, as `cryptsetup
	// open` maps it.
	g := r.plan.Geometry
	fl := r.plan.Layout(State{Phase: len(r.plan.Phases)})
	if len(fl) == 1 && fl[0].On == (Backing{Dev: DiskID}) {
		return r.finalizePlain(seq, next)
	}
	if len(fl) != 1 || fl[0].On.Delta != 0 || (fl[0].On.Dev != NewID && fl[0].On.Dev != OldID) {
		return fmt.Errorf("internal error: finalize with a final layout of %v", fl)
	}
	id := fl[0].On.Dev
	nd, _ := g.device(id)
	cs := r.spec.Crypt
	if id == OldID {
		cs = r.spec.OldCrypt
	}
	final := dmtable.Table{cryptTarget(0, nd.Size, cs, r.keys[id], 0, r.spec.Disk.Dev, nd.Phys)}
	if _, err := r.swap(r.spec.Name, final, nil); err != nil {
		return err
	}
	r.hit("finalize:table-after")
	if r.aborted && r.plan.HeaderRestore {
		// The forward run overwrote the header area; the data is back
		// on the source, so nothing lives there now: the whole header
		// goes back from the journal's image (still marked; the final
		// writes below clear the marks).
		img, err := r.hdr.Image(r.cp(r.st))
		if err != nil {
			return err
		}
		if err := r.writeDisk([]Write{{Off: 0, Data: img}}); err != nil {
			return fmt.Errorf("writing the header back to %s: %w", r.spec.Disk.Path, err)
		}
		r.hit("finalize:header-restored")
	}
	f := Final{}
	switch {
	case r.spec.Op == "rekey" && id == NewID:
		f = Final{Rekey: true, DataOffset: nd.Phys, Cipher: cs.Cipher, Keyslots: r.spec.KeyslotIDs}
	case r.spec.Op == "rekey":
		f = Final{DropUnbound: true}
	}
	ws, err := r.hdr.FinalWrites(f)
	if err != nil {
		return err
	}
	if err := r.writeDisk(ws); err != nil {
		return fmt.Errorf("writing the final header to %s: %w", r.spec.Disk.Path, err)
	}
	r.hit("finalize:header-after")
	if err := r.removeHelpers(); err != nil {
		return err
	}
	if info, err := r.e.DM.Info(r.spec.Name); err == nil && info.UUID == "" {
		// The UUID cryptsetup gives a LUKS mapping, so `cryptsetup
		// status/close` recognise F as theirs.
		uuid := fmt.Sprintf("CRYPT-LUKS%d-%s-%s", r.hdr.Version(), strings.ReplaceAll(r.hdr.UUID(), "-", ""), r.spec.Name)
		if r.spec.Plain() && r.spec.PlainTo != "luks2" {
			uuid = "CRYPT-PLAIN-" + r.spec.Name
		} else if r.spec.Plain() {
			uuid = fmt.Sprintf("CRYPT-LUKS2-%s-%s", strings.ReplaceAll(r.spec.LUKSUUID, "-", ""), r.spec.Name)
		}
		if err := r.e.DM.SetUUID(r.spec.Name, uuid); err != nil {
			return fmt.Errorf("setting the uuid of %s: %w", r.spec.Name, err)
		}
	}
	if err := r.releaseFence(); err != nil {
		return err
	}
	r.hit("lvm-refresh:before")
	if r.spec.Op != "rekey" && r.spec.VG != "" {
		// A rekey's mapping keeps its name and what is on it, and a
		// file system's decrypt involves no PV: there is nothing for
		// LVM to learn.
		if err := r.e.LVM.Refresh(ctx, r.spec.Disk.Path, r.e.Host.NodePath(r.spec.Name)); err != nil {
			return fmt.Errorf("refreshing LVM's view of %s: %w", r.e.Host.NodePath(r.spec.Name), err)
		}
	}
	r.hit("lvm-refresh:after")
	return r.commit(seq, next)
}

// finalizePlain ends a decrypt that keeps its mapping (a file system on
// it): F becomes a linear map of the plain disk, which is what the disk
// now holds from its first sector; the helpers go. There is no header
// left to write and nothing for LVM to learn.
func (r *run) finalizePlain(seq uint64, next State) error {
	final := dmtable.Table{linearTarget(0, r.plan.Geometry.Payload, r.spec.Disk.Dev, 0)}
	if _, err := r.e.DM.Info(r.spec.Name); err == nil {
		if _, err := r.swap(r.spec.Name, final, nil); err != nil {
			return err
		}
	} else if !errors.Is(err, ErrNoDevice) {
		return fmt.Errorf("looking up %s: %w", r.spec.Name, err)
	}
	r.hit("finalize:table-after")
	if err := r.removeHelpers(); err != nil {
		return err
	}
	if err := r.releaseFence(); err != nil {
		return err
	}
	return r.commit(seq, next)
}

// removeHelpers removes the run's private devices (those that exist).
func (r *run) removeHelpers() error {
	for _, n := range r.spec.Helpers {
		if err := r.removeIfExists(n); err != nil {
			return err
		}
	}
	r.hit("finalize:helpers-removed")
	return nil
}
