package convert

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"

	"github.com/dmconvert/dmconvert/dmtable"
)

// DefaultJournalDir is where journals live unless --journal says otherwise.
const DefaultJournalDir = "/var/lib/dmconvert"

// RefusalError is a refusal of bad input: nothing was written. It names
// the device, says why, and what to do. Err, when set, classifies it
// (ErrBusy).
type RefusalError struct {
	Device string
	Reason string
	Hint   string
	Err    error
}

// ErrBusy classifies refusals because another dmconvert holds the disk or
// the journal.
var ErrBusy = errors.New("another dmconvert is working on it")

// Unwrap returns the classification.
func (e *RefusalError) Unwrap() error { return e.Err }

func busy(dev, format string, args ...any) error {
	return &RefusalError{Device: dev, Reason: fmt.Sprintf(format, args...), Hint: "wait for it to finish, or see dmconvert status", Err: ErrBusy}
}

func (e *RefusalError) Error() string {
	s := e.Device + ": " + e.Reason
	if e.Hint != "" {
		s += "; " + e.Hint
	}
	return s
}

func refuse(dev, hint, format string, args ...any) error {
	return &RefusalError{Device: dev, Reason: fmt.Sprintf(format, args...), Hint: hint}
}

// HeaderFactory builds the header of a new LUKS volume for a volume key.
// The CLI closes over the LUKS type, KDF parameters and the passphrase.
type HeaderFactory func(volumeKey []byte, sectorSize uint32) (HeaderFormat, error)

// EncryptOptions are the inputs of PlanEncrypt.
type EncryptOptions struct {
	Device string
	// Name of the final mapping; default <basename>_crypt.
	Name string
	// Journal path; default DefaultJournalDir/<pv uuid>.journal.
	Journal string
	// HeaderSectors is the LUKS header size H.
	HeaderSectors Sectors
	// SectorSize of the crypt mapping in bytes; 0 takes the device's
	// logical block size. Anything else must equal it.
	SectorSize uint32
	// KeyBytes is the volume key size.
	KeyBytes int
	// Chunk bounds a chunk (sectors); 0 means the header size.
	Chunk Sectors
	// ShrinkPV lets the plan shrink the PV when its last extents are free.
	ShrinkPV bool
	// NewHeader builds the LUKS header.
	NewHeader HeaderFactory
}

// EncryptPlan is the result of PlanEncrypt: everything Execute needs, and
// what --dry-run prints.
type EncryptPlan struct {
	Spec    *Spec
	Journal string
	// JournalFS names the memory-backed file system (tmpfs, ramfs) the
	// journal is on, "" when it is on a disk: such a journal is lost by
	// the very crash it is meant to recover from.
	JournalFS string
	PV        *PV
	// ShrinkTo is the PV size the run sets first (0: no shrink).
	ShrinkTo Sectors
	// Header is the new header (keyslots wrapped by the passphrase).
	Header HeaderFormat
	keys   map[BackingID][]byte
	// newFile is created with newFileData when the run starts (a plain
	// rekey's new key file or detached LUKS2 header).
	newFile     string
	newFileData []byte
}

// Wipe forgets the volume keys held by an unexecuted plan.
func (ep *EncryptPlan) Wipe() {
	for _, k := range ep.keys {
		for i := range k {
			k[i] = 0
		}
	}
}

// pvmoveRE matches the dm name LVM gives a pvmove's temporary mirror
// (<VG>-pvmove<N>).
var pvmoveRE = regexp.MustCompile(`-pvmove[0-9]+$`)

var dmNameRE = regexp.MustCompile(`^[A-Za-z0-9._+#-][A-Za-z0-9._+#:@-]{0,126}$`)

