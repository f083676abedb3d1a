package luks

import (
	"bytes"
	"encoding/hex"
	"math/rand"
	"os/exec"
	"strings"
	"testing"
)

// Whirlpool against the specification's test vectors and, for inputs of
// every length around the block and padding boundaries and written in
// pieces, against OpenSSL's (its legacy provider).
func TestWhirlpool(t *testing.T) {
	for _, c := range []struct{ in, want string }{
		{"", "19fa61d75522a4669b44e39c1d2e1726c530232130d407f89afee0964997f7a73e83be698b288febcf88e3e03c4f0757ea8964e59b63d93708b138cc42a66eb3"},
		{"abc", "4e2448a4c6f486bb16b6562c73b4020bf3043e3a731bce721ae1b303d97e6d4c7181eebdb6c57e277d0e34957114cbd6c797fc9d95d8b582d225292076d4eef5"},
		{"The quick brown fox jumps over the lazy dog", "b97de512e91e3828b40d2b0fdce9ceb3c4a71f9bea8d88e75c4fa854df36725fd2b52eb6544edcacd6f8beddfea403cb55ae31f03ad62a5ef54e42ee82c3fb35"},
	} {
		w := newWhirlpool()
		w.Write([]byte(c.in))
		if got := hex.EncodeToString(w.Sum(nil)); got != c.want {
			t.Errorf("Whirlpool(%q) = %s, want %s", c.in, got, c.want)
		}
	}
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Fatal("openssl is needed (make test installs it)")
	}
	rng := rand.New(rand.NewSource(1))
	for _, n := range []int{1, 31, 32, 33, 63, 64, 65, 95, 96, 97, 127, 128, 129, 1000, 4099} {
		in := make([]byte, n)
		rng.Read(in)
		cmd := exec.Command("openssl", "dgst", "-provider", "legacy", "-provider", "default", "-whirlpool", "-r")
		cmd.Stdin = bytes.NewReader(in)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("openssl dgst -whirlpool: %v", err)
		}
		want := strings.Fields(string(out))[0]
		w := newWhirlpool()
		for rest := in; len(rest) > 0; {
			k := min(len(rest), 1+rng.Intn(70))
			w.Write(rest[:k])
			rest = rest[k:]
		}
		if got := hex.EncodeToString(w.Sum(nil)); got != want {
			t.Errorf("%d bytes: %s, openssl %s", n, got, want)
		}
	}
}

// A state saved mid-message and restored into a fresh hash goes on to the
// same digest (crypto/hmac relies on it).
func TestWhirlpoolMarshal(t *testing.T) {
	in := bytes.Repeat([]byte("0123456789abcdef"), 9)
	for cut := 0; cut <= len(in); cut += 13 {
		a := newWhirlpool()
		a.Write(in[:cut])
		st, err := a.(interface{ MarshalBinary() ([]byte, error) }).MarshalBinary()
		if err != nil {
			t.Fatal(err)
		}
		b := newWhirlpool()
		if err := b.(interface{ UnmarshalBinary([]byte) error }).UnmarshalBinary(st); err != nil {
			t.Fatal(err)
		}
		a.Write(in[cut:])
		b.Write(in[cut:])
		if !bytes.Equal(a.Sum(nil), b.Sum(nil)) {
			t.Fatalf("cut at %d: the restored state gives another digest", cut)
		}
	}
	if err := newWhirlpool().(interface{ UnmarshalBinary([]byte) error }).UnmarshalBinary([]byte("short")); err == nil {
		t.Fatal("a malformed state was accepted")
	}
}
