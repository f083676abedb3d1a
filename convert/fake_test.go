package convert

import (
	"bytes"
	"context"
	"crypto/sha512"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/dmconvert/dmconvert/dmtable"
)

// A fake kernel for unit tests: disks as byte slices with a volatile write
// cache, device-mapper devices with linear, striped, crypt (real AES-XTS;
// the other ciphers it offers are stand-ins that differ from it and from
// each other) and mirror targets, suspend semantics (writes to a suspended stack wait
// for the resume), and a fake LVM that activates logical volumes on
// whichever device carries the PV label, as boot-time activation would.

const fakeSector = 512

type fakeDisk struct {
	dev     dmtable.Dev
	path    string
	durable []byte
	cache   map[uint64][]byte // sector -> data written but not flushed
}

func (d *fakeDisk) clone() *fakeDisk {
	c := &fakeDisk{dev: d.dev, path: d.path, durable: append([]byte(nil), d.durable...), cache: map[uint64][]byte{}}
	for k, v := range d.cache {
		c.cache[k] = append([]byte(nil), v...)
	}
	return c
}

func (d *fakeDisk) size() Sectors { return Sectors(len(d.durable) / fakeSector) }

func (d *fakeDisk) readSector(s uint64, buf []byte) {
	if c, ok := d.cache[s]; ok {
		copy(buf, c)
		return
	}
	copy(buf, d.durable[s*fakeSector:(s+1)*fakeSector])
}

func (d *fakeDisk) writeSector(s uint64, buf []byte) {
	d.cache[s] = append([]byte(nil), buf[:fakeSector]...)
}

func (d *fakeDisk) flush() {
	for s, c := range d.cache {
		copy(d.durable[s*fakeSector:], c)
	}
	d.cache = map[uint64][]byte{}
}

type fakeMirror struct {
	start         Sectors // target start in the device
	length        Sectors
	region        Sectors
	synced        int // regions in sync
	total         int
	failed        []bool
	legs          []dmtable.MirrorLeg
	eventsPending bool
}

type fakeDev struct {
	name, uuid string
	dev        dmtable.Dev
	live       dmtable.Table
	inactive   dmtable.Table
	suspended  bool
	eventNr    uint32
	mirrors    []*fakeMirror
}

type fakeWrite struct {
	dev  string
	off  Sectors
	data []byte
	ack  func()
}

// fakeWorld is the whole machine.
type fakeWorld struct {
	mu       sync.Mutex
	disks    map[dmtable.Dev]*fakeDisk
	devs     map[string]*fakeDev
	nextMin  uint32
	pending  []fakeWrite // writes waiting for a suspended device
	lvm      *fakeLVM
	failLeg  int // when >= 0, the next mirror's leg of this index fails
	syncStep int // regions copied per WaitEvent (0: all)
	log      []string
	// writeFault, when set, is asked before every write of the engine's
	// direct disk I/O (fakeDiskIO); an error fails that write whole.
	writeFault func(off int64, p []byte) error
	// createHook, when set, is called at the start of every Create (it
	// may kill the process inside it: interruptCreate).
	createHook func(name, uuid string)
}

// addTableless registers a device as the kernel leaves one whose creator
// died between the create and its first table: it exists, with its name
// and UUID, and has no table (and no block device tables could use).
func (w *fakeWorld) addTableless(name, uuid string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.nextMin++
	w.devs[name] = &fakeDev{name: name, uuid: uuid, dev: dmtable.Dev{Major: 253, Minor: w.nextMin}}
}

func newFakeWorld() *fakeWorld {
	return &fakeWorld{disks: map[dmtable.Dev]*fakeDisk{}, devs: map[string]*fakeDev{}, nextMin: 0, failLeg: -1}
}

func (w *fakeWorld) addDisk(path string, dev dmtable.Dev, size Sectors) *fakeDisk {
	d := &fakeDisk{dev: dev, path: path, durable: make([]byte, size*fakeSector), cache: map[uint64][]byte{}}
	w.disks[dev] = d
	return d
}

// snapshot copies the world (disks, devices) for a crash at this instant.
func (w *fakeWorld) snapshot() *fakeWorld {
	w.mu.Lock()
	defer w.mu.Unlock()
	c := &fakeWorld{disks: map[dmtable.Dev]*fakeDisk{}, devs: map[string]*fakeDev{}, nextMin: w.nextMin, lvm: w.lvm, failLeg: -1, syncStep: w.syncStep}
	for k, d := range w.disks {
		c.disks[k] = d.clone()
	}
	for k, d := range w.devs {
		nd := *d
		nd.live = d.live.Clone()
		nd.inactive = d.inactive.Clone()
		nd.mirrors = nil
		for _, m := range d.mirrors {
			mm := *m
			mm.failed = append([]bool(nil), m.failed...)
			nd.mirrors = append(nd.mirrors, &mm)
		}
		c.devs[k] = &nd
	}
	// Writes queued on a suspended device were never acknowledged; in
	// the copy they are simply gone (their writer died with the world).
	return c
}

// powerCut drops every dm device and, if loseCache, every unflushed write.
func (w *fakeWorld) powerCut(loseCache bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.devs = map[string]*fakeDev{}
	w.pending = nil
	for _, d := range w.disks {
		if loseCache {
			d.cache = map[uint64][]byte{}
		} else {
			d.flush()
		}
	}
}

func (w *fakeWorld) byDev(d dmtable.Dev) (*fakeDev, bool) {
	for _, x := range w.devs {
		if x.dev == d {
			return x, true
		}
	}
	return nil, false
}

// --- block I/O through the stack -------------------------------------

