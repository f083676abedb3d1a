package logwrites

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
)

// The format's constants (drivers/md/dm-log-writes.c).
const (
	Magic   uint64 = 0x6a736677736872
	Version uint64 = 1

	superSize = 28 // magic, version, nr_entries, sectorsize
	entrySize = 32 // sector, nr_sectors, flags, data_len
)

// Flags of a log entry.
type Flags uint64

const (
	FlagFlush    Flags = 1 << 0 // a flush (REQ_PREFLUSH), possibly with data
	FlagFUA      Flags = 1 << 1 // a write with REQ_FUA
	FlagDiscard  Flags = 1 << 2 // a discard: no data follows in the log
	FlagMark     Flags = 1 << 3 // a mark set with `dmsetup message ... mark`
	FlagMetadata Flags = 1 << 4 // a write with REQ_META
	knownFlags         = FlagFlush | FlagFUA | FlagDiscard | FlagMark | FlagMetadata
)

func (f Flags) String() string {
	var s []string
	for _, n := range []struct {
		f    Flags
		name string
	}{{FlagFlush, "FLUSH"}, {FlagFUA, "FUA"}, {FlagDiscard, "DISCARD"}, {FlagMark, "MARK"}, {FlagMetadata, "METADATA"}} {
		if f&n.f != 0 {
			s = append(s, n.name)
		}
	}
	if r := f &^ knownFlags; r != 0 {
		s = append(s, fmt.Sprintf("%#x", uint64(r)))
	}
	if len(s) == 0 {
		return "WRITE"
	}
	return strings.Join(s, "|")
}

// Errors the parser wraps, to tell a damaged log from an I/O error.
var (
	ErrNotLog    = errors.New("not a dm-log-writes log (bad magic)")
	ErrVersion   = errors.New("unsupported dm-log-writes log version")
	ErrCorrupt   = errors.New("corrupt dm-log-writes log")
	ErrTruncated = errors.New("dm-log-writes log ends before its last entry")
)

// Super is the log's super block.
type Super struct {
	NrEntries  uint64 // nr_entries
	SectorSize uint32 // bytes per log sector (the logged device's logical block size)
}

// Entry is one logged event.
type Entry struct {
	Index   int    // position in the log, from 0
	Sector  uint64 // first sector written, in SectorSize units
	Sectors uint64 // sectors written (for a discard: discarded)
	Flags   Flags
	Mark    string // the text of a mark
	// DataOff is the byte offset in the log of the data written (valid
	// when Sectors > 0 and the entry is not a discard).
	DataOff int64
}

// IsFlush reports whether the entry completes a flush or a FUA write: a
// point where everything before it in the log is on stable storage.
func (e Entry) IsFlush() bool { return e.Flags&(FlagFlush|FlagFUA) != 0 }

// IsMark reports whether the entry is a mark.
func (e Entry) IsMark() bool { return e.Flags&FlagMark != 0 }

// Writes reports whether replaying the entry changes the disk.
func (e Entry) Writes() bool { return e.Sectors > 0 && e.Flags&FlagMark == 0 }

func (e Entry) String() string {
	if e.IsMark() {
		return fmt.Sprintf("#%d MARK %q", e.Index, e.Mark)
	}
	return fmt.Sprintf("#%d %s sector %d +%d", e.Index, e.Flags, e.Sector, e.Sectors)
}

// Log is an opened dm-log-writes log.
type Log struct {
	Super
	r    io.ReaderAt
	size int64
}

// Open reads and checks the super block of the log in r, size bytes long.
func Open(r io.ReaderAt, size int64) (*Log, error) {
	b := make([]byte, superSize)
	if _, err := r.ReadAt(b, 0); err != nil {
		return nil, fmt.Errorf("reading the log's super block: %w", err)
	}
	le := binary.LittleEndian
	if m := le.Uint64(b[0:]); m != Magic {
		return nil, fmt.Errorf("%w: %#x", ErrNotLog, m)
	}
	if v := le.Uint64(b[8:]); v != Version {
		return nil, fmt.Errorf("%w: %d", ErrVersion, v)
	}
	l := &Log{r: r, size: size, Super: Super{NrEntries: le.Uint64(b[16:]), SectorSize: le.Uint32(b[24:])}}
	ss := l.SectorSize
	if ss < 512 || ss > 64<<10 || ss&(ss-1) != 0 {
		return nil, fmt.Errorf("%w: sector size %d", ErrCorrupt, ss)
	}
	// Each entry takes at least one sector after the super block.
	if limit := uint64(size/int64(ss)) - 1; size < int64(ss) || l.NrEntries > limit {
		return nil, fmt.Errorf("%w: %d entries do not fit in %d bytes", ErrCorrupt, l.NrEntries, size)
	}
	return l, nil
}

