package dmtable

import (
	"fmt"
	"strconv"
	"strings"
)

// maxMirrorLegs is the kernel's MAX_NR_MIRRORS (DM_KCOPYD_MAX_REGIONS + 1).
const maxMirrorLegs = 9

// LogSync is the optional synchronisation argument of a mirror log.
type LogSync string

const (
	// LogSyncDefault: resynchronise only regions the log says are dirty
	// (a core log starts all dirty, so everything is copied).
	LogSyncDefault LogSync = ""
	// LogSyncForce ("sync"): resynchronise everything.
	LogSyncForce LogSync = "sync"
	// LogSyncNone ("nosync"): declare everything in sync without copying.
	// Never use it to move data: the status reports in sync at once.
	LogSyncNone LogSync = "nosync"
)

// MirrorLog is the dirty region log of a mirror.
//
// Table forms (the count is the number of log arguments that follow):
//
//	core <#args> <region_size> [sync|nosync] [block_on_error]
//	disk <#args> <log_dev> <region_size> [sync|nosync] [block_on_error]
//	<other> <#args> <args...>   (userspace, clustered logs: Args verbatim)
type MirrorLog struct {
	// Type is "core", "disk" or another log type.
	Type string
	// Dev is the log device of a "disk" log.
	Dev DevRef
	// RegionSize is the region size in sectors (core and disk logs).
	RegionSize Sectors
	// Sync is the optional [no]sync argument.
	Sync LogSync
	// BlockOnError is the optional "block_on_error" argument. Kernel 6.1's
	// core and disk logs refuse it (Validate says so); it exists for
	// tables written for other log implementations.
	BlockOnError bool
	// Args are the arguments of a log type other than core and disk.
	Args []string
}

func (l MirrorLog) args() []string {
	switch l.Type {
	case "core", "disk":
		var a []string
		if l.Type == "disk" {
			a = append(a, l.Dev.String())
		}
		a = append(a, l.RegionSize.String())
		if l.Sync != LogSyncDefault {
			a = append(a, string(l.Sync))
		}
		if l.BlockOnError {
			a = append(a, "block_on_error")
		}
		return a
	default:
		return l.Args
	}
}

// String prints the log part of a mirror table line.
func (l MirrorLog) String() string {
	a := l.args()
	s := l.Type + " " + strconv.Itoa(len(a))
	if len(a) > 0 {
		s += " " + strings.Join(a, " ")
	}
	return s
}

func parseMirrorLog(typ string, a []string) (MirrorLog, error) {
	l := MirrorLog{Type: typ}
	switch typ {
	case "core", "disk":
		if typ == "disk" {
			if len(a) < 1 {
				return l, fmt.Errorf("disk log: missing log device")
			}
			d, err := ParseDevRef(a[0])
			if err != nil {
				return l, fmt.Errorf("disk log: %w", err)
			}
			l.Dev = d
			a = a[1:]
		}
		if len(a) < 1 {
			return l, fmt.Errorf("%s log: missing region size", typ)
		}
		rs, err := parseSectors("region size", a[0])
		if err != nil {
			return l, fmt.Errorf("%s log: %w", typ, err)
		}
		l.RegionSize = rs
		a = a[1:]
		if len(a) > 0 && (a[0] == "sync" || a[0] == "nosync") {
			l.Sync = LogSync(a[0])
			a = a[1:]
		}
		if len(a) > 0 && a[0] == "block_on_error" {
			l.BlockOnError = true
			a = a[1:]
		}
		if len(a) > 0 {
			return l, fmt.Errorf("%s log: unexpected argument %q", typ, a[0])
		}
		return l, nil
	default:
		if typ == "" {
			return l, fmt.Errorf("empty log type")
		}
		l.Args = append([]string(nil), a...)
		return l, nil
	}
}

// MirrorLeg is one copy of a mirror: Dev from Offset.
type MirrorLeg struct {
	Dev    DevRef
	Offset Sectors
}

