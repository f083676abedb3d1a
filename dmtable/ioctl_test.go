package dmtable

import (
	"bytes"
	"encoding/binary"
	"testing"
)

// The expected bytes below are written from include/uapi/linux/dm-ioctl.h
// by hand (offsets counted from the struct definitions), not produced by
// the code under test. The host is little-endian (amd64), like the guest.
var le = binary.LittleEndian

func TestIoctlNumbers(t *testing.T) {
	// _IOWR(0xfd, nr, struct dm_ioctl): 0xc0000000 | 312<<16 | 0xfd<<8 | nr.
	// 0xc138fd00 is DM_VERSION as strace prints it for libdevmapper.
	cases := map[uint]uint{
		cmdVersion:          0xc138fd00,
		cmdListDevices:      0xc138fd02,
		cmdDevCreate:        0xc138fd03,
		cmdDevRemove:        0xc138fd04,
		cmdDevRename:        0xc138fd05,
		cmdDevSuspend:       0xc138fd06,
		cmdDevStatus:        0xc138fd07,
		cmdDevWait:          0xc138fd08,
		cmdTableLoad:        0xc138fd09,
		cmdTableClear:       0xc138fd0a,
		cmdTableDeps:        0xc138fd0b,
		cmdTableStatus:      0xc138fd0c,
		cmdListVersions:     0xc138fd0d,
		cmdTargetMsg:        0xc138fd0e,
		cmdDevArmPoll:       0xc138fd10,
		cmdGetTargetVersion: 0xc138fd11,
	}
	for cmd, want := range cases {
		if got := ioctlNumber(cmd); got != want {
			t.Errorf("ioctlNumber(%d) = %#x, want %#x", cmd, got, want)
		}
	}
}

func TestEncodeHeader(t *testing.T) {
	r := request{name: "vg-lv", uuid: "LVM-abc", dev: 0xfe00, flags: flagSuspend | flagNoflush, eventNr: 0x0040_1234, targetCount: 3}
	b := r.encode(0)
	if len(b) != 312 {
		t.Fatalf("buffer %d bytes, want 312", len(b))
	}
	want := make([]byte, 312)
	le.PutUint32(want[0:], 4) // version 4.0.0
	le.PutUint32(want[4:], 0)
	le.PutUint32(want[8:], 0)
	le.PutUint32(want[12:], 312) // data_size
	le.PutUint32(want[16:], 312) // data_start
	le.PutUint32(want[20:], 3)   // target_count
	// open_count at 24 stays 0
	le.PutUint32(want[28:], 1<<1|1<<11) // flags
	le.PutUint32(want[32:], 0x00401234) // event_nr
	// padding at 36
	le.PutUint64(want[40:], 0xfe00) // dev
	copy(want[48:], "vg-lv")        // name[128]
	copy(want[176:], "LVM-abc")     // uuid[129]; data[7] at 305
	if !bytes.Equal(b, want) {
		t.Fatalf("header bytes differ:\n got % x\nwant % x", b, want)
	}
	// Room for an answer rounds up to 8 bytes and is announced in data_size.
	b = r.encode(1001)
	if len(b) != 1008 || le.Uint32(b[12:]) != 1008 {
		t.Fatalf("encode(1001): %d bytes, data_size %d", len(b), le.Uint32(b[12:]))
	}
	// A name that fills the field leaves no room for the NUL.
	if checkNames(string(bytes.Repeat([]byte("a"), 127)), "") != nil || checkNames(string(bytes.Repeat([]byte("a"), 128)), "") == nil {
		t.Fatal("name length limits")
	}
	if checkNames("", string(bytes.Repeat([]byte("a"), 128))) != nil || checkNames("", string(bytes.Repeat([]byte("a"), 129))) == nil {
		t.Fatal("uuid length limits")
	}
}

