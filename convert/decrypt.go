package convert

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"

	"github.com/dmconvert/dmconvert/dmtable"
	"github.com/dmconvert/dmconvert/journal"
	"github.com/dmconvert/dmconvert/luks"
)

// DecryptOptions are the inputs of PlanDecrypt.
type DecryptOptions struct {
	// Target is the open LUKS mapping (its name or /dev/mapper path) or
	// the LUKS device under it.
	Target string
	// Journal path; default DefaultJournalDir/<pv uuid>.journal.
	Journal string
	// Chunk bounds a chunk (sectors); 0 means the data offset.
	Chunk Sectors
	// ShrinkPV lets the plan shrink the PV on the mapping when its last
	// extents are free.
	ShrinkPV bool
	// HeaderGap uses the header area as the only working space even when
	// there is room after a PV (docs/design.md, "Decrypt without room").
	// It is the plan whenever the mapping carries no PV (a file system)
	// or a PV without room after it (and ShrinkPV cannot make some).
	HeaderGap bool
	// Open unlocks the header with the user's passphrase or key file.
	Open HeaderOpener
}

// cryptMapping is an open dm-crypt mapping of a whole LUKS data area.
type cryptMapping struct {
	name  string
	info  DevInfo
	crypt *dmtable.Crypt
	size  Sectors
	disk  dmtable.Dev
}

// findMapping resolves target to the dm-crypt mapping and its disk.
func (e *Engine) findMapping(target string) (*cryptMapping, error) {
	e.dropStaleTransients()
	name := strings.TrimPrefix(target, "/dev/mapper/")
	if _, err := e.DM.Info(name); err != nil {
		// A device path: find the mapping whose table is crypt over it.
		di, serr := e.Host.Stat(target)
		if serr != nil {
			return nil, refuse(target, "give the open LUKS mapping (/dev/mapper/NAME) or the device under it", "neither a device-mapper device nor a block device: %v", serr)
		}
		if err := e.refuseLocked(di.Dev, target); err != nil {
			return nil, err
		}
		list, err := e.DM.List()
		if err != nil {
			return nil, err
		}
		var names []string
		for _, d := range list {
			t, err := e.DM.Table(d.Name)
			if err != nil || len(t) != 1 {
				continue
			}
			if c, ok := t[0].Params.(*dmtable.Crypt); ok {
				if n, ok := c.Dev.Dev(); ok && n == di.Dev {
					if strings.HasPrefix(d.UUID, helperUUIDPrefix) {
						// A run's helper, or a key check a killed
						// plan left: never the user's mapping.
						continue
					}
					names = append(names, d.Name)
				}
			}
		}
		switch len(names) {
		case 0:
			if err := e.refuseRunsDisk(di.Dev, target); err != nil {
				return nil, err
			}
			return nil, refuse(target, "open it first (cryptsetup open), or decrypt it offline with cryptsetup reencrypt --decrypt", "no open dm-crypt mapping uses it")
		case 1:
			name = names[0]
		default:
			// Plain mappings at several offsets of one disk, say: which
			// one is meant is not for dmconvert to guess.
			slices.Sort(names)
			return nil, refuse(target, "give the mapping itself (/dev/mapper/NAME)", "several open dm-crypt mappings use it: %s", strings.Join(names, ", "))
		}
	}
	info, err := e.DM.Info(name)
	if err != nil {
		return nil, err
	}
	if strings.HasPrefix(info.UUID, helperUUIDPrefix) {
		return nil, refuse(name, "give the mapping the run converts, or run dmconvert status", "a private device of dmconvert (dm UUID %s), not a mapping of yours", info.UUID)
	}
	t, err := e.DM.Table(name)
	if err != nil {
		return nil, fmt.Errorf("reading the table of %s: %w", name, err)
	}
	var c *dmtable.Crypt
	if len(t) == 1 {
		c, _ = t[0].Params.(*dmtable.Crypt)
	}
	if c == nil {
		if err := e.refuseRunsMapping(name); err != nil {
			return nil, err
		}
	}
	if c == nil || t[0].Start != 0 {
		return nil, refuse(name, "", "not a dm-crypt mapping of one whole device (its table: %s)", targetSummary(t))
	}
	if c.IntegrityTagSize > 0 || c.IntegrityType != "" {
		return nil, refuse(name, "", "dm-crypt with integrity (authenticated encryption) is not supported")
	}
	d, ok := c.Dev.Dev()
	if !ok {
		return nil, refuse(name, "", "its table names its device by path, not number")
	}
	if err := e.refuseLocked(d, name); err != nil {
		return nil, err
	}
	return &cryptMapping{name: name, info: info, crypt: c, size: Sectors(t[0].Length), disk: d}, nil
}

