package convert

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash/crc32"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Helpers for the real-kernel tests: build a live LVM stack on a disk,
// keep writers busy on it, and verify every acknowledged write later,
// possibly in another boot (the acknowledgements go to a separate state
// disk).

func sh(t testing.TB, name string, args ...string) string {
	t.Helper()
	return shIn(t, nil, name, args...)
}

// shIn is sh with stdin as the command's standard input.
func shIn(t testing.TB, stdin []byte, name string, args ...string) string {
	t.Helper()
	cmd := exec.Command(name, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

func shOK(name string, args ...string) (string, error) {
	out, err := exec.Command(name, args...).CombinedOutput()
	return string(out), err
}

// stack describes the LVM layout a test builds.
type stack struct {
	Tag     string   `json:"tag"`
	Disk    string   `json:"disk"`
	VG      string   `json:"vg"`
	PVSize  uint64   `json:"pv_size_sectors"`
	Mounts  []string `json:"mounts"` // mount points of the file system LVs
	RawLV   string   `json:"raw_lv"` // device path of the raw LV
	FSLVs   []string `json:"fs_lvs"` // lv names with a file system, in Mounts order
	FSTypes []string `json:"fs_types"`
	Sizes   []uint64 `json:"fs_sizes"` // file system sizes in bytes, to check after
}

// buildStack makes a PV on disk (leaving 2*header of room at the end),
// a VG with an ext4 LV, an xfs LV and a raw LV, mounts the file systems
// and fills them with files whose checksums go into a manifest on the
// state directory.
func buildStack(t testing.TB, disk, state string, header uint64) *stack {
	return buildStackTag(t, "t", disk, state, header, true)
}

// buildStackTag builds the stack with VG "vg<tag>", its state files
// prefixed with the tag; shrunk=false leaves the PV on the whole disk
// (its last extents free), for --shrink-pv.
func buildStackTag(t testing.TB, tag, disk, state string, header uint64, shrunk bool) *stack {
	t.Helper()
	size := diskSectors(t, disk)
	pvSize := size - 2*header
	vg := "vg" + tag
	if shrunk {
		sh(t, "pvcreate", "-y", "--setphysicalvolumesize", fmt.Sprintf("%ds", pvSize), disk)
	} else {
		sh(t, "pvcreate", "-y", disk)
		pvSize = size
	}
	sh(t, "vgcreate", "-y", vg, disk)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "ext", "-L", "96m", vg)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "xfs", "-L", "304m", vg)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-L", "24m", vg)
	sh(t, "vgchange", "-ay", vg)
	st := &stack{Tag: tag, Disk: disk, VG: vg, PVSize: pvSize, RawLV: "/dev/mapper/" + vg + "-raw"}
	for _, fs := range []struct{ lv, typ string }{{"ext", "ext4"}, {"xfs", "xfs"}} {
		dev := "/dev/mapper/" + vg + "-" + fs.lv
		mp := "/mnt/" + tag + "-" + fs.lv
		if fs.typ == "ext4" {
			sh(t, "mkfs.ext4", "-q", "-F", dev)
		} else {
			sh(t, "mkfs.xfs", "-q", "-f", dev)
		}
		os.MkdirAll(mp, 0o755)
		sh(t, "mount", dev, mp)
		st.Mounts = append(st.Mounts, mp)
		st.FSLVs = append(st.FSLVs, fs.lv)
		st.FSTypes = append(st.FSTypes, fs.typ)
		st.Sizes = append(st.Sizes, blockDevBytes(t, dev))
	}
	writeManifest(t, st, state)
	return st
}

