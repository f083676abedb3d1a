package dmtable

// The byte layout of the device-mapper ioctl interface, from
// include/uapi/linux/dm-ioctl.h (interface version 4). This file is pure:
// it builds and decodes buffers, it does not call the kernel, so its tests
// run anywhere.

import (
	"encoding/binary"
	"fmt"
	"strings"
)

// Sizes and offsets of struct dm_ioctl:
//
//	__u32 version[3];   0
//	__u32 data_size;    12  total size of the buffer, this struct included
//	__u32 data_start;   16  offset of the data after this struct
//	__u32 target_count; 20
//	__s32 open_count;   24
//	__u32 flags;        28
//	__u32 event_nr;     32  event number in and out, or udev cookie in
//	__u32 padding;      36
//	__u64 dev;          40  huge_encode_dev form
//	char  name[128];    48
//	char  uuid[129];    176
//	char  data[7];      305
//	                    312 = sizeof
const (
	dmIoctlSize = 312

	offVersion     = 0
	offDataSize    = 12
	offDataStart   = 16
	offTargetCount = 20
	offOpenCount   = 24
	offFlags       = 28
	offEventNr     = 32
	offDev         = 40
	offName        = 48
	offUUID        = 176

	dmNameLen      = 128
	dmUUIDLen      = 129
	dmMaxTypeName  = 16
	targetSpecSize = 40 // struct dm_target_spec: u64 sector_start, u64 length, s32 status, u32 next, char target_type[16]
)

// Ioctl commands (enum in dm-ioctl.h) and the request numbers
// _IOWR(0xfd, cmd, struct dm_ioctl).
const (
	cmdVersion          = 0
	cmdRemoveAll        = 1
	cmdListDevices      = 2
	cmdDevCreate        = 3
	cmdDevRemove        = 4
	cmdDevRename        = 5
	cmdDevSuspend       = 6
	cmdDevStatus        = 7
	cmdDevWait          = 8
	cmdTableLoad        = 9
	cmdTableClear       = 10
	cmdTableDeps        = 11
	cmdTableStatus      = 12
	cmdListVersions     = 13
	cmdTargetMsg        = 14
	cmdDevSetGeometry   = 15
	cmdDevArmPoll       = 16
	cmdGetTargetVersion = 17
)

// ioctlNumber is _IOWR(DM_IOCTL=0xfd, cmd, struct dm_ioctl): direction
// read|write (3) in bits 30-31, size 312 in bits 16-29, type in 8-15.
func ioctlNumber(cmd uint) uint {
	const iocRead, iocWrite = 2, 1
	return (iocRead|iocWrite)<<30 | dmIoctlSize<<16 | 0xfd<<8 | cmd
}

// Flags of struct dm_ioctl.
const (
	flagReadonly        = 1 << 0  // in/out
	flagSuspend         = 1 << 1  // in/out
	flagPersistentDev   = 1 << 3  // in
	flagStatusTable     = 1 << 4  // in: DM_TABLE_STATUS returns the table, not the status
	flagActivePresent   = 1 << 5  // out
	flagInactivePresent = 1 << 6  // out
	flagBufferFull      = 1 << 8  // out: the answer did not fit
	flagSkipLockfs      = 1 << 10 // in: do not freeze file systems on suspend
	flagNoflush         = 1 << 11 // in: suspend without flushing queued I/O
	flagQueryInactive   = 1 << 12 // in: answer about the inactive table
	flagUeventGenerated = 1 << 13 // out: a uevent was sent (udev will complete the cookie)
	flagUUID            = 1 << 14 // in: rename sets the UUID; list returns UUIDs
	flagSecureData      = 1 << 15 // in: the kernel wipes its buffers (keys)
	flagDataOut         = 1 << 16 // out: a message returned data
	flagDeferredRemove  = 1 << 17 // in/out
	flagInternalSuspend = 1 << 18 // out
)