func TestDecodeHeader(t *testing.T) {
	b := make([]byte, 312+16)
	le.PutUint32(b[0:], 4)
	le.PutUint32(b[4:], 47)
	le.PutUint32(b[8:], 0)
	le.PutUint32(b[12:], 312+5)
	le.PutUint32(b[16:], 312)
	le.PutUint32(b[20:], 2)
	le.PutUint32(b[24:], 0xffffffff) // open_count -1 as s32
	le.PutUint32(b[28:], flagActivePresent|flagInactivePresent|flagSuspend|flagReadonly)
	le.PutUint32(b[32:], 7)
	le.PutUint64(b[40:], 0x10fd00) // 253:256
	copy(b[48:], "dev0")
	copy(b[176:], "CRYPT-LUKS2-x")
	copy(b[312:], "hello")
	h := decodeHeader(b)
	if h.version != [3]uint32{4, 47, 0} || h.dataSize != 317 || h.dataStart != 312 || h.targetCount != 2 ||
		h.openCount != -1 || h.eventNr != 7 || h.name != "dev0" || h.uuid != "CRYPT-LUKS2-x" {
		t.Fatalf("header %+v", h)
	}
	info := infoFrom(h)
	if info.Dev != (Dev{253, 256}) || !info.Suspended || !info.LivePresent || !info.InactivePresent || !info.ReadOnly {
		t.Fatalf("info %+v", info)
	}
	if d := replyData(b, h); string(d) != "hello" {
		t.Fatalf("reply data %q", d)
	}
	h.dataSize = 312
	if d := replyData(b, h); d != nil {
		t.Fatalf("empty reply data %q", d)
	}
}

func TestEncodeTargets(t *testing.T) {
	tbl := Table{
		{Start: 0, Length: 8, Params: &Linear{Dev: Dev{254, 0}.Ref(), Offset: 0}},                                  // "254:0 0": 7+1 bytes -> 40+8 = 48
		{Start: 8, Length: 16, Params: &Linear{Dev: Dev{254, 16}.Ref(), Offset: 123456}},                           // "254:16 123456": 13+1 -> 54 -> 56
		{Start: 24, Length: 32768, Params: &Crypt{Cipher: "aes", Key: HexKey([]byte{0xab}), Dev: Dev{8, 0}.Ref()}}, // "aes ab 0 8:0 0": 14+1 -> 55 -> 56
	}
	b, err := encodeTargets(tbl)
	if err != nil {
		t.Fatal(err)
	}
	spec := func(start, length uint64, next uint32, typ, params string, size int) []byte {
		s := make([]byte, size)
		le.PutUint64(s[0:], start)
		le.PutUint64(s[8:], length)
		le.PutUint32(s[16:], 0) // status
		le.PutUint32(s[20:], next)
		copy(s[24:40], typ)
		copy(s[40:], params)
		return s
	}
	var want []byte
	want = append(want, spec(0, 8, 48, "linear", "254:0 0", 48)...)
	want = append(want, spec(8, 16, 56, "linear", "254:16 123456", 56)...)
	want = append(want, spec(24, 32768, 56, "crypt", "aes ab 0 8:0 0", 56)...)
	if !bytes.Equal(b, want) {
		t.Fatalf("target specs differ:\n got % x\nwant % x", b, want)
	}
	if _, err := encodeTargets(Table{{Params: &Other{TargetType: "sixteen-chars-xx"}}}); err == nil {
		t.Fatal("16-byte type name accepted")
	}
}

func TestDecodeTargets(t *testing.T) {
	// A DM_TABLE_STATUS answer as retrieve_status() lays it out: next is
	// the offset from the start of the first spec.
	data := make([]byte, 0, 256)
	add := func(start, length uint64, typ, params string) {
		off := len(data)
		rec := make([]byte, 40+len(params)+1)
		le.PutUint64(rec[0:], start)
		le.PutUint64(rec[8:], length)
		copy(rec[24:40], typ)
		copy(rec[40:], params)
		data = append(data, rec...)
		for len(data)%8 != 0 {
			data = append(data, 0)
		}
		le.PutUint32(data[off+20:], uint32(len(data)))
	}
	add(0, 32768, "mirror", "2 254:0 253:3 12/32 1 AA 1 core")
	add(32768, 1024, "linear", "")
	add(33792, 8, "zero", "")
	got, err := decodeTargets(data, 3)
	if err != nil {
		t.Fatal(err)
	}
	want := []rawTarget{
		{start: 0, length: 32768, typ: "mirror", params: "2 254:0 253:3 12/32 1 AA 1 core"},
		{start: 32768, length: 1024, typ: "linear"},
		{start: 33792, length: 8, typ: "zero"},
	}
	if len(got) != 3 {
		t.Fatalf("%d targets", len(got))
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("target %d: %+v, want %+v", i, got[i], want[i])
		}
	}
	if _, err := decodeTargets(data[:50], 3); err == nil {
		t.Fatal("truncated answer accepted")
	}
}

