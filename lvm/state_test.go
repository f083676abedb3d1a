package lvm

import (
	"context"
	"strings"
	"testing"

	"github.com/dmconvert/dmconvert/dmtable"
)

func TestState(t *testing.T) {
	const report = `{"report": [{"pv": [
		{"pv_uuid":"other-uuid", "pv_major":"254", "pv_minor":"1", "vg_name":"vgb", "vg_seqno":"3"},
		{"pv_uuid":"hSfjPp-UgnQ", "pv_major":"254", "pv_minor":"0", "vg_name":"dvg", "vg_seqno":"17"}
	]}]}`
	var got []string
	c := &Client{}
	c.statDev = func(string) (dmtable.Dev, error) { return dmtable.Dev{Major: 254, Minor: 0}, nil }
	c.exec = func(_ context.Context, argv, _ []string) ([]byte, []byte, int, error) {
		got = argv
		return []byte(report), nil, 0, nil
	}
	s, err := c.State(context.Background(), "/dev/vda")
	if err != nil {
		t.Fatal(err)
	}
	if *s != (PVState{UUID: "hSfjPp-UgnQ", VG: "dvg", SeqNo: 17}) {
		t.Fatalf("State = %+v", *s)
	}
	if a := strings.Join(got, " "); got[1] != "pvs" || !strings.Contains(a, "vg_seqno") || !strings.HasSuffix(a, "-- /dev/vda") {
		t.Fatalf("command %q", a)
	}
	// A device lvm does not report is an error, not a zero state.
	c.statDev = func(string) (dmtable.Dev, error) { return dmtable.Dev{Major: 8, Minor: 0}, nil }
	if s, err := c.State(context.Background(), "/dev/sda"); err == nil {
		t.Fatalf("State of an unreported device = %+v, want an error", *s)
	}
}