// dm_name_list flags (after the event number in DM_LIST_DEVICES answers).
const (
	nameListHasUUID     = 1
	nameListDoesntHaveU = 2
)

// Interface version we speak. The kernel refuses a request whose major is
// not 4 or whose minor is above its own, so we send 4.0.0: every version 4
// kernel accepts it, and no command we use depends on the minor we send.
// The kernel answers with its own version in every reply.
var ourVersion = [3]uint32{4, 0, 0}

var ne = binary.NativeEndian

func align8(n int) int { return (n + 7) &^ 7 }

// request is what one ioctl sends.
type request struct {
	name, uuid  string
	dev         uint64
	flags       uint32
	eventNr     uint32
	targetCount uint32
	data        []byte // bytes after the header (data_start = 312)
}

// header is the decoded struct dm_ioctl of a reply.
type header struct {
	version     [3]uint32
	dataSize    uint32
	dataStart   uint32
	targetCount uint32
	openCount   int32
	flags       uint32
	eventNr     uint32
	dev         uint64
	name        string
	uuid        string
}

// checkNames refuses a name or UUID the struct cannot carry.
func checkNames(name, uuid string) error {
	if len(name) >= dmNameLen {
		return fmt.Errorf("name is %d bytes, at most %d fit", len(name), dmNameLen-1)
	}
	if len(uuid) >= dmUUIDLen {
		return fmt.Errorf("uuid is %d bytes, at most %d fit", len(uuid), dmUUIDLen-1)
	}
	if strings.IndexByte(name, 0) >= 0 || strings.IndexByte(uuid, 0) >= 0 {
		return fmt.Errorf("name or uuid contains a NUL byte")
	}
	return nil
}

// encode builds the ioctl buffer: the header, then r.data, then room for
// the answer, size bytes in all (at least what r needs), a multiple of 8.
func (r *request) encode(size int) []byte {
	need := dmIoctlSize + len(r.data)
	if size < need {
		size = need
	}
	size = align8(size)
	b := make([]byte, size)
	for i, v := range ourVersion {
		ne.PutUint32(b[offVersion+4*i:], v)
	}
	ne.PutUint32(b[offDataSize:], uint32(size))
	ne.PutUint32(b[offDataStart:], dmIoctlSize)
	ne.PutUint32(b[offTargetCount:], r.targetCount)
	ne.PutUint32(b[offFlags:], r.flags)
	ne.PutUint32(b[offEventNr:], r.eventNr)
	ne.PutUint64(b[offDev:], r.dev)
	copy(b[offName:offName+dmNameLen-1], r.name)
	copy(b[offUUID:offUUID+dmUUIDLen-1], r.uuid)
	copy(b[dmIoctlSize:], r.data)
	return b
}

func cString(b []byte) string {
	if i := strings.IndexByte(string(b), 0); i >= 0 {
		return string(b[:i])
	}
	return string(b)
}

func decodeHeader(b []byte) header {
	var h header
	for i := range h.version {
		h.version[i] = ne.Uint32(b[offVersion+4*i:])
	}
	h.dataSize = ne.Uint32(b[offDataSize:])
	h.dataStart = ne.Uint32(b[offDataStart:])
	h.targetCount = ne.Uint32(b[offTargetCount:])
	h.openCount = int32(ne.Uint32(b[offOpenCount:]))
	h.flags = ne.Uint32(b[offFlags:])
	h.eventNr = ne.Uint32(b[offEventNr:])
	h.dev = ne.Uint64(b[offDev:])
	h.name = cString(b[offName : offName+dmNameLen])
	h.uuid = cString(b[offUUID : offUUID+dmUUIDLen])
	return h
}

// replyData is the answer's data area: [data_start, data_size) of buf.
func replyData(buf []byte, h header) []byte {
	start, end := int(h.dataStart), int(h.dataSize)
	if start < dmIoctlSize || start > len(buf) || end <= start {
		return nil
	}
	if end > len(buf) {
		end = len(buf)
	}
	return buf[start:end]
}