// PlanEncrypt inspects the device and everything stacked on it and returns
// a verified plan. It writes nothing: every refusal happens here.
func (e *Engine) PlanEncrypt(ctx context.Context, o EncryptOptions) (*EncryptPlan, error) {
	dev := o.Device
	di, err := e.Host.Stat(dev)
	if err != nil {
		return nil, refuse(dev, "give the path of a disk or partition that is an LVM physical volume", "not a usable block device: %v", err)
	}
	if err := e.refuseLocked(di.Dev, dev); err != nil {
		return nil, err
	}
	if err := e.refuseRunsDisk(di.Dev, dev); err != nil {
		return nil, err
	}
	ss := o.SectorSize
	if ss == 0 {
		ss = di.LogicalBlockSize
	}
	if ss != di.LogicalBlockSize {
		return nil, refuse(dev, fmt.Sprintf("use --sector-size %d (a file system on it relies on that block size)", di.LogicalBlockSize),
			"its logical block size is %d bytes, not the requested sector size %d", di.LogicalBlockSize, ss)
	}
	if ss < 512 || ss > 4096 || ss&(ss-1) != 0 {
		return nil, refuse(dev, "", "sector size %d is not a power of two between 512 and 4096", ss)
	}
	align := Sectors(max(ss/512, 8))

	if users, err := e.Host.Users(di.Dev); err != nil {
		return nil, fmt.Errorf("checking what uses %s: %w", dev, err)
	} else if len(users) > 0 {
		return nil, refuse(dev, "a file system or swap directly on the disk has no device-mapper layer to swap under it: convert it offline (unmount, then cryptsetup reencrypt --encrypt --reduce-device-size)",
			"it is in use outside device-mapper: %s", strings.Join(users, ", "))
	}
	pv, err := e.LVM.Discover(ctx, dev)
	if errors.Is(err, ErrNotPV) {
		// After a reboot mid-run the disk shows the run's header.
		if rerr := e.refuseRunsHeader(dev); rerr != nil {
			return nil, rerr
		}
	}
	if err != nil {
		return nil, err
	}
	if pv.VG == "" {
		return nil, refuse(dev, "add it to a volume group (vgcreate/vgextend) or use cryptsetup luksFormat on an unused disk", "the physical volume belongs to no volume group")
	}
	if pv.Refusal != "" {
		return nil, refuse(dev, "", "volume group %s cannot be converted: %s", pv.VG, pv.Refusal)
	}

	// Every dm device on the disk must be restackable: linear or striped
	// targets (LVM LVs and their sub-LVs) inside the PV.
	stacked, err := e.stackedOn(di.Dev, dev, pv.Size)
	if err != nil {
		return nil, err
	}

	H := o.HeaderSectors
	if H == 0 || H%align != 0 {
		return nil, refuse(dev, "", "header size of %d sectors is not a multiple of %d sectors", H, align)
	}
	P := (pv.Size + align - 1) / align * align
	var shrinkTo Sectors
	if need := TailNeeded(P, H); need > di.Size {
		short := need - di.Size
		room := roundDown(di.Size-2*H, align)
		target, hint, free := pv.shrinkTarget(room, dev)
		if !o.ShrinkPV || !free {
			return nil, refuse(dev, hint, "the LUKS header needs %d sectors before the data and %d sectors of working space after it, but the PV ends %d sectors short of that (PV %d sectors, disk %d sectors)",
				H, H, short, pv.Size, di.Size)
		}
		shrinkTo = target
		P = (target + align - 1) / align * align
	}

	name := o.Name
	if name == "" {
		name = filepath.Base(dev) + "_crypt"
	}
	if !dmNameRE.MatchString(name) {
		return nil, refuse(dev, "", "mapping name %q is not a valid device-mapper name", name)
	}
	if _, err := e.DM.Info(name); err == nil {
		return nil, refuse(dev, "pick another --name, or run `dmconvert resume` if a conversion was interrupted", "a device-mapper device named %s already exists", name)
	} else if !errors.Is(err, ErrNoDevice) {
		return nil, fmt.Errorf("looking up %s: %w", name, err)
	}
	if err := e.refuseFiltered(ctx, dev, pv.VG, e.mappingNames(name, pv.UUID)); err != nil {
		return nil, err
	}

	jpath := o.Journal
	if jpath == "" {
		jpath = filepath.Join(DefaultJournalDir, pv.UUID+".journal")
	}
	if err := e.checkNewJournal(jpath, di.Dev, dev); err != nil {
		return nil, err
	}

	keyBytes := o.KeyBytes
	if keyBytes <= 0 {
		return nil, fmt.Errorf("volume key size %d bytes is not valid", keyBytes)
	}
	key := make([]byte, keyBytes)
	if _, err := rand.Read(key); err != nil {
		return nil, fmt.Errorf("generating the volume key: %w", err)
	}
	hdr, err := o.NewHeader(key, ss)
	if err != nil {
		return nil, fmt.Errorf("creating the LUKS header for %s: %w", dev, err)
	}
	if hdr.Sectors() != H {
		return nil, fmt.Errorf("internal error: header is %d sectors, plan says %d", hdr.Sectors(), H)
	}
	plan, err := BuildEncrypt(EncryptGeometry{DiskSize: di.Size, Payload: P, Header: H, Chunk: o.Chunk, Align: align})
	if err != nil {
		return nil, refuse(dev, "", "%v", err)
	}
	id := make([]byte, 8)
	if _, err := rand.Read(id); err != nil {
		return nil, err
	}
	runID := hex.EncodeToString(id)
	spec := &Spec{
		Version: PlanVersion, ID: runID, Op: "encrypt", Disk: di, Name: name,
		Helpers:     map[BackingID]string{NewID: helperNamePrefix + runID + "-new"},
		Crypt:       hdr.Crypt(),
		LUKSVersion: hdr.Version(), LUKSUUID: hdr.UUID(),
		PVUUID: pv.UUID, VG: pv.VG, VGDevices: pv.VGDevices, VGPVUUIDs: pv.VGPVUUIDs, VGSeqno: pv.VGSeqno, PVDevice: dev,
		Stacked: stacked,
		Forward: plan,
	}
	return &EncryptPlan{Spec: spec, Journal: jpath, JournalFS: e.Host.MemoryFS(jpath), PV: pv, ShrinkTo: shrinkTo, Header: hdr, keys: map[BackingID][]byte{NewID: key}}, nil
}