// luksSource is an open LUKS mapping, its disk and its unlocked header.
type luksSource struct {
	m     *cryptMapping
	dpath string
	di    DiskInfo
	H     Sectors
	hdr   HeaderFormat
	keys  Keys
	cs    CryptSpec
	align Sectors
}

// inspectLUKS resolves target to an open LUKS mapping, reads its header
// from the disk and unlocks it. It writes nothing.
func (e *Engine) inspectLUKS(target string, open HeaderOpener) (*luksSource, error) {
	traceStep("inspect")
	m, err := e.findMapping(target)
	if err != nil {
		return nil, err
	}
	dpath, err := e.resolveDiskPath(m.disk, target)
	if err != nil {
		return nil, refuse(m.name, "", "cannot find the device under it (%v): %v", m.disk, err)
	}
	di, err := e.Host.Stat(dpath)
	if err != nil {
		return nil, refuse(dpath, "", "the device under %s: %v", m.name, err)
	}
	H := Sectors(m.crypt.Offset)
	switch {
	case strings.HasPrefix(m.info.UUID, "CRYPT-LUKS") && H == 0:
		// cryptsetup open --header FILE: the data starts at the disk's
		// first sector and the header is elsewhere.
		return nil, refuse(m.name, "use cryptsetup reencrypt --header FILE for it",
			"it was opened with a detached LUKS header (its data starts at sector 0 of %s); dmconvert converts LUKS volumes whose header is on the disk, in front of the data", dpath)
	case strings.HasPrefix(m.info.UUID, "CRYPT-PLAIN-"):
		return nil, refuse(m.name, "convert it to LUKS2 with the header on the disk first (dmconvert rekey --type luks2), then decrypt that",
			"a plain dm-crypt mapping (no LUKS header): dmconvert decrypts LUKS volumes")
	case strings.HasPrefix(m.info.UUID, tcryptUUIDPrefix):
		return nil, refuse(m.name, "", "a TrueCrypt/VeraCrypt mapping: dmconvert decrypts LUKS volumes (dmconvert rekey --type luks2 converts it to LUKS2, with a detached header)")
	}
	if m.crypt.IVOffset != 0 || H == 0 || H+m.size != di.Size {
		return nil, refuse(m.name, "", "its table (offset %d, iv offset %d, %d sectors on a %d-sector disk) is not the whole data area of a LUKS device with its header in front", H, m.crypt.IVOffset, m.size, di.Size)
	}
	disk, err := e.Host.OpenDisk(dpath)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", dpath, err)
	}
	img := make([]byte, H*512)
	_, rerr := disk.ReadAt(img, 0)
	traceStep("header-read")
	disk.Close()
	if rerr != nil {
		return nil, fmt.Errorf("reading the header of %s: %w", dpath, rerr)
	}
	switch Identify(img[:labelSectors*512]) {
	case IdentityLUKS:
	case IdentityDisguisedLUKS1:
		return nil, refuse(dpath, "run dmconvert status, then resume or abort it", "a dmconvert conversion is in progress on it")
	default:
		return nil, refuse(dpath, "", "it does not start with a LUKS header")
	}
	hdr, keys, err := open(img)
	traceStep("header-open")
	if errors.Is(err, luks.ErrNoSpace) {
		// A LUKS1 header whose keyslot material leaves dmconvert no
		// room for its checkpoint records.
		return nil, refuse(dpath, "", "%v", err)
	}
	if err != nil {
		return nil, fmt.Errorf("unlocking the header of %s: %w", dpath, err)
	}
	bad := func(err error) (*luksSource, error) {
		keys.Wipe()
		return nil, err
	}
	if len(keys.Unbound) > 0 {
		return bad(refuse(dpath, "run dmconvert status; if a conversion was interrupted, resume it", "its header holds an unbound keyslot this passphrase opens (an unfinished rekey?)"))
	}
	if hdr.Sectors() != H {
		return bad(refuse(dpath, "", "the header's data offset (%d sectors) differs from the mapping's (%d)", hdr.Sectors(), H))
	}
	cs := hdr.Crypt()
	if cs.Cipher != string(m.crypt.Cipher) {
		return bad(refuse(m.name, "", "the mapping uses %s but the header says %s", m.crypt.Cipher, cs.Cipher))
	}
	if m.crypt.SectorSize > 512 {
		cs.SectorSize = m.crypt.SectorSize
		cs.IVLargeSectors = m.crypt.IVLargeSectors
	}
	cs.Opts = cryptOpts(m.crypt)
	if !m.crypt.Key.IsKeyring() && !m.crypt.Key.Equal(dmtable.HexKey(keys.Bound)) {
		return bad(refuse(m.name, "", "the key in the live table is not the key the header gives for this passphrase"))
	}
	return &luksSource{m: m, dpath: dpath, di: di, H: H, hdr: hdr, keys: keys, cs: cs, align: Sectors(max(cs.SectorSize/512, 8))}, nil
}