// io reads or writes one 512-byte sector of device dev (a disk or a dm
// device number) through its live tables.
func (w *fakeWorld) io(dev dmtable.Dev, s Sectors, buf []byte, write bool) error {
	if d, ok := w.disks[dev]; ok {
		if s >= d.size() {
			return fmt.Errorf("sector %d beyond the end of disk %v", s, dev)
		}
		if write {
			d.writeSector(uint64(s), buf)
		} else {
			d.readSector(uint64(s), buf)
		}
		return nil
	}
	fd, ok := w.byDev(dev)
	if !ok {
		return fmt.Errorf("no device %v", dev)
	}
	for _, t := range fd.live {
		if Sectors(t.Start) > s || s >= Sectors(t.End()) {
			continue
		}
		rel := s - Sectors(t.Start)
		switch p := t.Params.(type) {
		case *dmtable.Linear:
			n, _ := p.Dev.Dev()
			return w.io(n, Sectors(p.Offset)+rel, buf, write)
		case *dmtable.Striped:
			chunk := Sectors(p.ChunkSize)
			ci := rel / chunk
			st := p.Stripes[ci%Sectors(len(p.Stripes))]
			n, _ := st.Dev.Dev()
			return w.io(n, Sectors(st.Offset)+(ci/Sectors(len(p.Stripes)))*chunk+rel%chunk, buf, write)
		case *dmtable.Crypt:
			return w.cryptIO(p, rel, buf, write)
		case *dmtable.Mirror:
			if !write {
				n, _ := p.Legs[0].Dev.Dev()
				return w.io(n, Sectors(p.Legs[0].Offset)+rel, buf, false)
			}
			for _, l := range p.Legs {
				n, _ := l.Dev.Dev()
				if err := w.io(n, Sectors(l.Offset)+rel, buf, true); err != nil {
					return err
				}
			}
			return nil
		case *dmtable.Zero:
			if !write {
				clear(buf[:fakeSector])
			}
			return nil
		default:
			return fmt.Errorf("fake kernel: I/O to a %s target", t.Type())
		}
	}
	return fmt.Errorf("sector %d beyond the end of %s", s, fd.name)
}

// fakeCiphers are the ciphers the fake kernel's dm-crypt offers, with the
// key sizes (bytes) it takes for each. aes-xts-plain64 is real AES-XTS;
// the others are stand-ins: AES-XTS under a key derived from the cipher
// name and the key, so data written under one cipher reads back as
// garbage under any other (a run that loads the wrong cipher anywhere
// loses data the tests then miss).
var fakeCiphers = map[string][]int{
	"aes-xts-plain64":      {32, 64},
	"serpent-xts-plain64":  {32, 64},
	"aes-cbc-essiv:sha256": {16, 24, 32},
}

// checkFakeCrypt is the fake dm-crypt constructor's check of a crypt
// target: a cipher it offers and a key size that cipher takes.
func checkFakeCrypt(t dmtable.Table) error {
	for _, tg := range t {
		c, ok := tg.Params.(*dmtable.Crypt)
		if !ok {
			continue
		}
		sizes, ok := fakeCiphers[string(c.Cipher)]
		if !ok {
			return fmt.Errorf("fake kernel: crypt: unknown cipher %s: invalid argument", c.Cipher)
		}
		n := len(c.Key.Payload()) / 2
		if typ, desc, ok := c.Key.Keyring(); ok {
			k, found := fakeKeyringKey(typ, desc)
			if !found || len(k) != c.Key.Size() {
				return fmt.Errorf("fake kernel: crypt: no %d-byte key %s:%s in the keyring: invalid argument", c.Key.Size(), typ, desc)
			}
			n = len(k)
		}
		if !slices.Contains(sizes, n) {
			return fmt.Errorf("fake kernel: crypt: cipher %s takes no %d-byte key: invalid argument", c.Cipher, n)
		}
	}
	return nil
}

func (w *fakeWorld) cryptIO(p *dmtable.Crypt, rel Sectors, buf []byte, write bool) error {
	c, err := w.cipher(p)
	if err != nil {
		return err
	}
	n, _ := p.Dev.Dev()
	// 512-byte sectors only in the fake (the 4 KiB case runs in the VM).
	iv := uint64(p.IVOffset) + uint64(rel)
	tmp := make([]byte, fakeSector)
	if write {
		c.crypt(tmp, buf[:fakeSector], iv)
		return w.io(n, Sectors(p.Offset)+rel, tmp, true)
	}
	if err := w.io(n, Sectors(p.Offset)+rel, tmp, false); err != nil {
		return err
	}
	c.crypt(buf[:fakeSector], tmp, iv)
	return nil
}

// fakeCipher is the fake kernel's dm-crypt: each sector XORed with a pad
// derived from the cipher's name and the key, and with a stream that
// depends on the sector's IV. It is its own inverse; data written under
// one cipher, key or sector number reads back as garbage under any other,
// which is all the tests need of it (real ciphers run in the VM), and it
// costs a fraction of AES-XTS.
type fakeCipher struct {
	pad  [fakeSector / 8]uint64
	seed uint64
}

func splitmix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ x>>30) * 0xbf58476d1ce4e5b9
	x = (x ^ x>>27) * 0x94d049bb133111eb
	return x ^ x>>31
}

func (c *fakeCipher) crypt(dst, src []byte, iv uint64) {
	t := splitmix(c.seed ^ iv)
	for i := range c.pad {
		v := binary.LittleEndian.Uint64(src[i*8:])
		t = t*0x5851f42d4c957f2d + 0x14057b7ef767814f
		binary.LittleEndian.PutUint64(dst[i*8:], v^c.pad[i]^t)
	}
}

var (
	cipherMu    sync.Mutex
	cipherCache = map[*dmtable.Crypt]*fakeCipher{}
	// fakeKeyring is the fake kernel's keyring ("type:description" ->
	// key): what a crypt table's keyring key reference finds.
	fakeKeyring = map[string][]byte{}
)