// writeManifest fills the mounted file systems with files of random
// content and records their checksums and the stack description on the
// state disk.
func writeManifest(t testing.TB, st *stack, state string) {
	t.Helper()
	// Files with known content, spread over the file systems.
	var manifest []string
	for i, mp := range st.Mounts {
		dir := filepath.Join(mp, "data")
		os.MkdirAll(dir, 0o755)
		for j := 0; j < 12; j++ {
			b := make([]byte, 256<<10+j*4096)
			rand.Read(b)
			p := filepath.Join(dir, fmt.Sprintf("f%d-%d", i, j))
			if err := os.WriteFile(p, b, 0o644); err != nil {
				t.Fatal(err)
			}
			sum := sha256.Sum256(b)
			manifest = append(manifest, hex.EncodeToString(sum[:])+"  "+strings.TrimPrefix(p, mp+"/")+"  "+mp)
		}
	}
	sh(t, "sync")
	writeFileSync(t, st.file(state, "manifest"), []byte(strings.Join(manifest, "\n")+"\n"))
	b, _ := json.Marshal(st)
	writeFileSync(t, st.file(state, "stack.json"), b)
	syncDir(t, state)
}

// writeFileSync writes a file and fsyncs it: the next boot may follow a
// power cut.
func writeFileSync(t testing.TB, path string, b []byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(b); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
}

func syncDir(t testing.TB, dir string) {
	f, err := os.Open(dir)
	if err == nil {
		f.Sync()
		f.Close()
	}
}

// file is the path of one of the stack's state files.
func (st *stack) file(state, name string) string {
	return filepath.Join(state, st.Tag+"-"+name)
}

func loadStack(t testing.TB, state, tag string) *stack {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(state, tag+"-stack.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st stack
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	return &st
}

func diskSectors(t testing.TB, dev string) uint64 {
	return blockDevBytes(t, dev) / 512
}

func blockDevBytes(t testing.TB, dev string) uint64 {
	t.Helper()
	out := strings.TrimSpace(sh(t, "blockdev", "--getsize64", dev))
	n, err := strconv.ParseUint(out, 10, 64)
	if err != nil {
		t.Fatalf("blockdev %s: %q", dev, out)
	}
	return n
}

// mountState formats (first time) and mounts the state disk.
func mountState(t testing.TB, dev string, format bool) string {
	t.Helper()
	if format {
		sh(t, "mkfs.ext4", "-q", "-F", dev)
	}
	os.MkdirAll("/state", 0o755)
	if !isMounted("/state") {
		sh(t, "mount", dev, "/state")
	}
	return "/state"
}

// isMounted reports whether dir is a mount point (from /proc/mounts).
func isMounted(dir string) bool {
	b, _ := os.ReadFile("/proc/mounts")
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) > 1 && f[1] == dir {
			return true
		}
	}
	return false
}

// --- the writer ------------------------------------------------------

// record is one 4 KiB block a writer writes: magic, writer id, sequence
// number, CRC, random payload.
const recSize = 4096

var recMagic = []byte("DMCVREC1")

func makeRecord(id, seq uint64) []byte {
	b := make([]byte, recSize)
	copy(b, recMagic)
	binary.LittleEndian.PutUint64(b[8:], id)
	binary.LittleEndian.PutUint64(b[16:], seq)
	rand.Read(b[32:])
	binary.LittleEndian.PutUint32(b[24:], crc32.ChecksumIEEE(b[32:]))
	return b
}

func parseRecord(b []byte) (id, seq uint64, ok bool) {
	if !bytes.HasPrefix(b, recMagic) {
		return 0, 0, false
	}
	if crc32.ChecksumIEEE(b[32:recSize]) != binary.LittleEndian.Uint32(b[24:]) {
		return 0, 0, false
	}
	return binary.LittleEndian.Uint64(b[8:]), binary.LittleEndian.Uint64(b[16:]), true
}

// describeRecord says what a damaged record holds instead.
func describeRecord(b []byte) string {
	switch {
	case bytes.Count(b, []byte{0}) == len(b):
		return "all zeros"
	case !bytes.HasPrefix(b, recMagic):
		return fmt.Sprintf("no magic; starts %x", b[:32])
	}
	id, seq := binary.LittleEndian.Uint64(b[8:]), binary.LittleEndian.Uint64(b[16:])
	crcOK := crc32.ChecksumIEEE(b[32:]) == binary.LittleEndian.Uint32(b[24:])
	zeroTail := 0
	for i := len(b) - 1; i >= 0 && b[i] == 0; i-- {
		zeroTail++
	}
	return fmt.Sprintf("writer %d record %d, checksum ok %v, %d zero bytes at the end", id, seq, crcOK, zeroTail)
}

