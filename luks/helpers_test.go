package luks

import (
	"bytes"
	"crypto/rand"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

// toolRequired reports whether a missing reference tool must fail the
// test rather than skip it (VM runs and CI).
func toolRequired() bool {
	return os.Getenv("DMCONVERT_VM") == "1" || os.Getenv("CI") != ""
}

// requireTool finds a reference tool; on a developer machine without it
// the test skips, under DMCONVERT_VM=1 or CI it fails.
func requireTool(t testing.TB, name string) string {
	t.Helper()
	if p, err := exec.LookPath(name); err == nil {
		return p
	}
	for _, dir := range []string{"/usr/sbin", "/sbin", "/usr/bin"} {
		p := filepath.Join(dir, name)
		if st, err := os.Stat(p); err == nil && !st.IsDir() {
			return p
		}
	}
	if toolRequired() {
		t.Fatalf("%s is not installed; it is required when DMCONVERT_VM=1 or CI is set", name)
	}
	t.Skipf("%s is not installed; skipping this cross-test (it fails instead under DMCONVERT_VM=1 or CI)", name)
	return ""
}

// runTool runs a reference tool with optional stdin, returning combined
// output and the error (an *exec.ExitError on a non-zero exit).
func runTool(t testing.TB, stdin []byte, tool string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(tool, args...)
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	return string(out), err
}

type cryptsetup struct {
	t    testing.TB
	path string
}

func needCryptsetup(t testing.TB) cryptsetup {
	return cryptsetup{t: t, path: requireTool(t, "cryptsetup")}
}

// in returns the same tool bound to a subtest, so failures stop the
// subtest that saw them.
func (c cryptsetup) in(t testing.TB) cryptsetup { return cryptsetup{t: t, path: c.path} }

// ok runs cryptsetup and fails the test on a non-zero exit.
func (c cryptsetup) ok(stdin []byte, args ...string) string {
	c.t.Helper()
	out, err := runTool(c.t, stdin, c.path, args...)
	if err != nil {
		c.t.Fatalf("cryptsetup %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

// fails runs cryptsetup and fails the test if it succeeds.
func (c cryptsetup) fails(stdin []byte, args ...string) string {
	c.t.Helper()
	out, err := runTool(c.t, stdin, c.path, args...)
	var ee *exec.ExitError
	if err == nil {
		c.t.Fatalf("cryptsetup %s unexpectedly succeeded:\n%s", strings.Join(args, " "), out)
	} else if !errors.As(err, &ee) {
		c.t.Fatalf("cryptsetup %s: %v", strings.Join(args, " "), err)
	}
	return out
}

// dumpVolumeKey returns the volume key cryptsetup recovers with keyFile.
func (c cryptsetup) dumpVolumeKey(dev, keyFile string, extra ...string) []byte {
	c.t.Helper()
	out := filepath.Join(c.t.TempDir(), "vk.dump")
	args := append([]string{"luksDump", "--dump-volume-key", "--batch-mode", "--key-file", keyFile, "--volume-key-file", out}, extra...)
	c.ok(nil, append(args, dev)...)
	b, err := os.ReadFile(out)
	if err != nil {
		c.t.Fatal(err)
	}
	return b
}

func writeTemp(t testing.TB, name string, data []byte) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

func randBytes(t testing.TB, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return b
}

// binaryKeyFile returns random key-file contents that contain newlines
// and NULs, so any newline processing would break them.
func binaryKeyFile(t testing.TB, n int) []byte {
	b := randBytes(t, n)
	b[3], b[n/2], b[n-2] = '\n', 0, '\n'
	return b
}

// deviceFile writes img to a new file padded with size extra bytes.
func deviceFile(t testing.TB, img []byte, extra int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "disk.img")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(img, 0); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(int64(len(img)) + extra); err != nil {
		t.Fatal(err)
	}
	return p
}

func readFileT(t testing.TB, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func readHeader(t testing.TB, p string) *Header {
	t.Helper()
	h, err := ReadFile(p)
	if err != nil {
		t.Fatalf("reading %s: %v", p, err)
	}
	return h
}

// jsonEqual compares two JSON texts semantically.
func jsonEqual(t testing.TB, a, b []byte) bool {
	t.Helper()
	var x, y any
	if err := json.Unmarshal(a, &x); err != nil {
		t.Fatalf("json %q: %v", a, err)
	}
	if err := json.Unmarshal(b, &y); err != nil {
		t.Fatalf("json %q: %v", b, err)
	}
	return reflect.DeepEqual(x, y)
}

// Cheap test KDF settings (argon2: 32 MiB, 4 passes; pbkdf2: 1000).
var (
	testArgon2id = PBKDF{Type: KDFArgon2id, Iterations: 4, MemoryKiB: 32768}
	testArgon2i  = PBKDF{Type: KDFArgon2i, Iterations: 4, MemoryKiB: 32768}
	testPBKDF2   = PBKDF{Type: KDFPBKDF2, Iterations: 1000}
)

// cryptsetupPBKDFArgs returns cryptsetup options equivalent to p.
func cryptsetupPBKDFArgs(p PBKDF) []string {
	a := []string{"--pbkdf", p.Type, "--pbkdf-force-iterations", itoa(int(p.Iterations))}
	if p.Type != KDFPBKDF2 {
		a = append(a, "--pbkdf-memory", itoa(int(p.MemoryKiB)))
	}
	return a
}

func itoa(n int) string { return strconv.Itoa(n) }

func openRW(p string) (*os.File, error) { return os.OpenFile(p, os.O_RDWR, 0) }
