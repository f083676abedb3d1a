package convert

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/dmconvert/dmconvert/dmtable"
)

// TestJournalMustBeARegularFile: bbolt opens an existing path read-write
// and, finding it empty (a block device's size reads as 0), writes its
// first pages at its start. A --journal naming a device (another disk, or
// the one being converted), a directory or a pipe is refused before
// anything is written, naming the disk and the journal.
func TestJournalMustBeARegularFile(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct{ journal, want string }{
		{dir, "is not a regular file (a directory)"},
		{os.DevNull, "is not a regular file (a character device)"},
	} {
		sc := newScenario(t, 81)
		w := sc.world()
		e := sc.engine(w)
		o := sc.options()
		o.Journal = c.journal
		_, err := e.PlanEncrypt(context.Background(), o)
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), fakeDiskPath) || !strings.Contains(err.Error(), c.journal) {
			t.Fatalf("encrypt with --journal %s: %v, want a refusal naming %s and %q", c.journal, err, fakeDiskPath, c.want)
		}
		if re := (*RefusalError)(nil); !errors.As(err, &re) {
			t.Fatalf("encrypt with --journal %s: %v is not a refusal", c.journal, err)
		}
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Fatalf("the refused run wrote into %s: %v", dir, ents)
	}
	// A new file in an existing directory, and an existing journal file,
	// are what --journal takes.
	sc := newScenario(t, 82)
	w := sc.world()
	e := sc.engine(w)
	o := sc.options()
	o.Journal = filepath.Join(dir, "new.journal")
	if _, err := e.PlanEncrypt(context.Background(), o); err != nil {
		t.Fatalf("encrypt with a new journal file: %v", err)
	}
}

// TestMountedFrom: a file system with an anonymous device number (btrfs,
// whose subvolumes each have their own) is resolved to the block device
// it was mounted from, by the longest mount point that holds the path;
// tmpfs, NFS and the like keep their anonymous number.
func TestMountedFrom(t *testing.T) {
	const mi = `22 1 0:21 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
26 1 0:31 /root / rw,relatime shared:1 - btrfs /dev/mapper/luks-1234 rw,seclabel,compress=zstd:1,space_cache=v2,subvolid=257,subvol=/root
60 26 0:31 /home /home rw,relatime shared:30 - btrfs /dev/mapper/luks-1234 rw,subvolid=256,subvol=/home
61 26 0:40 / /tmp rw,nosuid,nodev shared:31 - tmpfs tmpfs rw,size=8G
62 26 0:41 / /mnt/my\040share rw,relatime shared:32 - btrfs /dev/sdb1 rw
63 26 0:42 / /var/lib/dmconvert rw,relatime shared:33 - nfs4 server:/export rw`
	anon := dmtable.Dev{Major: 0, Minor: 77} // a subvolume's own number
	blocks := map[string]dmtable.Dev{"/dev/mapper/luks-1234": {Major: 253, Minor: 3}, "/dev/sdb1": {Major: 8, Minor: 17}}
	blockDev := func(src string) (dmtable.Dev, bool) { d, ok := blocks[src]; return d, ok }
	for _, c := range []struct {
		path string
		want dmtable.Dev
	}{
		{"/var/lib/x.journal", blocks["/dev/mapper/luks-1234"]}, // on the root subvolume
		{"/home/u/j", blocks["/dev/mapper/luks-1234"]},
		{"/homely/j", blocks["/dev/mapper/luks-1234"]}, // not under /home
		{"/tmp/j", anon},
		{"/mnt/my share/j", blocks["/dev/sdb1"]},
		{"/var/lib/dmconvert/j", anon},
	} {
		if got := mountedFrom(mi, anon, c.path, blockDev); got != c.want {
			t.Errorf("%s: %v, want %v", c.path, got, c.want)
		}
	}
}