// Entries reads every entry the super block counts.
func (l *Log) Entries() ([]Entry, error) {
	ss := int64(l.SectorSize)
	le := binary.LittleEndian
	out := make([]Entry, 0, l.NrEntries)
	buf := make([]byte, ss)
	off := ss
	for i := 0; uint64(i) < l.NrEntries; i++ {
		if off+ss > l.size {
			return out, fmt.Errorf("%w: entry %d at byte %d, log of %d bytes", ErrTruncated, i, off, l.size)
		}
		if _, err := l.r.ReadAt(buf, off); err != nil {
			return out, fmt.Errorf("reading log entry %d at byte %d: %w", i, off, err)
		}
		e := Entry{Index: i, Sector: le.Uint64(buf[0:]), Sectors: le.Uint64(buf[8:]), Flags: Flags(le.Uint64(buf[16:]))}
		dataLen := le.Uint64(buf[24:])
		if e.Flags&^knownFlags != 0 {
			return out, fmt.Errorf("%w: entry %d at byte %d has unknown flags %s", ErrCorrupt, i, off, e.Flags)
		}
		switch {
		case e.IsMark():
			if dataLen > uint64(ss-entrySize) || e.Sectors != 0 {
				return out, fmt.Errorf("%w: mark entry %d at byte %d: %d sectors, text of %d bytes", ErrCorrupt, i, off, e.Sectors, dataLen)
			}
			e.Mark = string(bytes.TrimRight(buf[entrySize:entrySize+int(dataLen)], "\x00"))
		case dataLen != 0:
			// Only marks carry inline data in every kernel so far.
			return out, fmt.Errorf("%w: entry %d at byte %d (%s) carries %d bytes of inline data", ErrCorrupt, i, off, e.Flags, dataLen)
		case e.Sectors == 0 && e.Flags&FlagFlush == 0:
			// The target logs a bio without sectors only when it is a
			// flush (a zeroed sector read as an entry looks like this).
			return out, fmt.Errorf("%w: entry %d at byte %d (%s) covers no sector", ErrCorrupt, i, off, e.Flags)
		}
		off += ss
		if e.Flags&FlagDiscard == 0 && e.Sectors > 0 {
			if e.Sectors > uint64(l.size/ss) {
				return out, fmt.Errorf("%w: entry %d at byte %d writes %d sectors", ErrCorrupt, i, off-ss, e.Sectors)
			}
			e.DataOff = off
			off += int64(e.Sectors) * ss
			if off > l.size {
				return out, fmt.Errorf("%w: the data of entry %d ends at byte %d, log of %d bytes", ErrTruncated, i, off, l.size)
			}
		}
		out = append(out, e)
	}
	return out, nil
}

// ReadData returns the data entry e wrote (nil for an entry without
// data).
func (l *Log) ReadData(e Entry) ([]byte, error) {
	if e.DataOff == 0 || e.Sectors == 0 {
		return nil, nil
	}
	b := make([]byte, int64(e.Sectors)*int64(l.SectorSize))
	if _, err := l.r.ReadAt(b, e.DataOff); err != nil {
		return nil, fmt.Errorf("reading the data of log entry %d at byte %d: %w", e.Index, e.DataOff, err)
	}
	return b, nil
}

// FindMark returns the index of the first mark with this text at or
// after entry from, or -1.
func FindMark(entries []Entry, from int, text string) int {
	for i := from; i < len(entries); i++ {
		if entries[i].IsMark() && entries[i].Mark == text {
			return i
		}
	}
	return -1
}

// Replayer applies a log's entries, in order, onto a device.
type Replayer struct {
	log     *Log
	entries []Entry
	dst     io.WriterAt
	next    int   // the first entry not applied yet
	devSize int64 // bytes; writes beyond it are an error (0: unchecked)
	zero    []byte
}

// NewReplayer prepares to replay entries of l onto dst, devSize bytes
// long (0 when unknown), starting with the first entry.
func NewReplayer(l *Log, entries []Entry, dst io.WriterAt, devSize int64) *Replayer {
	return &Replayer{log: l, entries: entries, dst: dst, devSize: devSize}
}

// Next is the index of the first entry not applied yet.
func (r *Replayer) Next() int { return r.next }

// ApplyThrough applies every entry up to and including entries[i]. The
// device then holds what the logged device held once entry i reached
// stable storage. It cannot go back.
func (r *Replayer) ApplyThrough(i int) error {
	if i >= len(r.entries) {
		return fmt.Errorf("replaying through entry %d: the log has %d entries", i, len(r.entries))
	}
	if i < r.next-1 {
		return fmt.Errorf("replaying through entry %d: entries up to %d are already applied", i, r.next-1)
	}
	for r.next <= i {
		if err := r.apply(r.entries[r.next]); err != nil {
			return err
		}
		r.next++
	}
	return nil
}