// checkNewJournal refuses a journal on the disk's stack or one that
// already records a run.
func (e *Engine) checkNewJournal(jpath string, disk dmtable.Dev, dpath string) error {
	if err := e.checkJournalPlace(jpath, disk, dpath); err != nil {
		return err
	}
	if j, err := journal.Open(jpath, journal.Options{ReadOnly: true}); err == nil {
		r, rerr := j.Run()
		j.Close()
		if rerr == nil {
			return refuse(dpath, "run `dmconvert status --journal "+jpath+"`, then resume or abort it, or use another --journal",
				"journal %s already records a %s run of %s", jpath, r.Op, r.Device)
		}
	} else if errors.Is(err, journal.ErrLocked) {
		return busy(dpath, "journal %s is in use by another dmconvert", jpath)
	}
	return nil
}

func newRunID() (string, error) {
	id := make([]byte, 8)
	if _, err := rand.Read(id); err != nil {
		return "", err
	}
	return hex.EncodeToString(id), nil
}

// PlanDecrypt inspects an open LUKS mapping with an LVM PV or a file
// system on it and returns a verified decrypt plan. It writes nothing.
func (e *Engine) PlanDecrypt(ctx context.Context, o DecryptOptions) (*EncryptPlan, error) {
	src, err := e.inspectLUKS(o.Target, o.Open)
	if err != nil {
		return nil, err
	}
	m, dpath, di, H, hdr, keys, cs, align := src.m, src.dpath, src.di, src.H, src.hdr, src.keys, src.cs, src.align
	fail := func(err error) (*EncryptPlan, error) {
		keys.Wipe()
		return nil, err
	}

	// What is on the mapping: an LVM PV, or anything else (a mounted file
	// system): then the mapping stays, as a linear map of the plain disk.
	node := e.Host.NodePath(m.name)
	if users, err := e.Host.Users(m.info.Dev); err != nil {
		return fail(err)
	} else {
		for _, u := range users {
			if strings.HasPrefix(u, "held by ") {
				return fail(refuse(m.name, "decrypt it offline (cryptsetup reencrypt --decrypt)", "it is %s, which dmconvert does not convert under", u))
			}
		}
	}
	if mv, err := e.pvmoveOn(m.info.Dev); err != nil {
		return fail(err)
	} else if mv != "" {
		return fail(pvmoveBusy(m.name, mv))
	}
	pv, err := e.LVM.Discover(ctx, node)
	switch {
	case errors.Is(err, ErrNotPV):
		pv = nil
	case err != nil:
		return fail(err)
	case pv.VG == "":
		return fail(refuse(node, "", "the physical volume belongs to no volume group"))
	case pv.Refusal != "":
		return fail(refuse(node, "", "volume group %s cannot be converted: %s", pv.VG, pv.Refusal))
	}
	dg := DecryptGeometry{DiskSize: di.Size, Header: H, Chunk: o.Chunk, Align: align, HeaderGap: o.HeaderGap}
	var shrinkTo Sectors
	jname := hdr.UUID()
	if pv == nil {
		// The whole data area moves; no room is needed after it.
		dg.Payload, dg.KeepMapping = roundDown(m.size, align), true
		if dg.Payload != m.size {
			return fail(refuse(m.name, "", "its size (%d sectors) is not a multiple of its sector size", m.size))
		}
	} else {
		jname = pv.UUID
		// The PV ends on the raw disk: LVM's filter must accept it.
		if err := e.refuseFiltered(ctx, dpath, pv.VG, e.diskNames(dpath, di.Dev, pv.UUID)); err != nil {
			return fail(err)
		}
		dg.Payload = (pv.Size + align - 1) / align * align
		if need := TailNeeded(dg.Payload, H); need > di.Size && !dg.HeaderGap {
			room := roundDown(di.Size-2*H, align)
			target, _, free := pv.shrinkTarget(room, node)
			if o.ShrinkPV && free {
				shrinkTo = target
				dg.Payload = (target + align - 1) / align * align
			} else {
				// No working space after the PV: the header area is it.
				dg.HeaderGap = true
			}
		}
	}
	jpath := o.Journal
	if jpath == "" {
		jpath = filepath.Join(DefaultJournalDir, jname+".journal")
	}
	if err := e.checkNewJournal(jpath, di.Dev, dpath); err != nil {
		return fail(err)
	}
	plan, err := BuildDecrypt(dg)
	if err != nil {
		return fail(refuse(dpath, "", "%v", err))
	}
	runID, err := newRunID()
	if err != nil {
		return fail(err)
	}
	spec := &Spec{
		Version: PlanVersion, ID: runID, Op: "decrypt", Disk: di, Name: m.name,
		Helpers:     map[BackingID]string{OldID: helperNamePrefix + runID + "-old"},
		OldCrypt:    cs,
		LUKSVersion: hdr.Version(), LUKSUUID: hdr.UUID(),
		Forward: plan,
	}
	if _, ok := plan.Geometry.device(HeadID); ok {
		spec.Helpers[HeadID] = helperNamePrefix + runID + "-head"
	}
	if pv != nil {
		spec.PVUUID, spec.VG, spec.VGDevices, spec.VGPVUUIDs, spec.VGSeqno, spec.PVDevice = pv.UUID, pv.VG, pv.VGDevices, pv.VGPVUUIDs, pv.VGSeqno, node
	}
	return &EncryptPlan{Spec: spec, Journal: jpath, JournalFS: e.Host.MemoryFS(jpath), PV: pv, ShrinkTo: shrinkTo, Header: hdr,
		keys: map[BackingID][]byte{OldID: keys.Bound}}, nil
}

// resolveDiskPath finds a path for the disk dev: the target itself if it
// is that device, else what the host knows.
func (e *Engine) resolveDiskPath(dev dmtable.Dev, target string) (string, error) {
	if di, err := e.Host.Stat(target); err == nil && di.Dev == dev {
		return target, nil
	}
	return e.Host.DevicePath(dev)
}

// targetSummary names a table's targets and their ranges, without their
// parameters (which can carry keys).
func targetSummary(t dmtable.Table) string {
	if len(t) == 0 {
		return "empty"
	}
	parts := make([]string, len(t))
	for i, tg := range t {
		parts[i] = fmt.Sprintf("%s at [%d,%d)", tg.Type(), tg.Start, tg.Start+tg.Length)
	}
	return strings.Join(parts, ", ")
}