// pvmoveBusy says that a pvmove (its dm device mv) moves extents of dev.
func pvmoveBusy(dev, mv string) error {
	return &RefusalError{Device: dev, Err: ErrBusy,
		Reason: fmt.Sprintf("a pvmove is moving extents of it (device-mapper device %s)", mv),
		Hint:   "let the pvmove finish (or stop it with pvmove --abort), then run dmconvert again"}
}

// pvmoveOn returns the name of a pvmove's dm device that maps dev
// directly, or "".
func (e *Engine) pvmoveOn(dev dmtable.Dev) (string, error) {
	list, err := e.DM.List()
	if err != nil {
		return "", fmt.Errorf("listing device-mapper devices: %w", err)
	}
	for _, d := range list {
		if !pvmoveRE.MatchString(d.Name) {
			continue
		}
		deps, err := e.DM.Deps(d.Name)
		if err != nil {
			if errors.Is(err, ErrNoDevice) {
				continue
			}
			return "", fmt.Errorf("reading the dependencies of %s: %w", d.Name, err)
		}
		if slices.Contains(deps, dev) {
			return d.Name, nil
		}
	}
	return "", nil
}

// stackedOn lists the dm devices whose tables use disk, refusing any that
// cannot be restacked onto F.
func (e *Engine) stackedOn(disk dmtable.Dev, path string, pvSize Sectors) (map[string]string, error) {
	list, err := e.DM.List()
	if err != nil {
		return nil, fmt.Errorf("listing device-mapper devices: %w", err)
	}
	out := map[string]string{}
	for _, d := range list {
		deps, err := e.DM.Deps(d.Name)
		if err != nil {
			return nil, fmt.Errorf("reading the dependencies of %s: %w", d.Name, err)
		}
		uses := false
		for _, x := range deps {
			uses = uses || x == disk
		}
		if !uses {
			continue
		}
		t, err := e.DM.Table(d.Name)
		if err != nil {
			return nil, fmt.Errorf("reading the table of %s: %w", d.Name, err)
		}
		for _, tg := range t {
			var ranges [][2]Sectors
			switch p := tg.Params.(type) {
			case *dmtable.Linear:
				if n, ok := p.Dev.Dev(); ok && n == disk {
					ranges = append(ranges, [2]Sectors{Sectors(p.Offset), Sectors(p.Offset) + Sectors(tg.Length)})
				}
			case *dmtable.Striped:
				per := Sectors(tg.Length) / Sectors(len(p.Stripes))
				for _, s := range p.Stripes {
					if n, ok := s.Dev.Dev(); ok && n == disk {
						ranges = append(ranges, [2]Sectors{Sectors(s.Offset), Sectors(s.Offset) + per})
					}
				}
			default:
				for _, r := range tg.Params.Devices() {
					if n, ok := r.Dev(); ok && n == disk {
						if pvmoveRE.MatchString(d.Name) {
							return nil, pvmoveBusy(path, d.Name)
						}
						return nil, refuse(path, "only linear and striped mappings (LVM logical volumes) can be moved onto the encrypted device",
							"device-mapper device %s maps it with a %s target, which dmconvert cannot restack", d.Name, tg.Type())
					}
				}
			}
			for _, r := range ranges {
				if r[1] > pvSize {
					return nil, refuse(path, "", "device-mapper device %s maps sectors [%d,%d), beyond the end of the physical volume (%d sectors)", d.Name, r[0], r[1], pvSize)
				}
			}
		}
		out[d.Name] = t.String()
	}
	return out, nil
}

