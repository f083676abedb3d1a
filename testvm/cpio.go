package testvm

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
)

// The initramfs is a "newc" cpio archive (the format the kernel unpacks,
// see Documentation/driver-api/early-userspace/buffer-format.rst):
// every entry is a 110-byte ASCII header of 13 eight-digit hex fields
// after the magic "070701", the NUL-terminated name padded to 4 bytes,
// then the data padded to 4 bytes; the archive ends with an entry named
// "TRAILER!!!".

const (
	cpioMagic   = "070701"
	cpioTrailer = "TRAILER!!!"
	sIFDIR      = 0o040000
	sIFREG      = 0o100000
	sIFLNK      = 0o120000
)

// treeEntry is one node of the guest's root file system.
type treeEntry struct {
	mode   uint32 // permission bits only
	kind   uint32 // sIFDIR, sIFREG or sIFLNK
	src    string // host file to copy (regular files), or
	data   []byte // literal content (regular files, when src == "")
	target string // symlink target
}

// tree is the guest root file system being assembled, keyed by the
// absolute guest path without the leading slash ("usr/bin/bash").
type tree map[string]*treeEntry

func (t tree) dir(p string) {
	p = cleanRel(p)
	if p == "" {
		return
	}
	if e, ok := t[p]; ok && e.kind == sIFDIR {
		return
	}
	t[p] = &treeEntry{kind: sIFDIR, mode: 0o755}
}

func (t tree) file(p string, mode uint32, src string) {
	t[cleanRel(p)] = &treeEntry{kind: sIFREG, mode: mode, src: src}
}

func (t tree) data(p string, mode uint32, data []byte) {
	t[cleanRel(p)] = &treeEntry{kind: sIFREG, mode: mode, data: data}
}

func (t tree) symlink(p, target string) {
	t[cleanRel(p)] = &treeEntry{kind: sIFLNK, mode: 0o777, target: target}
}

func cleanRel(p string) string {
	return strings.TrimPrefix(path.Clean("/"+p), "/")
}

// writeCPIO writes the tree as a newc archive. Parent directories are
// emitted before their children (missing ones are created); entries are
// sorted so the same tree always gives the same bytes (mtime 0, uid 0).
func (t tree) writeCPIO(w io.Writer) error {
	for p := range t {
		for d := path.Dir(p); d != "." && d != "/"; d = path.Dir(d) {
			if _, ok := t[d]; !ok {
				t.dir(d)
			}
		}
	}
	names := make([]string, 0, len(t))
	for p := range t {
		names = append(names, p)
	}
	// Sorting by path components keeps every directory before its
	// contents ("a/b" after "a", also when "a-c" exists).
	sort.Slice(names, func(i, j int) bool {
		return strings.ReplaceAll(names[i], "/", "\x00") < strings.ReplaceAll(names[j], "/", "\x00")
	})
	cw := &cpioWriter{w: bufio.NewWriterSize(w, 1<<20)}
	for _, p := range names {
		e := t[p]
		var err error
		switch e.kind {
		case sIFDIR:
			err = cw.entry(p, sIFDIR|e.mode, 2, nil, 0)
		case sIFLNK:
			err = cw.entry(p, sIFLNK|e.mode, 1, strings.NewReader(e.target), int64(len(e.target)))
		case sIFREG:
			if e.src == "" {
				err = cw.entry(p, sIFREG|e.mode, 1, strings.NewReader(string(e.data)), int64(len(e.data)))
				break
			}
			err = cw.hostFile(p, e.mode, e.src)
		default:
			err = fmt.Errorf("cpio: %s: unknown entry kind %o", p, e.kind)
		}
		if err != nil {
			return err
		}
	}
	return cw.close()
}

type cpioWriter struct {
	w   *bufio.Writer
	ino uint32
}

func (c *cpioWriter) hostFile(name string, mode uint32, src string) error {
	f, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("cpio: %s: %w", name, err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("cpio: %s: %w", name, err)
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("cpio: %s: %s is not a regular file", name, src)
	}
	return c.entry(name, sIFREG|mode, 1, f, st.Size())
}

func (c *cpioWriter) entry(name string, mode, nlink uint32, data io.Reader, size int64) error {
	if size > 0xffffffff {
		return fmt.Errorf("cpio: %s: %d bytes is too large for newc", name, size)
	}
	c.ino++
	hdr := fmt.Sprintf("%s%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		cpioMagic, c.ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, len(name)+1, 0)
	if _, err := c.w.WriteString(hdr); err != nil {
		return err
	}
	if _, err := c.w.WriteString(name + "\x00"); err != nil {
		return err
	}
	if err := c.pad(len(hdr) + len(name) + 1); err != nil {
		return err
	}
	if size > 0 {
		n, err := io.CopyN(c.w, data, size)
		if err != nil {
			return fmt.Errorf("cpio: %s: copied %d of %d bytes: %w", name, n, size, err)
		}
	}
	return c.pad(int(size % 4))
}

func (c *cpioWriter) pad(n int) error {
	if r := n % 4; r != 0 {
		_, err := c.w.Write(make([]byte, 4-r))
		return err
	}
	return nil
}

func (c *cpioWriter) close() error {
	hdr := fmt.Sprintf("%s%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x%08x",
		cpioMagic, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(cpioTrailer)+1, 0)
	if _, err := c.w.WriteString(hdr + cpioTrailer + "\x00"); err != nil {
		return err
	}
	if err := c.pad(len(hdr) + len(cpioTrailer) + 1); err != nil {
		return err
	}
	return c.w.Flush()
}