// writer appends records to files on the mounted file systems and writes
// them round-robin into slots of the raw LV, fsyncing each one; after
// the fsync returns, the record's sequence number is appended to an
// acknowledgement log on the state disk (fsynced too). What the log
// lists must survive anything.
type writer struct {
	st      *stack
	ackPath string
	stop    chan struct{}
	wg      sync.WaitGroup
	mu      sync.Mutex
	acks    int
	maxGap  time.Duration // the longest time one write+fsync took
	errs    []error
	cut     bool // a device under it was cut (cutIfLeftSuspended): errors are expected
}

const rawSlots = 64

// The writers' pause between two records: 40ms by default (the guest
// has one emulated CPU; a 5ms writer took most of it, and one failpoint
// case took 47s instead of 17s at 20ms, while hundreds of records per
// case are still acknowledged and checked; since session 12, 40ms for
// the suite's time: each target still writes and fsyncs 20 records a
// second, several per chunk); DMCONVERT_WRITER_PAUSE overrides.
// TestGuestEngineEncrypt runs a 5ms writer.
func defaultWriterPause() time.Duration {
	if v, err := time.ParseDuration(os.Getenv("DMCONVERT_WRITER_PAUSE")); err == nil {
		return v
	}
	return 40 * time.Millisecond
}

func startWriter(t testing.TB, st *stack, state string) *writer {
	return startWriterPaced(t, st, state, defaultWriterPause())
}