// encodeTargets lays out the targets of a DM_TABLE_LOAD: for each, a
// struct dm_target_spec, then the parameter string and its NUL, padded so
// the next spec is 8-byte aligned; next = bytes from this spec to the next.
// The parameters are the kernel payload (keys included).
func encodeTargets(t Table) ([]byte, error) {
	var out []byte
	for i, tg := range t {
		typ := tg.Type()
		if typ == "" || len(typ) >= dmMaxTypeName {
			return nil, fmt.Errorf("target %d: type %q does not fit in %d bytes", i, typ, dmMaxTypeName-1)
		}
		p := tg.Params.Payload()
		if strings.IndexByte(p, 0) >= 0 {
			return nil, fmt.Errorf("target %d (%s): parameters contain a NUL byte", i, typ)
		}
		rec := align8(targetSpecSize + len(p) + 1)
		spec := make([]byte, rec)
		ne.PutUint64(spec[0:], uint64(tg.Start))
		ne.PutUint64(spec[8:], uint64(tg.Length))
		ne.PutUint32(spec[20:], uint32(rec))
		copy(spec[24:24+dmMaxTypeName], typ)
		copy(spec[targetSpecSize:], p)
		out = append(out, spec...)
		clear(spec)
	}
	return out, nil
}

// rawTarget is one target of a DM_TABLE_STATUS answer.
type rawTarget struct {
	start, length Sectors
	status        int32
	typ           string
	params        string
}

// decodeTargets reads count target specs from a DM_TABLE_STATUS (or
// DM_DEV_WAIT) answer. There, unlike on load, next is the offset of the
// next spec from the start of the first one.
func decodeTargets(data []byte, count uint32) ([]rawTarget, error) {
	out := make([]rawTarget, 0, count)
	off := 0
	for i := uint32(0); i < count; i++ {
		if off < 0 || off+targetSpecSize > len(data) {
			return nil, fmt.Errorf("target %d: spec at offset %d beyond the %d-byte answer", i, off, len(data))
		}
		s := data[off:]
		rt := rawTarget{
			start:  Sectors(ne.Uint64(s[0:])),
			length: Sectors(ne.Uint64(s[8:])),
			status: int32(ne.Uint32(s[16:])),
			typ:    cString(s[24 : 24+dmMaxTypeName]),
		}
		p := s[targetSpecSize:]
		end := strings.IndexByte(string(p), 0)
		if end < 0 {
			return nil, fmt.Errorf("target %d: parameters not NUL-terminated", i)
		}
		rt.params = string(p[:end])
		out = append(out, rt)
		next := int(ne.Uint32(s[20:]))
		if i+1 < count && next <= off {
			return nil, fmt.Errorf("target %d: next offset %d does not advance", i, next)
		}
		off = next
	}
	return out, nil
}

// DeviceEntry is one device of List.
type DeviceEntry struct {
	Name string
	Dev  Dev
	// EventNr is the device's event number (kernel interface 4.38 and
	// later; 0 before).
	EventNr uint32
	// UUID is the device's UUID; HasUUIDInfo says whether the kernel
	// reported UUIDs at all (interface 4.45 and later).
	UUID        string
	HasUUIDInfo bool
}

