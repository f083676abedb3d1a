package luks

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/term"
)

// Key input follows cryptsetup 2.6 (man cryptsetup, "NOTES ON PASSPHRASE
// PROCESSING FOR LUKS"; src/utils_password.c tools_get_key, lib/utils.c
// crypt_keyfile_device_read):
//
//   - KeyFile is a path: the file is read as binary, no newline
//     processing, skipping KeyfileOffset bytes; KeyfileSize > 0 reads
//     exactly that many bytes (fewer is an error), otherwise the whole
//     rest up to KeyfileSizeMax (default 8 MiB; a larger file is an
//     error). A terminal is refused as a key file.
//   - KeyFile "-": standard input read the same way (binary, no newline
//     processing) unless it is a terminal, which is prompted like below.
//   - KeyFile "": a passphrase. From a terminal: prompted without echo,
//     ends at the first newline, at most 512 bytes (longer input is
//     truncated, as cryptsetup does), KeyfileOffset not allowed. From
//     non-terminal standard input: read up to the first newline (not
//     included) or end of input, with the offset/size/max rules above;
//     empty input without a newline is an error.
//
// An empty regular key file yields an empty key, as in cryptsetup.

// Key input limits (cryptsetup's compiled-in defaults).
const (
	DefaultKeyfileSizeMax = 8192 * 1024
	MaxPassphraseSize     = 512
)

// KeySource says where a passphrase or key file comes from, with
// cryptsetup's option names.
type KeySource struct {
	KeyFile        string // --key-file ("" passphrase, "-" stdin)
	KeyfileOffset  int64  // --keyfile-offset
	KeyfileSize    int64  // --keyfile-size (0: whole input)
	KeyfileSizeMax int64  // 0: DefaultKeyfileSizeMax
	Prompt         string // terminal prompt, e.g. "Enter passphrase for /dev/vda: "
	Stdin          *os.File
	PromptOut      io.Writer // where the prompt goes; default os.Stderr
}

// ReadKey reads a passphrase or key file under cryptsetup's rules. The
// caller owns the result and should WipeBytes it after use.
func ReadKey(s KeySource) ([]byte, error) {
	if s.KeyfileOffset < 0 || s.KeyfileSize < 0 || s.KeyfileSizeMax < 0 {
		return nil, fmt.Errorf("negative keyfile offset or size: %w", ErrInvalidArgument)
	}
	stdin := s.Stdin
	if stdin == nil {
		stdin = os.Stdin
	}
	if s.KeyFile != "" && s.KeyFile != "-" {
		f, err := os.Open(s.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("key file: %w: %w", err, ErrKeyInput)
		}
		defer f.Close()
		if term.IsTerminal(int(f.Fd())) {
			return nil, fmt.Errorf("key file %s is a terminal: %w", s.KeyFile, ErrKeyInput)
		}
		size := int64(-1)
		if st, err := f.Stat(); err == nil && st.Mode().IsRegular() {
			size = st.Size()
		}
		return readKeyStream(f, size, s.KeyfileOffset, s.KeyfileSize, s.KeyfileSizeMax, false)
	}
	if term.IsTerminal(int(stdin.Fd())) {
		if s.KeyfileOffset != 0 {
			return nil, fmt.Errorf("keyfile offset with terminal input: %w", ErrKeyInput)
		}
		out := s.PromptOut
		if out == nil {
			out = os.Stderr
		}
		prompt := s.Prompt
		if prompt == "" {
			prompt = "Enter passphrase: "
		}
		fmt.Fprint(out, prompt)
		p, err := term.ReadPassword(int(stdin.Fd()))
		fmt.Fprintln(out)
		if err != nil {
			return nil, fmt.Errorf("reading passphrase from terminal: %w: %w", err, ErrKeyInput)
		}
		if len(p) > MaxPassphraseSize {
			wipe(p[MaxPassphraseSize:])
			p = p[:MaxPassphraseSize]
		}
		return p, nil
	}
	size := int64(-1)
	if st, err := stdin.Stat(); err == nil && st.Mode().IsRegular() {
		size = st.Size()
	}
	return readKeyStream(stdin, size, s.KeyfileOffset, s.KeyfileSize, s.KeyfileSizeMax, s.KeyFile == "")
}

// readKeyStream implements crypt_keyfile_device_read. regularSize is the
// file size for a regular file, -1 otherwise. stopEOL selects passphrase
// mode (stop at the first newline, reading one byte at a time so nothing
// after it is consumed).
func readKeyStream(r io.Reader, regularSize, offset, size, maxSize int64, stopEOL bool) ([]byte, error) {
	if maxSize == 0 {
		maxSize = DefaultKeyfileSizeMax
	}
	unlimited := size == 0
	limit := size
	if unlimited {
		limit = maxSize + 1
	}
	if regularSize >= 0 && offset > regularSize {
		return nil, fmt.Errorf("keyfile offset %d beyond the %d-byte file: %w", offset, regularSize, ErrKeyInput)
	}
	if offset > 0 {
		if s, ok := r.(io.Seeker); ok && regularSize >= 0 {
			if _, err := s.Seek(offset, io.SeekCurrent); err != nil {
				return nil, fmt.Errorf("seeking to keyfile offset: %w: %w", err, ErrKeyInput)
			}
		} else if n, err := io.CopyN(io.Discard, r, offset); err != nil || n != offset {
			return nil, fmt.Errorf("cannot skip %d bytes of key input: %w", offset, ErrKeyInput)
		}
	}
	var buf []byte
	newline := false
	one := make([]byte, 1)
	chunk := make([]byte, 4096)
	for int64(len(buf)) < limit {
		if stopEOL {
			n, err := r.Read(one)
			if n == 1 {
				if one[0] == '\n' {
					newline = true
					break
				}
				buf = append(buf, one[0])
			}
			if err != nil {
				if errors.Is(err, io.EOF) {
					break
				}
				wipe(buf)
				return nil, fmt.Errorf("reading key: %w: %w", err, ErrKeyInput)
			}
			continue
		}
		want := min(int64(len(chunk)), limit-int64(len(buf)))
		n, err := r.Read(chunk[:want])
		buf = append(buf, chunk[:n]...)
		if err != nil {
			if errors.Is(err, io.EOF) {
				break
			}
			wipe(buf)
			wipe(chunk)
			return nil, fmt.Errorf("reading key: %w: %w", err, ErrKeyInput)
		}
	}
	wipe(chunk)
	if len(buf) == 0 && regularSize < 0 && !newline {
		return nil, fmt.Errorf("nothing to read on input: %w", ErrKeyInput)
	}
	if unlimited && int64(len(buf)) == limit {
		wipe(buf)
		return nil, fmt.Errorf("maximum keyfile size %d exceeded: %w", maxSize, ErrKeyInput)
	}
	if !unlimited && int64(len(buf)) != size {
		wipe(buf)
		return nil, fmt.Errorf("cannot read the requested %d bytes of key (got %d): %w", size, len(buf), ErrKeyInput)
	}
	if buf == nil {
		buf = []byte{}
	}
	return buf, nil
}