// addFakeKeyringKey puts key into the fake kernel's keyring.
func addFakeKeyringKey(typ, desc string, key []byte) {
	cipherMu.Lock()
	defer cipherMu.Unlock()
	fakeKeyring[typ+":"+desc] = append([]byte(nil), key...)
}

func fakeKeyringKey(typ, desc string) ([]byte, bool) {
	cipherMu.Lock()
	defer cipherMu.Unlock()
	k, ok := fakeKeyring[typ+":"+desc]
	return k, ok
}

func (w *fakeWorld) cipher(p *dmtable.Crypt) (*fakeCipher, error) {
	cipherMu.Lock()
	defer cipherMu.Unlock()
	if c, ok := cipherCache[p]; ok {
		return c, nil
	}
	if _, ok := fakeCiphers[string(p.Cipher)]; !ok {
		return nil, fmt.Errorf("fake kernel: cipher %s", p.Cipher)
	}
	var key []byte
	if typ, desc, ok := p.Key.Keyring(); ok {
		k, found := fakeKeyring[typ+":"+desc]
		if !found {
			return nil, fmt.Errorf("fake kernel: no key %s:%s in the keyring", typ, desc)
		}
		key = k
	} else {
		var err error
		if key, err = hex.DecodeString(p.Key.Payload()); err != nil {
			return nil, err
		}
	}
	c := &fakeCipher{}
	h := sha512.Sum512(append([]byte(string(p.Cipher)+"\x00"), key...))
	c.seed = binary.LittleEndian.Uint64(h[:])
	for i := range c.pad {
		if i%8 == 0 {
			h = sha512.Sum512(h[:])
		}
		c.pad[i] = binary.LittleEndian.Uint64(h[(i%8)*8:])
	}
	if len(cipherCache) > 4096 {
		// Every table load makes new Crypt values: keep the cache small
		// (a miss costs a few hashes).
		clear(cipherCache)
	}
	cipherCache[p] = c
	return c, nil
}

// suspendedOnPath reports whether any dm device a write to dev at s would
// traverse is suspended.
func (w *fakeWorld) suspendedOnPath(dev dmtable.Dev, s Sectors) bool {
	fd, ok := w.byDev(dev)
	if !ok {
		return false
	}
	if fd.suspended {
		return true
	}
	for _, t := range fd.live {
		if Sectors(t.Start) > s || s >= Sectors(t.End()) {
			continue
		}
		rel := s - Sectors(t.Start)
		for _, r := range t.Params.Devices() {
			n, _ := r.Dev()
			// Good enough for linear and mirror legs: offset + rel.
			var off Sectors
			switch p := t.Params.(type) {
			case *dmtable.Linear:
				off = Sectors(p.Offset)
			case *dmtable.Crypt:
				off = Sectors(p.Offset)
			case *dmtable.Mirror:
				for _, l := range p.Legs {
					if l.Dev == r {
						off = Sectors(l.Offset)
					}
				}
			}
			if w.suspendedOnPath(n, off+rel) {
				return true
			}
		}
	}
	return false
}

// userWrite writes data at sector off of dm device name as an
// application would, then flushes (fsync). ack runs when the write is
// durable: at once, or when the suspended stack resumes.
func (w *fakeWorld) userWrite(name string, off Sectors, data []byte, ack func()) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.userWriteLocked(fakeWrite{dev: name, off: off, data: data, ack: ack})
}

func (w *fakeWorld) userWriteLocked(fw fakeWrite) error {
	fd, ok := w.devs[fw.dev]
	if !ok {
		return fmt.Errorf("no device %s", fw.dev)
	}
	n := Sectors(len(fw.data) / fakeSector)
	for i := Sectors(0); i < n; i++ {
		if w.suspendedOnPath(fd.dev, fw.off+i) {
			w.pending = append(w.pending, fw)
			return nil
		}
	}
	for i := Sectors(0); i < n; i++ {
		if err := w.io(fd.dev, fw.off+i, fw.data[i*fakeSector:(i+1)*fakeSector], true); err != nil {
			return err
		}
	}
	for _, d := range w.disks {
		d.flush()
	}
	if fw.ack != nil {
		fw.ack()
	}
	return nil
}