// decodeNameList reads a DM_LIST_DEVICES answer: struct dm_name_list
// records (u64 dev, u32 next = offset from this record to the next, 0 for
// the last; name NUL-terminated), each followed, on interface 4.38 and
// later, by an 8-byte aligned pair u32 event_nr, u32 flags, and when
// flags has DM_NAME_LIST_FLAG_HAS_UUID by the aligned NUL-terminated UUID.
func decodeNameList(data []byte, minor uint32) ([]DeviceEntry, error) {
	if len(data) < 12 || ne.Uint64(data) == 0 {
		return nil, nil
	}
	var out []DeviceEntry
	off := 0
	for {
		if off+12 > len(data) {
			return nil, fmt.Errorf("device list: record at %d beyond the %d-byte answer", off, len(data))
		}
		r := data[off:]
		e := DeviceEntry{Dev: decodeDev(ne.Uint64(r))}
		next := int(ne.Uint32(r[8:]))
		nameEnd := strings.IndexByte(string(r[12:]), 0)
		if nameEnd < 0 {
			return nil, fmt.Errorf("device list: name not NUL-terminated")
		}
		e.Name = string(r[12 : 12+nameEnd])
		if minor >= 38 {
			p := align8(off+12+nameEnd+1) - off
			if p+8 <= len(r) {
				e.EventNr = ne.Uint32(r[p:])
				fl := ne.Uint32(r[p+4:])
				if fl&(nameListHasUUID|nameListDoesntHaveU) != 0 {
					e.HasUUIDInfo = true
				}
				if fl&nameListHasUUID != 0 {
					u := r[p+8:]
					ue := strings.IndexByte(string(u), 0)
					if ue < 0 {
						return nil, fmt.Errorf("device list: uuid not NUL-terminated")
					}
					e.UUID = string(u[:ue])
				}
			}
		}
		out = append(out, e)
		if next == 0 {
			return out, nil
		}
		off += next
	}
}

// TargetVersion is a target type the kernel knows and its version.
type TargetVersion struct {
	Name    string
	Version [3]uint32
}

// String prints "name v1.2.3".
func (v TargetVersion) String() string {
	return fmt.Sprintf("%s v%d.%d.%d", v.Name, v.Version[0], v.Version[1], v.Version[2])
}

// decodeVersions reads a DM_LIST_VERSIONS (or DM_GET_TARGET_VERSION)
// answer: struct dm_target_versions records (u32 next = offset from this
// record to the next, 0 for the last; u32 version[3]; name NUL-terminated).
func decodeVersions(data []byte) ([]TargetVersion, error) {
	var out []TargetVersion
	off := 0
	for off+16 <= len(data) {
		r := data[off:]
		next := int(ne.Uint32(r))
		v := TargetVersion{Version: [3]uint32{ne.Uint32(r[4:]), ne.Uint32(r[8:]), ne.Uint32(r[12:])}}
		end := strings.IndexByte(string(r[16:]), 0)
		if end < 0 {
			return nil, fmt.Errorf("target versions: name not NUL-terminated")
		}
		v.Name = string(r[16 : 16+end])
		out = append(out, v)
		if next == 0 {
			break
		}
		off += next
	}
	return out, nil
}

// decodeDeps reads a DM_TABLE_DEPS answer: struct dm_target_deps (u32
// count, u32 padding, u64 dev[count]).
func decodeDeps(data []byte) ([]Dev, error) {
	if len(data) < 8 {
		return nil, nil
	}
	n := int(ne.Uint32(data))
	if 8+8*n > len(data) {
		return nil, fmt.Errorf("deps: %d devices do not fit in the %d-byte answer", n, len(data))
	}
	out := make([]Dev, n)
	for i := range out {
		out[i] = decodeDev(ne.Uint64(data[8+8*i:]))
	}
	return out, nil
}

// encodeMessage lays out a DM_TARGET_MSG: struct dm_target_msg (u64
// sector) then the NUL-terminated message.
func encodeMessage(sector Sectors, msg string) []byte {
	b := make([]byte, align8(8+len(msg)+1))
	ne.PutUint64(b, uint64(sector))
	copy(b[8:], msg)
	return b
}

// encodeString is a NUL-terminated string padded to 8 bytes (the new name
// or UUID of DM_DEV_RENAME).
func encodeString(s string) []byte {
	b := make([]byte, align8(len(s)+1))
	copy(b, s)
	return b
}