// startWriterPaced is startWriter with a pause between records.
func startWriterPaced(t testing.TB, st *stack, state string, pause time.Duration) *writer {
	w := &writer{st: st, ackPath: st.file(state, "acks"), stop: make(chan struct{})}
	ack, err := os.OpenFile(w.ackPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	targets := len(st.Mounts) + 1
	// A writer started again on the same stack continues each target's
	// sequence: a record file's next record is at its end, the raw
	// LV's after the highest acknowledged one (verifyStack wants the
	// newest record of each slot).
	next := make([]uint64, targets)
	if b, err := os.ReadFile(w.ackPath); err == nil {
		for _, l := range strings.Split(string(b), "\n") {
			var id, seq uint64
			if n, _ := fmt.Sscanf(l, "%d %d", &id, &seq); n == 2 && id < uint64(targets) && seq+1 > next[id] {
				next[id] = seq + 1
			}
		}
	}
	for id := 0; id < len(st.Mounts); id++ {
		if fi, err := os.Stat(filepath.Join(st.Mounts[id], "records")); err == nil {
			next[id] = uint64(fi.Size()) / recSize
		}
	}
	for id := 0; id < targets; id++ {
		w.wg.Add(1)
		go func(id int) {
			defer w.wg.Done()
			var f *os.File
			var err error
			if id < len(st.Mounts) {
				f, err = os.OpenFile(filepath.Join(st.Mounts[id], "records"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
			} else {
				f, err = os.OpenFile(st.RawLV, os.O_WRONLY, 0)
			}
			if err != nil {
				w.fail(err)
				return
			}
			defer f.Close()
			for seq := next[id]; ; seq++ {
				select {
				case <-w.stop:
					return
				default:
				}
				rec := makeRecord(uint64(id), seq)
				t0 := time.Now()
				if id < len(st.Mounts) {
					_, err = f.Write(rec)
				} else {
					_, err = f.WriteAt(rec, int64(seq%rawSlots)*recSize)
				}
				if err == nil {
					err = f.Sync()
				}
				if err != nil {
					w.fail(err)
					return
				}
				d := time.Since(t0)
				w.mu.Lock()
				if d > w.maxGap {
					w.maxGap = d
				}
				fmt.Fprintf(ack, "%d %d\n", id, seq)
				ack.Sync()
				w.acks++
				w.mu.Unlock()
				time.Sleep(pause)
			}
		}(id)
	}
	return w
}

func (w *writer) fail(err error) {
	w.mu.Lock()
	w.errs = append(w.errs, err)
	w.mu.Unlock()
}

func (w *writer) finish(t testing.TB) (acks int, maxGap time.Duration) {
	close(w.stop)
	done := make(chan struct{})
	go func() { w.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * time.Minute):
		// A write that never returns: a device left suspended, or I/O
		// stuck below it. Say which, instead of hanging until the VM's
		// timeout.
		info, _ := shOK("dmsetup", "info", "-c", "-o", "name,attr,open,uuid")
		table, _ := shOK("dmsetup", "table")
		t.Fatalf("the writer is blocked 3 minutes after it was told to stop (a device left suspended?)\n%s\n%s\nblocked tasks:\n%s", info, table, blockedTasks())
	}
	if len(w.errs) > 0 {
		if !w.cut {
			t.Fatalf("writer failed: %v", w.errs)
		}
		t.Logf("writer: %d writes failed after the cut, none of them acknowledged (first: %v)", len(w.errs), w.errs[0])
	}
	return w.acks, w.maxGap
}

// cutIfLeftSuspended is for a test that kills dmconvert with -9 and then
// stops its writer w. The kill may land inside a table swap: a device of
// the run (the mapping, an LV, a dmconvert-* helper) then stays
// suspended, the writer blocked in a write, and only a reboot would end
// that. Each suspended device (the guest runs one test at a time, so
// they are all the run's) loses its unswitched table and gets an error
// table of the same size, as a power cut at that instant: the blocked
// writes fail, none of them acknowledged, and nothing more reaches the
// disk through it. (Neither table can simply be resumed: a chunk
// rewritten in place may be half rewritten under the live one, and the
// unswitched one may be ahead of the journal.)
func cutIfLeftSuspended(t testing.TB, w *writer) {
	t.Helper()
	for _, l := range strings.Split(sh(t, "dmsetup", "info", "-c", "--noheadings", "--separator", " ", "-o", "name,attr"), "\n") {
		f := strings.Fields(l)
		if len(f) != 2 || !strings.Contains(f[1], "s") {
			continue
		}
		size := diskSectors(t, "/dev/mapper/"+f[0]) // the live table's size; opening does no I/O
		t.Logf("%s was left suspended by the kill (attributes %s): cut as by a power cut (an error table of %d sectors)", f[0], f[1], size)
		w.mu.Lock()
		w.cut = true
		w.mu.Unlock()
		if strings.Contains(f[1], "I") {
			sh(t, "dmsetup", "clear", f[0])
		}
		shIn(t, []byte(fmt.Sprintf("0 %d error\n", size)), "dmsetup", "load", f[0])
		sh(t, "dmsetup", "resume", f[0])
	}
}

// verifyStack checks, on an active stack (LVs under /dev/mapper/vgt-*):
// fsck clean with the sizes recorded, every manifest file, every
// acknowledged record.
func verifyStack(t testing.TB, st *stack, state string) {
	t.Helper()
	for _, mp := range st.Mounts {
		shOK("umount", mp)
	}
	for i, lv := range st.FSLVs {
		dev := "/dev/mapper/" + st.VG + "-" + lv
		// After a crash the file system's journal holds acknowledged
		// metadata: a mount replays it, as the next boot's would (a
		// read-only check of an unreplayed journal reports errors that
		// are not there).
		os.MkdirAll(st.Mounts[i], 0o755)
		if _, err := shOK("mount", dev, st.Mounts[i]); err == nil {
			sh(t, "umount", st.Mounts[i])
		}
		if got := blockDevBytes(t, dev); got != st.Sizes[i] {
			t.Fatalf("%s is %d bytes, was %d", dev, got, st.Sizes[i])
		}
		if st.FSTypes[i] == "ext4" {
			sh(t, "e2fsck", "-f", "-n", dev)
			out := sh(t, "dumpe2fs", "-h", dev)
			var blocks, bsize uint64
			for _, l := range strings.Split(out, "\n") {
				if v, ok := strings.CutPrefix(l, "Block count:"); ok {
					blocks, _ = strconv.ParseUint(strings.TrimSpace(v), 10, 64)
				}
				if v, ok := strings.CutPrefix(l, "Block size:"); ok {
					bsize, _ = strconv.ParseUint(strings.TrimSpace(v), 10, 64)
				}
			}
			if blocks*bsize == 0 || blocks*bsize > st.Sizes[i] {
				t.Fatalf("ext4 on %s claims %d bytes on a %d-byte device", dev, blocks*bsize, st.Sizes[i])
			}
		} else {
			sh(t, "xfs_repair", "-n", dev)
		}
		os.MkdirAll(st.Mounts[i], 0o755) // a fresh boot starts with an empty root
		sh(t, "mount", dev, st.Mounts[i])
	}
	// Files.
	man, err := os.ReadFile(st.file(state, "manifest"))
	if err != nil {
		t.Fatal(err)
	}
	nfiles := 0
	for _, l := range strings.Split(strings.TrimSpace(string(man)), "\n") {
		f := strings.Fields(l)
		mp := f[2]
		b, err := os.ReadFile(filepath.Join(mp, f[1]))
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(b)
		if hex.EncodeToString(sum[:]) != f[0] {
			t.Fatalf("file %s/%s changed", mp, f[1])
		}
		nfiles++
	}
	// Records: every acknowledged one is there.
	acks, _ := os.ReadFile(st.file(state, "acks"))
	last := map[uint64]uint64{}    // writer id -> highest acked seq
	slotAck := map[uint64]uint64{} // raw slot -> highest acked seq
	hasAck := map[uint64]bool{}    // raw slot acked at all
	for _, l := range strings.Split(strings.TrimSpace(string(acks)), "\n") {
		var id, seq uint64
		if _, err := fmt.Sscanf(l, "%d %d", &id, &seq); err != nil {
			continue // a torn last line of the log itself
		}
		if seq >= last[id] {
			last[id] = seq
		}
		if int(id) == len(st.Mounts) {
			s := seq % rawSlots
			if !hasAck[s] || seq > slotAck[s] {
				slotAck[s], hasAck[s] = seq, true
			}
		}
	}
	nrec := 0
	for i, mp := range st.Mounts {
		b, err := os.ReadFile(filepath.Join(mp, "records"))
		if err != nil {
			if os.IsNotExist(err) && last[uint64(i)] == 0 {
				continue
			}
			t.Fatal(err)
		}
		intact := func(seq uint64) bool {
			if (seq+1)*recSize > uint64(len(b)) {
				return false
			}
			id, s, ok := parseRecord(b[seq*recSize : (seq+1)*recSize])
			return ok && id == uint64(i) && s == seq
		}
		for seq := uint64(0); seq <= last[uint64(i)]; seq++ {
			off := seq * recSize
			if off+recSize > uint64(len(b)) {
				t.Fatalf("%s/records: acknowledged record %d missing (file has %d bytes)", mp, seq, len(b))
			}
			if !intact(seq) {
				bad := 0
				for k := uint64(0); k <= last[uint64(i)]; k++ {
					if !intact(k) {
						bad++
					}
				}
				t.Fatalf("%s/records: record %d damaged (%s); %d of the %d acknowledged records damaged; the file has %d bytes",
					mp, seq, describeRecord(b[off:off+recSize]), bad, last[uint64(i)]+1, len(b))
			}
			nrec++
		}
	}
	raw, err := os.ReadFile(st.RawLV)
	if err != nil {
		t.Fatal(err)
	}
	for s, seq := range slotAck {
		id, got, ok := parseRecord(raw[s*recSize : (s+1)*recSize])
		if !ok || id != uint64(len(st.Mounts)) || got < seq || got%rawSlots != s {
			t.Fatalf("raw LV slot %d: acknowledged record %d missing (found ok=%v seq=%d)", s, seq, ok, got)
		}
		nrec++
	}
	t.Logf("verified %d files and %d acknowledged records", nfiles, nrec)
}

// blockedTasks describes the processes in uninterruptible sleep: command
// line and kernel stack.
func blockedTasks() string {
	var b strings.Builder
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid := e.Name()
		if pid[0] < '0' || pid[0] > '9' {
			continue
		}
		st, err := os.ReadFile("/proc/" + pid + "/stat")
		if err != nil {
			continue
		}
		f := strings.Fields(string(st[strings.LastIndexByte(string(st), ')')+1:]))
		if len(f) == 0 || f[0] != "D" {
			continue
		}
		cmd, _ := os.ReadFile("/proc/" + pid + "/cmdline")
		stack, _ := os.ReadFile("/proc/" + pid + "/stack")
		fmt.Fprintf(&b, "pid %s: %s\n%s\n", pid, strings.ReplaceAll(string(cmd), "\x00", " "), stack)
		tasks, _ := os.ReadDir("/proc/" + pid + "/task")
		for _, tk := range tasks {
			if tk.Name() == pid {
				continue
			}
			ts, _ := os.ReadFile("/proc/" + pid + "/task/" + tk.Name() + "/stat")
			if tf := strings.Fields(string(ts[strings.LastIndexByte(string(ts), ')')+1:])); len(tf) > 0 && tf[0] == "D" {
				s, _ := os.ReadFile("/proc/" + pid + "/task/" + tk.Name() + "/stack")
				fmt.Fprintf(&b, "  thread %s:\n%s\n", tk.Name(), s)
			}
		}
	}
	b.WriteString(inflight())
	return b.String()
}

// inflight lists the block devices with requests in flight (reads,
// writes): it tells a request lost below (the virtio disk) from one held
// in a dm device.
func inflight() string {
	var b strings.Builder
	ents, _ := os.ReadDir("/sys/block")
	for _, e := range ents {
		raw, err := os.ReadFile("/sys/block/" + e.Name() + "/inflight")
		if err != nil {
			continue
		}
		if f := strings.Fields(string(raw)); len(f) == 2 && (f[0] != "0" || f[1] != "0") {
			name, _ := os.ReadFile("/sys/block/" + e.Name() + "/dm/name")
			fmt.Fprintf(&b, "in flight on %s %s: %s reads, %s writes\n", e.Name(), strings.TrimSpace(string(name)), f[0], f[1])
		}
	}
	if b.Len() == 0 {
		return "no block device has requests in flight\n"
	}
	return b.String()
}

// watchBlocked reports, once, tasks that stay in uninterruptible sleep
// for a minute (a hang under a suspended device), with their kernel
// stacks and the device states, while a guest test runs. Stop it with
// the returned function.
func watchBlocked(t testing.TB) func() {
	stop := make(chan struct{})
	go func() {
		// pid -> consecutive samples in D with the same context-switch
		// counts (a busy task in D, like jbd2 under an fsync loop,
		// switches; a blocked one does not).
		type mark struct {
			n   int
			ctx string
		}
		seen := map[string]mark{}
		for {
			select {
			case <-stop:
				return
			case <-time.After(20 * time.Second):
			}
			now := map[string]mark{}
			ents, _ := os.ReadDir("/proc")
			for _, e := range ents {
				st, err := os.ReadFile("/proc/" + e.Name() + "/stat")
				if err != nil || e.Name()[0] < '0' || e.Name()[0] > '9' {
					continue
				}
				if f := strings.Fields(string(st[strings.LastIndexByte(string(st), ')')+1:])); len(f) > 0 && f[0] == "D" {
					status, _ := os.ReadFile("/proc/" + e.Name() + "/status")
					var ctx []string
					for _, l := range strings.Split(string(status), "\n") {
						if strings.Contains(l, "ctxt_switches") {
							ctx = append(ctx, l)
						}
					}
					m := mark{n: 1, ctx: strings.Join(ctx, " ")}
					if old, ok := seen[e.Name()]; ok && old.ctx == m.ctx {
						m.n = old.n + 1
					}
					now[e.Name()] = m
				}
			}
			seen = now
			for _, m := range now {
				if m.n >= 3 {
					info, _ := shOK("dmsetup", "info", "-c", "-o", "name,attr,open,uuid")
					table, _ := shOK("dmsetup", "table")
					fmt.Printf("WATCHDOG: tasks blocked for a minute:\n%s\n%s\n%s\n", blockedTasks(), info, table)
					os.Stdout.Sync()
					return
				}
			}
		}
	}()
	return func() { close(stop) }
}
