package main

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/spf13/cobra"

	"github.com/dmconvert/dmconvert/convert"
	"github.com/dmconvert/dmconvert/luks"
)

func TestParseSize(t *testing.T) {
	for _, c := range []struct {
		in   string
		want uint64
	}{
		{"0", 0}, {"4096", 4096}, {"16M", 16 << 20}, {"16m", 16 << 20}, {"16MiB", 16 << 20}, {"16MB", 16 << 20},
		{"2K", 2048}, {"2k", 2048}, {"1G", 1 << 30}, {"1T", 1 << 40}, {"8S", 4096}, {"8s", 4096}, {"512B", 512}, {" 4K ", 4096},
	} {
		got, err := parseSize(c.in)
		if err != nil || got != c.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", c.in, got, err, c.want)
		}
	}
	for _, in := range []string{"", "M", "-1", "1.5M", "12Q", "16 MX", "99999999999999999999", "20000000T"} {
		if got, err := parseSize(in); err == nil {
			t.Errorf("parseSize(%q) = %d, want an error", in, got)
		}
	}
}

// parseEncrypt parses an encrypt command line into its options the way
// cobra does for the real command.
func parseEncrypt(t *testing.T, args ...string) (*encryptConfig, error) {
	t.Helper()
	o := &encryptOptions{}
	cmd := (&app{}).encryptCommandFor(o, func(f func(*cobra.Command, []string) error) func(*cobra.Command, []string) error { return f })
	if err := cmd.ParseFlags(args); err != nil {
		return nil, usagef("%v", err)
	}
	return o.validate("/etc/crypttab")
}

// The exact flags the guest end-to-end tests pass.
func TestEncryptFlagsOfTheGuestTests(t *testing.T) {
	cfg, err := parseEncrypt(t, "--batch-mode", "--key-file", "/tmp/k", "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")
	if err != nil {
		t.Fatal(err)
	}
	if k := cfg.luks.PBKDF; k.Type != luks.KDFPBKDF2 || k.Iterations != 1000 || k.MemoryKiB != 0 {
		t.Fatalf("pbkdf2 flags: %+v", k)
	}
	if cfg.luks.Version != 2 || cfg.keyBytes != 64 || cfg.headerSectors != 16<<20/512 || cfg.region != convert.DefaultRegionSize || cfg.chunk != 0 {
		t.Fatalf("defaults: %+v", cfg)
	}
	cfg, err = parseEncrypt(t, "--batch-mode", "--key-file", "/tmp/k", "--pbkdf", "argon2id", "--pbkdf-memory", "32768",
		"--pbkdf-force-iterations", "4", "--pbkdf-parallel", "1", "--type", "luks2", "--crypttab")
	if err != nil {
		t.Fatal(err)
	}
	if k := cfg.luks.PBKDF; k.Type != luks.KDFArgon2id || k.Iterations != 4 || k.MemoryKiB != 32768 || k.Parallel != 1 {
		t.Fatalf("argon2 flags: %+v", k)
	}
	if cfg.crypttab != "/etc/crypttab" {
		t.Fatalf("--crypttab goes to %q", cfg.crypttab)
	}
	cfg, err = parseEncrypt(t, "--type", "luks1", "--cipher", "aes-cbc-essiv:sha256", "--key-size", "256", "--header-size", "4M",
		"--chunk-size", "512K", "--region-size", "1M", "--iter-time", "500", "--hash", "SHA512", "--crypttab-file", "/x/crypttab", "--uuid", "01234567-89AB-4def-8123-456789abcdef")
	if err != nil {
		t.Fatal(err)
	}
	l := cfg.luks
	if l.Version != 1 || l.Cipher != "aes-cbc-essiv:sha256" || cfg.keyBytes != 32 || l.HeaderSize != 4<<20 || l.PBKDF.Type != luks.KDFPBKDF2 ||
		l.PBKDF.IterTime != 500*time.Millisecond || l.Hash != "sha512" || l.PBKDF.Hash != "sha512" || l.UUID != "01234567-89ab-4def-8123-456789abcdef" {
		t.Fatalf("luks1 options: %+v", l)
	}
	if cfg.chunk != 1024 || cfg.region != 2048 || cfg.crypttab != "/x/crypttab" {
		t.Fatalf("sizes: chunk %d region %d crypttab %q", cfg.chunk, cfg.region, cfg.crypttab)
	}
	cfg, err = parseEncrypt(t, "--cipher", "aes-cbc-plain64")
	if err != nil || cfg.keyBytes != 32 {
		t.Fatalf("non-XTS default key size: %v %+v", err, cfg)
	}
}