// checkJournalPlace refuses a journal on the stack being converted
// (invariant 4): its file system's device must not be the disk or depend
// on it.
func (e *Engine) checkJournalPlace(jpath string, disk dmtable.Dev, path string) error {
	// bbolt opens an existing path read-write and, finding it empty (a
	// block device's size reads as 0), writes its first pages there.
	if fi, err := os.Stat(jpath); err == nil && !fi.Mode().IsRegular() {
		return refuse(path, "give --journal the path of a new or existing journal file",
			"journal %s is not a regular file (%s)", jpath, fileKind(fi.Mode()))
	} else if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("journal %s: %w", jpath, err)
	}
	fd, err := e.Host.FileDevice(jpath)
	if err != nil {
		return fmt.Errorf("finding the device of journal %s: %w", jpath, err)
	}
	depends, err := e.dependsOn(fd, disk)
	if err != nil {
		return err
	}
	if depends {
		return refuse(path, "put the journal on a file system that is not on this disk (--journal /some/other/place)",
			"journal %s would live on a file system stored on this disk; it could not be written while the disk's mapping is suspended", jpath)
	}
	return nil
}

// fileKind names what a path that is not a regular file is.
func fileKind(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "a directory"
	case m&fs.ModeDevice != 0 && m&fs.ModeCharDevice == 0:
		return "a block device"
	case m&fs.ModeCharDevice != 0:
		return "a character device"
	case m&fs.ModeNamedPipe != 0:
		return "a named pipe"
	case m&fs.ModeSocket != 0:
		return "a socket"
	}
	return "mode " + m.String()
}

// dependsOn reports whether device dev is disk or is stacked on it.
func (e *Engine) dependsOn(dev, disk dmtable.Dev) (bool, error) {
	list, err := e.DM.List()
	if err != nil {
		return false, fmt.Errorf("listing device-mapper devices: %w", err)
	}
	byDev := map[dmtable.Dev]string{}
	for _, d := range list {
		byDev[d.Dev] = d.Name
	}
	seen := map[dmtable.Dev]bool{}
	var walk func(d dmtable.Dev) (bool, error)
	walk = func(d dmtable.Dev) (bool, error) {
		if d == disk {
			return true, nil
		}
		if seen[d] {
			return false, nil
		}
		seen[d] = true
		name, ok := byDev[d]
		if !ok {
			return false, nil
		}
		deps, err := e.DM.Deps(name)
		if err != nil {
			return false, fmt.Errorf("reading the dependencies of %s: %w", name, err)
		}
		for _, x := range deps {
			if y, err := walk(x); err != nil || y {
				return y, err
			}
		}
		return false, nil
	}
	return walk(dev)
}