// Mirror keeps every leg identical: writes go to all legs, and the kernel
// copies (resynchronises) regions from the first leg to the others until
// the status says every region is in sync.
//
// Table form (as the kernel prints it):
//
//	<log> <#legs> <dev> <offset>... [<#features> handle_errors keep_log]
//
// e.g. "core 1 1024 2 254:0 0 253:3 0".
type Mirror struct {
	Log  MirrorLog
	Legs []MirrorLeg
	// HandleErrors ("handle_errors"): fail a leg on error instead of
	// ignoring the error.
	HandleErrors bool
	// KeepLog ("keep_log"): keep a failed log device; needs HandleErrors.
	KeepLog bool
	// Features holds features this package does not know, verbatim.
	Features []string
}

func parseMirror(args []string) (*Mirror, error) {
	if len(args) < 2 {
		return nil, fmt.Errorf("mirror: want <log type> <#log args> <log args> <#legs> <dev> <offset>... [<#features> <features>]")
	}
	nlog, err := parseUint(args[1], 32)
	if err != nil {
		return nil, fmt.Errorf("mirror: log argument count %q: %w", args[1], err)
	}
	if uint64(len(args)-2) < nlog {
		return nil, fmt.Errorf("mirror: %d log arguments announced, %d fields left", nlog, len(args)-2)
	}
	log, err := parseMirrorLog(args[0], args[2:2+nlog])
	if err != nil {
		return nil, fmt.Errorf("mirror: %w", err)
	}
	rest := args[2+nlog:]
	if len(rest) < 1 {
		return nil, fmt.Errorf("mirror: missing leg count")
	}
	nlegs, err := parseUint(rest[0], 32)
	if err != nil {
		return nil, fmt.Errorf("mirror: leg count %q: %w", rest[0], err)
	}
	rest = rest[1:]
	if uint64(len(rest)) < 2*nlegs {
		return nil, fmt.Errorf("mirror: %d legs need %d fields, %d left", nlegs, 2*nlegs, len(rest))
	}
	m := &Mirror{Log: log, Legs: make([]MirrorLeg, nlegs)}
	for i := range m.Legs {
		d, err := ParseDevRef(rest[2*i])
		if err != nil {
			return nil, fmt.Errorf("mirror: leg %d: %w", i, err)
		}
		off, err := parseSectors("offset", rest[2*i+1])
		if err != nil {
			return nil, fmt.Errorf("mirror: leg %d: %w", i, err)
		}
		m.Legs[i] = MirrorLeg{Dev: d, Offset: off}
	}
	rest = rest[2*nlegs:]
	if len(rest) == 0 {
		return m, nil
	}
	nf, err := parseUint(rest[0], 32)
	if err != nil {
		return nil, fmt.Errorf("mirror: feature count %q: %w", rest[0], err)
	}
	if uint64(len(rest)-1) != nf {
		return nil, fmt.Errorf("mirror: %d features announced, %d given", nf, len(rest)-1)
	}
	for _, f := range rest[1:] {
		switch f {
		case "handle_errors":
			m.HandleErrors = true
		case "keep_log":
			m.KeepLog = true
		default:
			m.Features = append(m.Features, f)
		}
	}
	return m, nil
}

func (*Mirror) Type() string { return "mirror" }

func (m *Mirror) features() []string {
	var f []string
	if m.HandleErrors {
		f = append(f, "handle_errors")
	}
	if m.KeepLog {
		f = append(f, "keep_log")
	}
	return append(f, m.Features...)
}

func (m *Mirror) String() string {
	var b strings.Builder
	b.WriteString(m.Log.String())
	b.WriteByte(' ')
	b.WriteString(strconv.Itoa(len(m.Legs)))
	for _, l := range m.Legs {
		b.WriteByte(' ')
		b.WriteString(l.Dev.String())
		b.WriteByte(' ')
		b.WriteString(l.Offset.String())
	}
	if f := m.features(); len(f) > 0 {
		b.WriteByte(' ')
		b.WriteString(strconv.Itoa(len(f)))
		for _, s := range f {
			b.WriteByte(' ')
			b.WriteString(s)
		}
	}
	return b.String()
}

