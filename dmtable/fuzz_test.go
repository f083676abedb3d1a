package dmtable

import (
	"testing"
)

// FuzzParse: Parse never panics, and whatever it accepts round-trips:
// the payload of the parsed target parses again to an equal target that
// prints the same payload, and printing (masked or not) never panics.
func FuzzParse(f *testing.F) {
	for _, c := range kernelLines {
		f.Add(c.line)
	}
	for _, s := range []string{
		"", "0", "0 8 linear", "0 8 crypt aes-xts-plain64 - 0 254:0 0 0",
		"0 8 mirror core 2 1024 block_on_error 2 254:0 0 254:1 0",
		"0 8 mirror userspace 3 a b 254:9 2 254:0 0 254:1 0 1 x",
		"0 8 crypt capi:authenc(hmac(sha256),xts(aes))-random :64:logon:a:b 0 /dev/x 0 1 integrity:28:aead",
		"18446744073709551615 18446744073709551615 zero",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, line string) {
		tg, err := Parse(line)
		if err != nil {
			return
		}
		_ = tg.String()
		_ = tg.Params.Devices()
		_ = (Table{tg}).Validate()
		p := tg.Payload()
		again, err := Parse(p)
		if err != nil {
			t.Fatalf("Parse(%q) ok, but its payload %q does not parse: %v", line, p, err)
		}
		if !again.Equal(tg) {
			t.Fatalf("round trip changed the target:\n in  %q\n out %q", p, again.Payload())
		}
		if again.Payload() != p {
			t.Fatalf("payload not stable: %q then %q", p, again.Payload())
		}
		if again.String() != tg.String() {
			t.Fatalf("masked form not stable: %q then %q", tg.String(), again.String())
		}
		// Replacing a device by itself changes nothing.
		for _, d := range tg.Params.Devices() {
			same, _ := Table{tg}.ReplaceDevice(d, d)
			if same[0].Payload() != p {
				t.Fatalf("ReplaceDevice(x, x) changed %q to %q", p, same[0].Payload())
			}
		}
	})
}

// FuzzParseStatus: ParseStatus never panics, and an accepted status line
// prints back to a line that parses to the same status.
func FuzzParseStatus(f *testing.F) {
	for _, l := range kernelStatusLines {
		f.Add(l)
	}
	f.Add("0 8 mirror 2 254:0 253:3 0/0 1 AA 1 core")
	f.Fuzz(func(t *testing.T, line string) {
		s, err := ParseStatus(line)
		if err != nil {
			return
		}
		out := s.String()
		again, err := ParseStatus(out)
		if err != nil {
			t.Fatalf("ParseStatus(%q) ok, its String %q does not parse: %v", line, out, err)
		}
		if again.String() != out {
			t.Fatalf("not stable: %q then %q", out, again.String())
		}
		if s.Mirror != nil {
			_ = s.Mirror.Synced()
			if s.Mirror.String() != s.Raw && s.Raw != "" {
				// Raw is the kernel's text; our print must agree when
				// the text is in the kernel's own form.
				if again.Mirror.String() != s.Mirror.String() {
					t.Fatalf("mirror status not stable")
				}
			}
		}
	})
}