func (w *fakeWorld) userRead(name string, off Sectors, n Sectors) ([]byte, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	fd, ok := w.devs[name]
	if !ok {
		return nil, fmt.Errorf("no device %s", name)
	}
	out := make([]byte, n*fakeSector)
	for i := Sectors(0); i < n; i++ {
		if err := w.io(fd.dev, off+i, out[i*fakeSector:(i+1)*fakeSector], false); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// --- DeviceMapper ---------------------------------------------------

type fakeDM struct{ w *fakeWorld }

func (f fakeDM) note(format string, a ...any) { f.w.log = append(f.w.log, fmt.Sprintf(format, a...)) }

// kernelCopy is what the kernel keeps of a table: the parsed payload
// string, keys included, sharing nothing with the caller's values.
func kernelCopy(t dmtable.Table) (dmtable.Table, error) {
	return dmtable.ParseTable(t.Payload())
}

func (f fakeDM) checkRefs(t dmtable.Table) error {
	for _, r := range t.Devices() {
		n, ok := r.Dev()
		if !ok {
			return fmt.Errorf("fake kernel: path reference %s", r)
		}
		if _, ok := f.w.disks[n]; ok {
			continue
		}
		if x, ok := f.w.byDev(n); !ok {
			return fmt.Errorf("fake kernel: table references missing device %v", n)
		} else if len(x.live) == 0 {
			// The kernel registers a dm device's block device with its
			// first table: before that, a reference to it is ENXIO.
			return fmt.Errorf("fake kernel: table references device %v (%s), which has no table yet: %w", n, x.name, ErrNoDevice)
		}
	}
	if err := checkFakeCrypt(t); err != nil {
		return err
	}
	return t.Validate()
}

func (f fakeDM) Create(name, uuid string, t dmtable.Table) (DevInfo, error) {
	if h := f.w.createHook; h != nil {
		h(name, uuid)
	}
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	if _, ok := f.w.devs[name]; ok {
		return DevInfo{}, fmt.Errorf("create %s: %w", name, errors.New("device exists"))
	}
	for _, d := range f.w.devs {
		if uuid != "" && d.uuid == uuid {
			return DevInfo{}, fmt.Errorf("create %s: uuid %s in use", name, uuid)
		}
	}
	if err := f.checkRefs(t); err != nil {
		return DevInfo{}, err
	}
	kt, err := kernelCopy(t)
	if err != nil {
		return DevInfo{}, err
	}
	f.w.nextMin++
	d := &fakeDev{name: name, uuid: uuid, dev: dmtable.Dev{Major: 253, Minor: f.w.nextMin}, live: kt}
	f.w.devs[name] = d
	f.w.startMirrors(d)
	f.note("create %s", name)
	return f.info(d), nil
}

func (f fakeDM) info(d *fakeDev) DevInfo {
	open := int32(0)
	for _, o := range f.w.devs {
		for _, r := range o.live.Devices() {
			if n, _ := r.Dev(); n == d.dev {
				open++
			}
		}
	}
	return DevInfo{Name: d.name, UUID: d.uuid, Dev: d.dev, Suspended: d.suspended, EventNr: d.eventNr, OpenCount: open, Live: len(d.live) > 0, Inactive: len(d.inactive) > 0}
}

func (f fakeDM) get(name string) (*fakeDev, error) {
	d, ok := f.w.devs[name]
	if !ok {
		return nil, fmt.Errorf("device %s: %w", name, ErrNoDevice)
	}
	return d, nil
}

func (f fakeDM) Load(name string, t dmtable.Table) error {
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	d, err := f.get(name)
	if err != nil {
		return err
	}
	if err := f.checkRefs(t); err != nil {
		return err
	}
	kt, err := kernelCopy(t)
	if err != nil {
		return err
	}
	d.inactive = kt
	return nil
}

func (f fakeDM) ClearInactive(name string) error {
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	d, err := f.get(name)
	if err != nil {
		return err
	}
	d.inactive = nil
	return nil
}

func (f fakeDM) Suspend(name string) error {
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	d, err := f.get(name)
	if err != nil {
		return err
	}
	d.suspended = true
	return nil
}

func (f fakeDM) SuspendNoFlush(name string) error { return f.Suspend(name) }

func (f fakeDM) Resume(name string) error {
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	d, err := f.get(name)
	if err != nil {
		return err
	}
	if len(d.inactive) > 0 {
		if !d.suspended {
			return fmt.Errorf("fake kernel: swapping the table of %s without suspending it first", name)
		}
		d.live, d.inactive = d.inactive, nil
		f.w.startMirrors(d)
		f.note("swap %s: %s", name, d.live)
	}
	d.suspended = false
	// Writes that waited for the stack run now, through the new tables.
	pend := f.w.pending
	f.w.pending = nil
	for _, p := range pend {
		if err := f.w.userWriteLocked(p); err != nil {
			return err
		}
	}
	return nil
}

// startMirrors resets the sync state of every mirror target of d's live
// table: a freshly loaded mirror with a core log copies everything again.
func (w *fakeWorld) startMirrors(d *fakeDev) {
	d.mirrors = nil
	for _, t := range d.live {
		m, ok := t.Params.(*dmtable.Mirror)
		if !ok {
			continue
		}
		reg := Sectors(m.Log.RegionSize)
		total := int((Sectors(t.Length) + reg - 1) / reg)
		fm := &fakeMirror{start: Sectors(t.Start), length: Sectors(t.Length), region: reg, total: total, failed: make([]bool, len(m.Legs)), legs: m.Legs}
		if w.failLeg >= 0 && w.failLeg < len(m.Legs) {
			fm.failed[w.failLeg] = true
			w.failLeg = -1
		}
		d.mirrors = append(d.mirrors, fm)
	}
}

// progressMirrors copies regions of every syncing mirror of d (what
// kcopyd does in the background) and raises the event when one completes.
func (w *fakeWorld) progressMirrors(d *fakeDev) error {
	for _, m := range d.mirrors {
		if m.synced >= m.total {
			continue
		}
		n := m.total - m.synced
		if w.syncStep > 0 && n > w.syncStep {
			n = w.syncStep
		}
		buf := make([]byte, fakeSector)
		for i := 0; i < n; i++ {
			r := Sectors(m.synced)
			for s := r * m.region; s < min((r+1)*m.region, m.length); s++ {
				src, _ := m.legs[0].Dev.Dev()
				if err := w.io(src, Sectors(m.legs[0].Offset)+s, buf, false); err != nil {
					return err
				}
				for _, l := range m.legs[1:] {
					dst, _ := l.Dev.Dev()
					if err := w.io(dst, Sectors(l.Offset)+s, buf, true); err != nil {
						return err
					}
				}
			}
			m.synced++
		}
		if m.synced == m.total {
			d.eventNr++
		}
	}
	return nil
}

func (f fakeDM) Remove(name string) error {
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	d, err := f.get(name)
	if err != nil {
		return err
	}
	if f.info(d).OpenCount > 0 {
		return fmt.Errorf("remove %s: device is busy (in use by another table)", name)
	}
	delete(f.w.devs, name)
	f.note("remove %s", name)
	return nil
}

// RemoveDeferred: the fake has no openers but tables, which a deferred
// remove would not wait for either.
func (f fakeDM) RemoveDeferred(name string) (bool, error) {
	if err := f.Remove(name); err != nil {
		return false, err
	}
	return true, nil
}

func (f fakeDM) Info(name string) (DevInfo, error) {
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	d, err := f.get(name)
	if err != nil {
		return DevInfo{}, err
	}
	return f.info(d), nil
}

func (f fakeDM) Table(name string) (dmtable.Table, error) {
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	d, err := f.get(name)
	if err != nil {
		return nil, err
	}
	return d.live.Clone(), nil
}

func (f fakeDM) Status(name string) ([]dmtable.TargetStatus, error) {
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	d, err := f.get(name)
	if err != nil {
		return nil, err
	}
	var out []dmtable.TargetStatus
	for _, t := range d.live {
		line := fmt.Sprintf("%d %d %s", t.Start, t.Length, t.Type())
		if m, ok := t.Params.(*dmtable.Mirror); ok {
			var fm *fakeMirror
			for _, x := range d.mirrors {
				if x.start == Sectors(t.Start) {
					fm = x
				}
			}
			health := ""
			for i := range m.Legs {
				if fm.failed[i] {
					health += "D"
				} else {
					health += "A"
				}
			}
			line += fmt.Sprintf(" %d %s %s %d/%d 1 %s 1 core", len(m.Legs), m.Legs[0].Dev, m.Legs[1].Dev, fm.synced, fm.total, health)
		}
		ts, err := dmtable.ParseStatus(line)
		if err != nil {
			return nil, fmt.Errorf("fake status %q: %w", line, err)
		}
		out = append(out, ts)
	}
	return out, nil
}

func (f fakeDM) WaitEvent(ctx context.Context, name string, after uint32, timeout time.Duration) (uint32, error) {
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	d, err := f.get(name)
	if err != nil {
		return 0, err
	}
	if !d.suspended {
		if err := f.w.progressMirrors(d); err != nil {
			return 0, err
		}
	}
	return d.eventNr, nil
}

func (f fakeDM) List() ([]DevInfo, error) {
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	var out []DevInfo
	for _, d := range f.w.devs {
		out = append(out, f.info(d))
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

func (f fakeDM) Deps(name string) ([]dmtable.Dev, error) {
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	d, err := f.get(name)
	if err != nil {
		return nil, err
	}
	seen := map[dmtable.Dev]bool{}
	var out []dmtable.Dev
	for _, r := range d.live.Devices() {
		if n, ok := r.Dev(); ok && !seen[n] {
			seen[n] = true
			out = append(out, n)
		}
	}
	return out, nil
}

func (f fakeDM) SetUUID(name, uuid string) error {
	f.w.mu.Lock()
	defer f.w.mu.Unlock()
	d, err := f.get(name)
	if err != nil {
		return err
	}
	if d.uuid != "" {
		return fmt.Errorf("set uuid of %s: it already has one", name)
	}
	d.uuid = uuid
	return nil
}

// --- Host ---------------------------------------------------------

type fakeHost struct {
	w        *fakeWorld
	users    map[dmtable.Dev][]string
	fileDev  dmtable.Dev
	memoryFS string // what MemoryFS says of every path
	locked   map[dmtable.Dev]bool
	lockMu   sync.Mutex
	lbs      uint32
	diskByPt map[string]dmtable.Dev
	gone     map[int]bool // the processes that no longer exist
	// holders are the other processes holding a disk's run lock.
	holders map[dmtable.Dev]int
}

func (h *fakeHost) ProcessExists(pid int) bool { return !h.gone[pid] }

func (h *fakeHost) LockHolder(disk dmtable.Dev) (int, bool) {
	pid, ok := h.holders[disk]
	return pid, ok
}

func (h *fakeHost) Stat(path string) (DiskInfo, error) {
	h.w.mu.Lock()
	defer h.w.mu.Unlock()
	dev, ok := h.diskByPt[path]
	if !ok {
		return DiskInfo{}, fmt.Errorf("%s: no such block device", path)
	}
	d := h.w.disks[dev]
	lbs := h.lbs
	if lbs == 0 {
		lbs = 512
	}
	return DiskInfo{Path: path, Dev: dev, Size: d.size(), LogicalBlockSize: lbs}, nil
}

type fakeDiskIO struct {
	w   *fakeWorld
	dev dmtable.Dev
}

func (d fakeDiskIO) rw(p []byte, off int64, write bool) (int, error) {
	d.w.mu.Lock()
	defer d.w.mu.Unlock()
	if off%fakeSector != 0 || len(p)%fakeSector != 0 {
		return 0, fmt.Errorf("unaligned direct I/O at %d+%d", off, len(p))
	}
	disk := d.w.disks[d.dev]
	if write && d.w.writeFault != nil {
		if err := d.w.writeFault(off, p); err != nil {
			return 0, err
		}
	}
	for i := 0; i < len(p)/fakeSector; i++ {
		s := uint64(off/fakeSector) + uint64(i)
		if s >= uint64(disk.size()) {
			return i * fakeSector, io.EOF
		}
		if write {
			disk.writeSector(s, p[i*fakeSector:(i+1)*fakeSector])
		} else {
			disk.readSector(s, p[i*fakeSector:(i+1)*fakeSector])
		}
	}
	return len(p), nil
}

func (d fakeDiskIO) ReadAt(p []byte, off int64) (int, error)  { return d.rw(p, off, false) }
func (d fakeDiskIO) WriteAt(p []byte, off int64) (int, error) { return d.rw(p, off, true) }
func (d fakeDiskIO) Flush() error {
	d.w.mu.Lock()
	defer d.w.mu.Unlock()
	d.w.disks[d.dev].flush()
	return nil
}
func (d fakeDiskIO) Close() error { return nil }

func (h *fakeHost) OpenDisk(path string) (Disk, error) {
	if name, ok := strings.CutPrefix(path, "/dev/mapper/"); ok {
		return fakeDMIO{w: h.w, name: name}, nil
	}
	dev, ok := h.diskByPt[path]
	if !ok {
		return nil, fmt.Errorf("%s: no such disk", path)
	}
	return fakeDiskIO{w: h.w, dev: dev}, nil
}

// fakeDMIO is direct I/O to a dm device (the in-place rewrite reads and
// writes through the helpers). A device on a suspended path refuses it:
// the engine must never wait on its own suspension.
type fakeDMIO struct {
	w    *fakeWorld
	name string
}

func (d fakeDMIO) rw(p []byte, off int64, write bool) (int, error) {
	d.w.mu.Lock()
	defer d.w.mu.Unlock()
	fd, ok := d.w.devs[d.name]
	if !ok {
		return 0, fmt.Errorf("/dev/mapper/%s: no such device", d.name)
	}
	if off%fakeSector != 0 || len(p)%fakeSector != 0 {
		return 0, fmt.Errorf("unaligned direct I/O at %d+%d", off, len(p))
	}
	for i := 0; i < len(p)/fakeSector; i++ {
		s := Sectors(off/fakeSector) + Sectors(i)
		if d.w.suspendedOnPath(fd.dev, s) {
			return 0, fmt.Errorf("/dev/mapper/%s: I/O at sector %d would wait on a suspended device", d.name, s)
		}
		if err := d.w.io(fd.dev, s, p[i*fakeSector:(i+1)*fakeSector], write); err != nil {
			return i * fakeSector, err
		}
	}
	return len(p), nil
}

func (d fakeDMIO) ReadAt(p []byte, off int64) (int, error)  { return d.rw(p, off, false) }
func (d fakeDMIO) WriteAt(p []byte, off int64) (int, error) { return d.rw(p, off, true) }

// Flush reaches every disk (a flush through a dm device goes to all the
// devices under it).
func (d fakeDMIO) Flush() error {
	d.w.mu.Lock()
	defer d.w.mu.Unlock()
	for _, disk := range d.w.disks {
		disk.flush()
	}
	return nil
}
func (d fakeDMIO) Close() error { return nil }

func (h *fakeHost) DevicePath(dev dmtable.Dev) (string, error) {
	for p, d := range h.diskByPt {
		if d == dev && !strings.HasPrefix(p, "/dev/block/") {
			return p, nil
		}
	}
	return "", fmt.Errorf("no device %v", dev)
}

func (h *fakeHost) FileDevice(path string) (dmtable.Dev, error) { return h.fileDev, nil }
func (h *fakeHost) MemoryFS(path string) string                 { return h.memoryFS }
func (h *fakeHost) Users(dev dmtable.Dev) ([]string, error)     { return h.users[dev], nil }
func (h *fakeHost) NodePath(name string) string                 { return "/dev/mapper/" + name }
func (h *fakeHost) Lock(d DiskInfo) (func(), error) {
	h.lockMu.Lock()
	defer h.lockMu.Unlock()
	if h.locked == nil {
		h.locked = map[dmtable.Dev]bool{}
	}
	if h.locked[d.Dev] {
		return nil, busy(d.Path, "another dmconvert is working on it")
	}
	h.locked[d.Dev] = true
	return func() {
		h.lockMu.Lock()
		defer h.lockMu.Unlock()
		delete(h.locked, d.Dev)
	}, nil
}

// --- LVM ------------------------------------------------------------

type fakeLV struct {
	name string
	segs []Extent // PV sector ranges, in LV order (On unused)
}

func (l fakeLV) size() Sectors {
	var n Sectors
	for _, s := range l.segs {
		n += s.End - s.Start
	}
	return n
}

type fakeLVM struct {
	w       *fakeWorld
	pv      PV
	lvs     []fakeLV
	fenced  bool
	refresh []string
	// asked counts Discover and State calls.
	asked int
	// notPV: what the mapping carries is not a PV (a file system): LVM
	// finds nothing, at plan time or at boot.
	notPV bool
	// refreshErr fails Refresh (LVM's filter rejecting the new device).
	refreshErr error
	// filterErr is CheckFilters' answer; filterNames the names it was
	// last asked about.
	filterErr   error
	filterNames []string
}

func (l *fakeLVM) CheckFilters(ctx context.Context, names []string) error {
	l.filterNames = append([]string(nil), names...)
	return l.filterErr
}

func (l *fakeLVM) Discover(ctx context.Context, device string) (*PV, error) {
	l.asked++
	if l.notPV {
		return nil, fmt.Errorf("fake lvm: %s: %w", device, ErrNotPV)
	}
	pv := l.pv
	return &pv, nil
}

func (l *fakeLVM) Fence(ctx context.Context, vg string) (func() error, error) {
	if l.fenced {
		return nil, errors.New("fake lvm: VG already fenced")
	}
	// lvm's fence checks the VG exists (vgs): some usable device must
	// carry the PV.
	if !l.visible() {
		return nil, fmt.Errorf("fake lvm: volume group %s: no such volume group", vg)
	}
	l.fenced = true
	return func() error { l.fenced = false; return nil }, nil
}

func (l *fakeLVM) ShrinkPV(ctx context.Context, device string, size Sectors) error {
	if size < l.pv.UsedEnd {
		return errors.New("fake lvm: cannot shrink over used extents")
	}
	l.pv.Size = size
	l.pv.VGSeqno++ // a metadata change, as in lvm
	return nil
}

func (l *fakeLVM) State(ctx context.Context, device string) (string, string, uint64, error) {
	l.asked++
	return l.pv.UUID, l.pv.VG, l.pv.VGSeqno, nil
}

// Activate creates the LVs on the first of devices that carries the PV
// label, like LVM scanning them.
func (l *fakeLVM) Activate(ctx context.Context, vg string, devices []string) error {
	for _, p := range devices {
		name := strings.TrimPrefix(p, "/dev/mapper/")
		var dev dmtable.Dev
		l.w.mu.Lock()
		if d, ok := l.w.devs[name]; ok {
			dev = d.dev
		} else {
			for _, d := range l.w.disks {
				if d.path == p {
					dev = d.dev
				}
			}
		}
		l.w.mu.Unlock()
		if dev.IsZero() {
			continue
		}
		if l.unusable(dev) {
			continue
		}
		if ok, err := l.hasLabel(dev); err != nil || !ok {
			continue
		}
		return l.activateOn(dev)
	}
	return fmt.Errorf("fake lvm: no device among %v carries the PV of %s", devices, vg)
}

// unusable: a dm device LVM skips (suspended, or with a mirror target).
func (l *fakeLVM) unusable(dev dmtable.Dev) bool {
	l.w.mu.Lock()
	defer l.w.mu.Unlock()
	d, ok := l.w.byDev(dev)
	if !ok {
		return false
	}
	if d.suspended {
		return true
	}
	for _, t := range d.live {
		if _, ok := t.Params.(*dmtable.Mirror); ok {
			return true
		}
	}
	return false
}

// visible reports whether LVM would find the PV: on a raw disk, or on a
// dm device that is usable to LVM (not suspended, no mirror target:
// "Scanning mirror devices is disabled").
func (l *fakeLVM) visible() bool {
	for _, d := range l.w.disks {
		if ok, _ := l.hasLabel(d.dev); ok {
			return true
		}
	}
	l.w.mu.Lock()
	var devs []dmtable.Dev
	for _, d := range l.w.devs {
		usable := !d.suspended
		for _, t := range d.live {
			if _, ok := t.Params.(*dmtable.Mirror); ok {
				usable = false
			}
		}
		if usable && !strings.HasPrefix(d.uuid, "LVM-") {
			devs = append(devs, d.dev)
		}
	}
	l.w.mu.Unlock()
	for _, dev := range devs {
		if ok, _ := l.hasLabel(dev); ok {
			return true
		}
	}
	return false
}

func (l *fakeLVM) hasLabel(dev dmtable.Dev) (bool, error) {
	l.w.mu.Lock()
	defer l.w.mu.Unlock()
	b := make([]byte, 4096)
	for i := 0; i < 8; i++ {
		if err := l.w.io(dev, Sectors(i), b[i*512:(i+1)*512], false); err != nil {
			return false, err
		}
	}
	return HasLVMLabel(b), nil
}

func (l *fakeLVM) activateOn(dev dmtable.Dev) error {
	dm := fakeDM{l.w}
	for _, lv := range l.lvs {
		if _, err := dm.Info(lv.name); err == nil {
			continue
		}
		var t dmtable.Table
		var at Sectors
		for _, s := range lv.segs {
			t = append(t, linearTarget(at, s.End-s.Start, dev, s.Start))
			at += s.End - s.Start
		}
		if _, err := dm.Create(lv.name, "LVM-"+lv.name, t); err != nil {
			return err
		}
	}
	return nil
}

// boot models boot-time autoactivation: LVM scans the raw disks and
// activates the VG on one that carries the label.
func (l *fakeLVM) boot() error {
	if l.notPV {
		return nil
	}
	for _, d := range l.w.disks {
		if ok, _ := l.hasLabel(d.dev); ok {
			return l.activateOn(d.dev)
		}
	}
	return nil
}

// LocatePV: the fake world's VG has one PV, the one being converted.
func (l *fakeLVM) LocatePV(ctx context.Context, uuid, hint string) string { return hint }

func (l *fakeLVM) Refresh(ctx context.Context, oldDev, newDev string) error {
	if l.notPV {
		// As lvm: the device carries no PV label.
		return fmt.Errorf("fake lvm: %s is not an LVM physical volume", newDev)
	}
	if l.refreshErr != nil {
		return l.refreshErr
	}
	l.refresh = append(l.refresh, oldDev+"->"+newDev)
	return nil
}

// --- a fake LUKS header ---------------------------------------------

// fakeHeader is a stand-in for the luks package in engine unit tests: the
// magic at byte 0, an in-progress or final mark, and the checkpoint as
// JSON with a CRC in the second 4 KiB block. The key is held in memory.
type fakeHeader struct {
	h   Sectors
	key []byte
	// A rekey: the staged new key (kept in the fake image, in clear: a
	// test stand-in) and, with others, keyslots the passphrase does not
	// open.
	newKey []byte
	others []int
	// staged is the cipher StageRekey was given (the image does not keep
	// it: the final header takes the cipher from Final, as LUKSHeader).
	staged string
}

// fakeKeyslotsEnd is where the fake header's keyslots end (sectors).
const fakeKeyslotsEnd = 32

func (f *fakeHeader) StageRekey(newKey, pass []byte, cipher string) error {
	if f.newKey != nil {
		return errors.New("already staged")
	}
	f.newKey = append([]byte(nil), newKey...)
	f.staged = cipher
	return nil
}
func (f *fakeHeader) KeyslotsEnd() Sectors { return fakeKeyslotsEnd }
func (f *fakeHeader) OtherKeyslots() []int { return f.others }

// fakeStaged returns the new key a fake header image holds, if any: its
// length in the byte after the "NEWKEY00" mark, then the key.
func fakeStaged(img []byte) []byte {
	if len(img) < 8192+17 || string(img[8192+8:8192+16]) != "NEWKEY00" {
		return nil
	}
	n := int(img[8192+16])
	return append([]byte(nil), img[8192+17:8192+17+n]...)
}

var errFakeNoCheckpoint = errors.New("no checkpoint")

func (f *fakeHeader) Sectors() Sectors { return f.h }
func (f *fakeHeader) UUID() string     { return "01234567-89ab-cdef-0123-456789abcdef" }
func (f *fakeHeader) Version() int     { return 2 }
func (f *fakeHeader) Crypt() CryptSpec {
	return CryptSpec{Cipher: "aes-xts-plain64", KeyBytes: len(f.key), SectorSize: 512}
}

func (f *fakeHeader) cpBlock(cp Checkpoint) []byte {
	b := make([]byte, 4096)
	j, _ := json.Marshal(cp)
	binary.LittleEndian.PutUint32(b[0:], uint32(len(j)))
	binary.LittleEndian.PutUint32(b[4:], crc32.ChecksumIEEE(j))
	copy(b[8:], j)
	return b
}

func (f *fakeHeader) Image(cp Checkpoint) ([]byte, error) {
	img := make([]byte, f.h*512)
	copy(img, "LUKS\xba\xbe")
	copy(img[8:], "INPROGRESS")
	copy(img[168:], f.UUID()) // where LUKS headers keep it
	copy(img[4096:], f.cpBlock(cp))
	copy(img[8192:], "keyslots")
	if f.newKey != nil {
		copy(img[8192+8:], "NEWKEY00")
		img[8192+16] = byte(len(f.newKey))
		copy(img[8192+17:], f.newKey)
	}
	return img, nil
}

func (f *fakeHeader) CheckpointWrites(cp Checkpoint) ([]Write, error) {
	return []Write{{Off: 4096, Data: f.cpBlock(cp)}}, nil
}

func (f *fakeHeader) FinalWrites(fin Final) ([]Write, error) {
	b := make([]byte, 512)
	copy(b, "LUKS\xba\xbe")
	copy(b[8:], "FINAL")
	copy(b[168:], f.UUID())
	if fin.Rekey {
		// The data segment now has the new key at a new offset, and
		// the cipher Final names (the header's own when empty).
		cipher := fin.Cipher
		if cipher == "" {
			cipher = f.Crypt().Cipher
		}
		copy(b[16:], fmt.Sprintf("REKEY %d %d %s", fin.DataOffset, len(f.newKey), cipher))
		copy(b[256:], f.newKey)
	}
	// The staged key's slot goes (rekeyed: the old key's goes, and the
	// new key is the data's).
	ws := []Write{{Off: 0, Data: b}, {Off: 4096, Data: make([]byte, 4096)}}
	if f.newKey != nil {
		// The staged key's bytes go; the keyslots area's mark stays.
		ks := make([]byte, 512)
		copy(ks, "keyslots")
		ws = append(ws, Write{Off: 8192, Data: ks})
	}
	return ws, nil
}

// fakeRekeyed is what a final fake header says of a finished rekey.
type fakeRekeyed struct {
	off    Sectors
	key    []byte
	cipher string
}

// fakeFinalRekey reads a final fake header: the data offset, key and
// cipher of a finished rekey (ok false: not a rekeyed header).
func fakeFinalRekey(r io.ReaderAt) (fr fakeRekeyed, ok bool) {
	b := make([]byte, 512)
	r.ReadAt(b, 0)
	var o int64
	var n int
	if _, err := fmt.Sscanf(string(bytes.TrimRight(b[16:96], "\x00")), "REKEY %d %d %s", &o, &n, &fr.cipher); err != nil || n <= 0 || n > 128 {
		return fakeRekeyed{}, false
	}
	fr.off, fr.key = Sectors(o), append([]byte(nil), b[256:256+n]...)
	return fr, true
}

func (f *fakeHeader) MarkWrites(cp Checkpoint) ([]Write, error) {
	b := make([]byte, 512)
	copy(b, "LUKS\xba\xbe")
	copy(b[8:], "INPROGRESS")
	copy(b[168:], f.UUID())
	var ws []Write
	if f.newKey != nil {
		img, _ := f.Image(cp)
		ws = append(ws, Write{Off: 8192, Data: img[8192 : 8192+512], Flush: true})
	}
	return append(ws, Write{Off: 4096, Data: f.cpBlock(cp), Flush: true}, Write{Off: 0, Data: b, Flush: true}), nil
}

func (f *fakeHeader) ReadCheckpoint(r io.ReaderAt) (Checkpoint, bool, error) {
	b := make([]byte, 4096)
	if _, err := r.ReadAt(b, 4096); err != nil {
		return Checkpoint{}, false, err
	}
	n := binary.LittleEndian.Uint32(b[0:])
	if n == 0 || n > 4000 || crc32.ChecksumIEEE(b[8:8+n]) != binary.LittleEndian.Uint32(b[4:]) {
		return Checkpoint{}, false, nil
	}
	cp, err := unmarshalCheckpoint(b[8 : 8+n])
	return cp, err == nil, err
}

func (f *fakeHeader) isFinal(r io.ReaderAt) bool {
	b := make([]byte, 512)
	r.ReadAt(b, 0)
	ks := make([]byte, 512)
	r.ReadAt(ks, 8192)
	// The keyslots area is there too (a header-gap decrypt overwrites
	// it; its abort must write it back).
	return bytes.HasPrefix(b, []byte("LUKS\xba\xbe")) && bytes.HasPrefix(b[8:], []byte("FINAL")) && (f.h*512 < 8192+8 || string(ks[:8]) == "keyslots")
}
