package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"
)

// crypttabLine is the /etc/crypttab line that opens the converted disk at
// boot: the mapping name, the LUKS UUID, a passphrase prompt, LUKS.
func crypttabLine(name, luksUUID string) string {
	return fmt.Sprintf("%s UUID=%s none luks", name, luksUUID)
}

// appendCrypttab appends line to the crypttab file at path (creating it).
// It adds nothing when the very line is there already (added=false), and
// refuses when another entry already uses the name.
func appendCrypttab(path, name, line string) (added bool, err error) {
	old, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return false, fmt.Errorf("reading %s: %w", path, err)
	}
	for _, l := range strings.Split(string(old), "\n") {
		f := strings.Fields(l)
		if len(f) == 0 || strings.HasPrefix(f[0], "#") || f[0] != name {
			continue
		}
		if strings.Join(f, " ") == line {
			return false, nil
		}
		return false, fmt.Errorf("%s already has an entry for %s (%q); not adding %q", path, name, strings.TrimSpace(l), line)
	}
	fh, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		return false, fmt.Errorf("opening %s: %w", path, err)
	}
	var b bytes.Buffer
	if len(old) > 0 && old[len(old)-1] != '\n' {
		b.WriteByte('\n')
	}
	b.WriteString(line + "\n")
	if _, err := fh.Write(b.Bytes()); err != nil {
		fh.Close()
		return false, fmt.Errorf("writing %s: %w", path, err)
	}
	if err := fh.Sync(); err != nil {
		fh.Close()
		return false, fmt.Errorf("syncing %s: %w", path, err)
	}
	if err := fh.Close(); err != nil {
		return false, fmt.Errorf("closing %s: %w", path, err)
	}
	return true, nil
}