func (r *Replayer) apply(e Entry) error {
	if !e.Writes() {
		return nil
	}
	ss := int64(r.log.SectorSize)
	off, n := int64(e.Sector)*ss, int64(e.Sectors)*ss
	if r.devSize > 0 && (off+n > r.devSize || off+n < off) {
		return fmt.Errorf("log entry %d (%s) reaches byte %d of a %d-byte device", e.Index, e.Flags, off+n, r.devSize)
	}
	if e.Flags&FlagDiscard != 0 {
		for n > 0 {
			c := min(n, 1<<20)
			if int64(len(r.zero)) < c {
				r.zero = make([]byte, c)
			}
			if _, err := r.dst.WriteAt(r.zero[:c], off); err != nil {
				return fmt.Errorf("replaying the discard of log entry %d at byte %d: %w", e.Index, off, err)
			}
			off, n = off+c, n-c
		}
		return nil
	}
	data, err := r.log.ReadData(e)
	if err != nil {
		return err
	}
	if _, err := r.dst.WriteAt(data, off); err != nil {
		return fmt.Errorf("replaying log entry %d at byte %d: %w", e.Index, off, err)
	}
	return nil
}

// Image is an in-memory disk: an io.WriterAt and io.ReaderAt of a fixed
// size.
type Image []byte

// NewImage returns a zeroed image of size bytes.
func NewImage(size int64) Image { return make(Image, size) }

// WriteAt implements io.WriterAt; writes beyond the end fail.
func (m Image) WriteAt(b []byte, off int64) (int, error) {
	if off < 0 || off+int64(len(b)) > int64(len(m)) {
		return 0, fmt.Errorf("write of %d bytes at %d beyond the end of a %d-byte image", len(b), off, len(m))
	}
	return copy(m[off:], b), nil
}

// ReadAt implements io.ReaderAt.
func (m Image) ReadAt(b []byte, off int64) (int, error) {
	if off < 0 || off >= int64(len(m)) {
		return 0, io.EOF
	}
	n := copy(b, m[off:])
	if n < len(b) {
		return n, io.EOF
	}
	return n, nil
}

// FlushPoints returns the indexes of the FLUSH and FUA entries in
// entries[from:to): the crash points where the disk holds exactly the
// log's prefix through that entry.
func FlushPoints(entries []Entry, from, to int) []int {
	var out []int
	for i := max(from, 0); i < min(to, len(entries)); i++ {
		if entries[i].IsFlush() {
			out = append(out, i)
		}
	}
	return out
}

// SamplePoints picks up to n distinct indexes of entries in [from, to)
// that write data and are neither FLUSH nor FUA (points inside a
// write-back of the cache), in increasing order. pick(k) must return a
// number in [0, k) (e.g. rand.Rand.Intn).
func SamplePoints(entries []Entry, from, to, n int, pick func(int) int) []int {
	var cand []int
	for i := max(from, 0); i < min(to, len(entries)); i++ {
		if e := entries[i]; e.Writes() && !e.IsFlush() {
			cand = append(cand, i)
		}
	}
	if n >= len(cand) {
		return cand
	}
	// A partial Fisher-Yates shuffle, then sorted.
	for i := 0; i < n; i++ {
		j := i + pick(len(cand)-i)
		cand[i], cand[j] = cand[j], cand[i]
	}
	out := append([]int(nil), cand[:n]...)
	slices.Sort(out)
	return out
}

// DistinctFlushPoints is FlushPoints without the points whose disk equals
// the previous point's: a FLUSH or FUA entry counts only if some entry
// since the previous one (or since from) wrote data.
func DistinctFlushPoints(entries []Entry, from, to int) []int {
	var out []int
	wrote := false
	for i := max(from, 0); i < min(to, len(entries)); i++ {
		e := entries[i]
		if e.Writes() {
			wrote = true
		}
		if e.IsFlush() && wrote {
			out = append(out, i)
			wrote = false
		}
	}
	return out
}

// Spread picks n of points (in increasing order) spread over the whole
// list: it cuts the list into n stretches of (nearly) equal length and
// takes one point of each at random (pick(k) returns a number in [0, k)).
// With n >= len(points) it returns them all.
func Spread(points []int, n int, pick func(int) int) []int {
	if n >= len(points) {
		return append([]int(nil), points...)
	}
	if n <= 0 {
		return nil
	}
	out := make([]int, 0, n)
	for b := 0; b < n; b++ {
		lo, hi := b*len(points)/n, (b+1)*len(points)/n
		out = append(out, points[lo+pick(hi-lo)])
	}
	return out
}