func TestEncryptFlagErrors(t *testing.T) {
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--type", "luks3"}, "--type"},
		{[]string{"--key-size", "100"}, "--key-size"},
		{[]string{"--key-size", "384"}, "--cipher"},
		{[]string{"--cipher", "camellia-xts-plain64"}, "--cipher"},
		{[]string{"--sector-size", "1000"}, "--sector-size"},
		{[]string{"--sector-size", "4096", "--type", "luks1"}, "LUKS1"},
		{[]string{"--header-size", "1000"}, "--header-size"},
		{[]string{"--header-size", "256K"}, "too small"},
		{[]string{"--header-size", "2M", "--type", "luks1"}, ""},             // fits: 2 MiB is LUKS1's default
		{[]string{"--header-size", "2020K", "--type", "luks1"}, "too small"}, // keyslots end at 2020K: no room for checkpoints
		{[]string{"--header-size", "2024K", "--type", "luks1"}, ""},
		{[]string{"--pbkdf", "scrypt"}, "--pbkdf"},
		{[]string{"--pbkdf", "pbkdf2", "--pbkdf-memory", "1024"}, "argon2 only"},
		{[]string{"--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "999"}, "minimum"},
		{[]string{"--pbkdf", "argon2id", "--pbkdf-force-iterations", "3"}, "minimum"},
		{[]string{"--pbkdf-memory", "16"}, "--pbkdf-memory"},
		{[]string{"--pbkdf-parallel", "5"}, "--pbkdf-parallel"},
		{[]string{"--type", "luks1", "--pbkdf", "argon2i"}, "LUKS1"},
		{[]string{"--type", "luks1", "--label", "x"}, "LUKS2"},
		{[]string{"--label", strings.Repeat("x", 48)}, "47 bytes"},
		{[]string{"--uuid", "not-a-uuid"}, "--uuid"},
		{[]string{"--name", "a/b"}, "--name"},
		{[]string{"--chunk-size", "1000"}, "--chunk-size"},
		{[]string{"--chunk-size", "32M"}, "larger than the header"},
		{[]string{"--region-size", "3M"}, "--region-size"},
		{[]string{"--region-size", "2K"}, "--region-size"},
		{[]string{"--keyfile-offset", "-1"}, "negative"},
	} {
		_, err := parseEncrypt(t, c.args...)
		if c.want == "" {
			if err != nil {
				t.Errorf("%v: %v", c.args, err)
			}
			continue
		}
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v: error %v, want one mentioning %q", c.args, err, c.want)
			continue
		}
		if exitCode(err) != exitRefused {
			t.Errorf("%v: exit code %d, want %d", c.args, exitCode(err), exitRefused)
		}
	}
}

// Bad flags through the whole command line: exit 2, nothing touched.
func TestEncryptFlagErrorsEndToEnd(t *testing.T) {
	ta := newTestApp(t)
	sys := ta.withDisk()
	for _, args := range [][]string{
		{"encrypt", "--type", "luks3", sys.disk},
		{"encrypt", "--header-size", "12Q", sys.disk},
		{"encrypt", "--pbkdf-memory", "lots", sys.disk},
		{"encrypt", "--dry-run", "--header-size", "1M", "--journal", ta.dir + "/j", "/dev/nonexistent"},
	} {
		ta.mustRun(exitRefused, args...)
	}
	if sys.created != 0 {
		t.Fatal("devices created")
	}
}

// rekey's --cipher and --key-size are refused before the passphrase is
// read or the engine opened, naming the target and the reason.
func TestRekeyCipherFlagErrors(t *testing.T) {
	ta := newTestApp(t)
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{"--key-size", "100"}, "not a multiple of 8"},
		{[]string{"-s", "-8"}, "must be positive"},
		{[]string{"--cipher", "serpent-xts"}, "no IV mode"},
		{[]string{"-c", "capi:xts(aes)-plain64"}, "capi:"},
		{[]string{"--cipher", "aes-xts-plain64", "--key-size", "384"}, "256- or 512-bit"},
		{[]string{"--cipher", "serpent-xts-plain64", "--key-size", "264"}, "XTS splits the key"},
	} {
		args := append([]string{"rekey", "vda_crypt", "--key-file", "/nonexistent/pw"}, c.args...)
		ta.mustRun(exitRefused, args...)
		if msg := ta.err.String(); !strings.Contains(msg, "vda_crypt") || !strings.Contains(msg, c.want) {
			t.Errorf("%v: %q, want the target and %q", c.args, msg, c.want)
		}
	}
	// Well-formed ones get as far as the engine (none in this test).
	ta.mustRun(exitFailed, "rekey", "vda_crypt", "--key-file", "/nonexistent/pw", "--cipher", "serpent-xts-plain64", "--key-size", "256")
	if msg := ta.err.String(); !strings.Contains(msg, "no device-mapper") {
		t.Errorf("a valid cipher was refused: %s", msg)
	}
}