func TestDecodeNameList(t *testing.T) {
	// list_devices() with DM_UUID_FLAG on interface 4.47: per device an
	// 8-aligned record {u64 dev, u32 next, name\0}, then aligned
	// {u32 event_nr, u32 flags}, then (HAS_UUID) the aligned uuid\0.
	var data []byte
	pad := func() {
		for len(data)%8 != 0 {
			data = append(data, 0)
		}
	}
	var prev = -1
	add := func(dev uint64, name string, ev uint32, uuid string, hasUUID bool) {
		off := len(data)
		if prev >= 0 {
			le.PutUint32(data[prev+8:], uint32(off-prev))
		}
		prev = off
		rec := make([]byte, 12)
		le.PutUint64(rec, dev)
		data = append(data, rec...)
		data = append(data, name...)
		data = append(data, 0)
		pad()
		ef := make([]byte, 8)
		le.PutUint32(ef, ev)
		if hasUUID {
			le.PutUint32(ef[4:], nameListHasUUID)
		} else {
			le.PutUint32(ef[4:], nameListDoesntHaveU)
		}
		data = append(data, ef...)
		if hasUUID {
			data = append(data, uuid...)
			data = append(data, 0)
			pad()
		}
	}
	add(0xfd00, "pvfake", 3, "", false)
	add(0xfd01, "vg-lv", 0, "LVM-0123456789", true)
	add(0x10fd00, "a-much-longer-device-name-x", 12, "CRYPT-LUKS2-abc-vda_crypt", true)
	got, err := decodeNameList(data, 47)
	if err != nil {
		t.Fatal(err)
	}
	want := []DeviceEntry{
		{Name: "pvfake", Dev: Dev{253, 0}, EventNr: 3, HasUUIDInfo: true},
		{Name: "vg-lv", Dev: Dev{253, 1}, UUID: "LVM-0123456789", HasUUIDInfo: true},
		{Name: "a-much-longer-device-name-x", Dev: Dev{253, 256}, EventNr: 12, UUID: "CRYPT-LUKS2-abc-vda_crypt", HasUUIDInfo: true},
	}
	if len(got) != len(want) {
		t.Fatalf("%d devices: %+v", len(got), got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("device %d: %+v, want %+v", i, got[i], want[i])
		}
	}
	// No devices: the kernel writes dev = 0.
	if l, err := decodeNameList(make([]byte, 16), 47); err != nil || l != nil {
		t.Fatalf("empty list: %v %v", l, err)
	}
	// Before 4.38 there is nothing after the name.
	old, err := decodeNameList(data, 37)
	if err != nil || len(old) != 3 || old[1].Name != "vg-lv" || old[1].UUID != "" {
		t.Fatalf("old list: %+v %v", old, err)
	}
}

func TestDecodeVersionsDepsMessage(t *testing.T) {
	// struct dm_target_versions {u32 next; u32 version[3]; char name[]},
	// next relative to this record, 0 for the last.
	var data []byte
	rec := func(name string, v [3]uint32, last bool) {
		r := make([]byte, 16+len(name)+1)
		for i := range v {
			le.PutUint32(r[4+4*i:], v[i])
		}
		copy(r[16:], name)
		for len(r)%8 != 0 {
			r = append(r, 0)
		}
		if !last {
			le.PutUint32(r, uint32(len(r)))
		}
		data = append(data, r...)
	}
	rec("mirror", [3]uint32{1, 14, 0}, false)
	rec("crypt", [3]uint32{1, 24, 0}, false)
	rec("linear", [3]uint32{1, 4, 0}, true)
	v, err := decodeVersions(data)
	if err != nil || len(v) != 3 || v[1].Name != "crypt" || v[1].Version != [3]uint32{1, 24, 0} || v[2].String() != "linear v1.4.0" {
		t.Fatalf("versions %+v %v", v, err)
	}

	// struct dm_target_deps {u32 count; u32 padding; u64 dev[]}.
	deps := make([]byte, 8+16)
	le.PutUint32(deps, 2)
	le.PutUint64(deps[8:], 0xfe00)
	le.PutUint64(deps[16:], 0x10fd00)
	d, err := decodeDeps(deps)
	if err != nil || len(d) != 2 || d[0] != (Dev{254, 0}) || d[1] != (Dev{253, 256}) {
		t.Fatalf("deps %v %v", d, err)
	}
	le.PutUint32(deps, 3)
	if _, err := decodeDeps(deps); err == nil {
		t.Fatal("overlong deps accepted")
	}

	// struct dm_target_msg {u64 sector; char message[]}.
	m := encodeMessage(1024, "@cancel_deferred_remove")
	if len(m)%8 != 0 || le.Uint64(m) != 1024 || string(m[8:8+23]) != "@cancel_deferred_remove" || m[8+23] != 0 {
		t.Fatalf("message % x", m)
	}
	if s := encodeString("newname"); len(s) != 8 || string(s[:7]) != "newname" || s[7] != 0 {
		t.Fatalf("string % x", s)
	}
}