func (m *Mirror) Payload() string { return m.String() }

func (m *Mirror) Devices() []DevRef {
	var out []DevRef
	if m.Log.Type == "disk" {
		out = append(out, m.Log.Dev)
	} else if m.Log.Type != "core" {
		for _, a := range m.Log.Args {
			if isDevField(a) {
				if r, err := ParseDevRef(a); err == nil {
					out = append(out, r)
				}
			}
		}
	}
	for _, l := range m.Legs {
		out = append(out, l.Dev)
	}
	return out
}

func (m *Mirror) MapDevices(f func(DevRef) DevRef) Params {
	c := &Mirror{
		Log:          m.Log,
		Legs:         make([]MirrorLeg, len(m.Legs)),
		HandleErrors: m.HandleErrors,
		KeepLog:      m.KeepLog,
		Features:     append([]string(nil), m.Features...),
	}
	c.Log.Args = append([]string(nil), m.Log.Args...)
	switch m.Log.Type {
	case "disk":
		c.Log.Dev = f(m.Log.Dev)
	case "core":
	default:
		for i, a := range c.Log.Args {
			if isDevField(a) {
				if r, err := ParseDevRef(a); err == nil {
					c.Log.Args[i] = f(r).String()
				}
			}
		}
	}
	for i, l := range m.Legs {
		c.Legs[i] = MirrorLeg{Dev: f(l.Dev), Offset: l.Offset}
	}
	return c
}

// Validate checks the kernel's rules (dm-raid1 and dm-log on 6.1): 2 to 9
// legs; for core and disk logs a region size that is a power of two, at
// least 2 sectors and at most the target length, and no block_on_error;
// keep_log only with handle_errors.
func (m *Mirror) Validate(length Sectors) error {
	if len(m.Legs) < 2 || len(m.Legs) > maxMirrorLegs {
		return fmt.Errorf("mirror: %d legs, want 2 to %d", len(m.Legs), maxMirrorLegs)
	}
	for i, l := range m.Legs {
		if l.Dev.IsZero() {
			return fmt.Errorf("mirror: leg %d has no device", i)
		}
		if l.Offset+length < l.Offset {
			return fmt.Errorf("mirror: leg %d offset %d + length %d overflows", i, l.Offset, length)
		}
	}
	switch m.Log.Type {
	case "core", "disk":
		rs := m.Log.RegionSize
		if rs < 2 || rs&(rs-1) != 0 {
			return fmt.Errorf("mirror: region size %d is not a power of two of at least 2 sectors", rs)
		}
		if rs > length {
			return fmt.Errorf("mirror: region size %d exceeds the target length %d", rs, length)
		}
		if (length+rs-1)/rs > Sectors(^uint32(0)) {
			return fmt.Errorf("mirror: %d regions of %d sectors exceed the kernel's limit", (length+rs-1)/rs, rs)
		}
		if m.Log.Type == "disk" && m.Log.Dev.IsZero() {
			return fmt.Errorf("mirror: disk log has no device")
		}
		if m.Log.BlockOnError {
			return fmt.Errorf("mirror: the kernel's %s log does not accept block_on_error", m.Log.Type)
		}
		switch m.Log.Sync {
		case LogSyncDefault, LogSyncForce, LogSyncNone:
		default:
			return fmt.Errorf("mirror: log sync argument %q is not sync or nosync", m.Log.Sync)
		}
	case "":
		return fmt.Errorf("mirror: no log type")
	default:
		for _, a := range m.Log.Args {
			if a == "" || strings.ContainsAny(a, " \t\n\x00") {
				return fmt.Errorf("mirror: log argument %q is empty or contains white space", a)
			}
		}
	}
	if m.KeepLog && !m.HandleErrors {
		return fmt.Errorf("mirror: keep_log needs handle_errors")
	}
	for _, f := range m.Features {
		if f == "" || strings.ContainsAny(f, " \t\n\x00") {
			return fmt.Errorf("mirror: feature %q is empty or contains white space", f)
		}
	}
	return nil
}