// --hash is checked before anything is read: only for plain rekeys, not
// with --old-key-file, a hash PlainKey computes, and never two readers of
// standard input.
func TestCheckHash(t *testing.T) {
	plain := &convert.Spec{Op: "rekey", OldCrypt: convert.CryptSpec{Cipher: "aes-xts-plain64", KeyBytes: 64}}
	toLUKS2 := *plain
	toLUKS2.PlainTo = "luks2"
	luks2 := &convert.Spec{Op: "rekey", LUKSVersion: 2, OldCrypt: plain.OldCrypt}
	for _, c := range []struct {
		o    continueOptions
		spec *convert.Spec
		tty  bool
		bad  string // "" : accepted
	}{
		{continueOptions{}, luks2, false, ""},
		{continueOptions{hash: "sha512"}, plain, false, ""},
		{continueOptions{hash: "ripemd160"}, plain, true, ""},
		{continueOptions{hash: "sha256"}, luks2, false, "plain dm-crypt"},
		{continueOptions{hash: "sha256", oldKeyFile: "/k"}, plain, false, "give one of them"},
		{continueOptions{hash: "whirlpool"}, plain, false, "whirlpool"},
		{continueOptions{hash: "sha256:65"}, plain, false, "more than the 64-byte key"},
		{continueOptions{hash: "sha256"}, &toLUKS2, false, "--key-file FILE"},
		{continueOptions{hash: "sha256", key: keyOptions{file: "/pw"}}, &toLUKS2, false, ""},
		{continueOptions{hash: "sha256"}, &toLUKS2, true, ""},
	} {
		err := c.o.checkHash(c.spec, c.tty)
		switch {
		case c.bad == "" && err != nil:
			t.Errorf("--hash %q (%+v): %v", c.o.hash, c.o, err)
		case c.bad != "" && (err == nil || !strings.Contains(err.Error(), c.bad)):
			t.Errorf("--hash %q (%+v): %v, want an error with %q", c.o.hash, c.o, err, c.bad)
		}
	}
}

// A refusal or wrong-key error about further key #N names the file given
// as the N-th --also-key-file, and keeps its kind (exit code).
func TestNameAlsoKeyFiles(t *testing.T) {
	files := []string{"/root/a.key", "/root/b.key"}
	wrong := fmt.Errorf("/dev/vdb: further key #2 (--also-key-file) opens no keyslot of the header: %w", convert.ErrWrongPassphrase)
	got := nameAlsoKeyFiles(wrong, files)
	if !errors.Is(got, convert.ErrWrongPassphrase) || exitCode(got) != exitPassphrase {
		t.Fatalf("the wrong-key error lost its kind: %v", got)
	}
	if want := "/dev/vdb: --also-key-file /root/b.key opens no keyslot of the header"; !strings.HasPrefix(got.Error(), want) {
		t.Fatalf("message %q, want it to start with %q", got.Error(), want)
	}
	ref := &convert.RefusalError{Device: "/dev/vdb", Reason: "further key #1 (--also-key-file) cannot be kept: it opens keyslot 0"}
	got = nameAlsoKeyFiles(ref, files)
	var re *convert.RefusalError
	if !errors.As(got, &re) || !strings.Contains(got.Error(), "--also-key-file /root/a.key cannot be kept") {
		t.Fatalf("refusal: %v", got)
	}
	other := errors.New("something else")
	if nameAlsoKeyFiles(other, files) != other {
		t.Fatal("an unrelated error was changed")
	}
}

// rekey's --hash and --old-key-file (a plain mapping whose key is in the
// kernel keyring; its key size is not known before the plan).
func TestCheckOldKeyFlagsBeforePlan(t *testing.T) {
	for _, c := range []struct {
		hash, oldKeyFile, keyFile string
		toLUKS2, tty              bool
		bad                       string
	}{
		{"", "/k", "", false, false, ""},
		{"ripemd160", "", "", false, false, ""},
		{"sha256", "/k", "", false, false, "give one of them"},
		{"whirlpool", "", "", false, false, "whirlpool"},
		{"sha256", "", "", true, false, "--key-file FILE"},
		{"sha256", "", "-", true, false, "--key-file FILE"},
		{"sha256", "", "/pw", true, false, ""},
		{"sha256", "", "", true, true, ""},
	} {
		err := checkOldKeyFlags(c.hash, c.oldKeyFile, c.toLUKS2, c.keyFile, c.tty, 0)
		switch {
		case c.bad == "" && err != nil:
			t.Errorf("%+v: %v", c, err)
		case c.bad != "" && (err == nil || !strings.Contains(err.Error(), c.bad) || exitCode(err) != exitRefused):
			t.Errorf("%+v: %v, want a usage error with %q", c, err, c.bad)
		}
	}
}
