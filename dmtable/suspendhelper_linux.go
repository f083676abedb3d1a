//go:build linux

package dmtable

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The suspend helper (Options.SuspendHelper).
//
// A suspend waits for the device's in-flight I/O interruptibly. Client
// blocks every signal it can around the ioctl, but not SIGKILL: a
// process killed in that wait gets EINTR after the targets' presuspend
// hooks ran, and the kernel undoes only those with a presuspend_undo
// hook. dm-raid1 (the mirror target) has none; its presuspend took every
// region-recovery slot, so the next suspend of that table (by anyone)
// blocks for ever, uninterruptibly, and so does every later table swap
// of the device until a reboot. Reproduced in the VM (docs/design.md
// section 8); TestGuestSuspendHelperSurvivesKill checks the helper.
//
// With the helper, the ioctl runs in a child process (this program
// started again, see init) that SIGKILL of the parent does not reach: it
// is in its own process group, ignores the terminal's signals, and is
// not named like its parent. If the parent dies during a suspend, the
// child finishes it, so the device is left suspended, as after a kill
// just after the suspend returned: a resume of the device then works.
// The child exits when its parent goes (end of file on its requests).

// suspendHelperEnv marks a process started as a Client's suspend helper.
const suspendHelperEnv = "DMTABLE_SUSPEND_HELPER_V1"

func init() {
	if os.Getenv(suspendHelperEnv) != "1" {
		return
	}
	signal.Ignore(syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP, syscall.SIGQUIT, syscall.SIGPIPE, syscall.SIGTSTP)
	comm := []byte("dmtable-suspend\x00")
	_ = unix.Prctl(unix.PR_SET_NAME, uintptr(unsafe.Pointer(&comm[0])), 0, 0, 0)
	// The parent pins its memory (nothing it needs while a device is
	// suspended may have to come from a disk behind that device); so does
	// the helper (Open's version ioctl and the ready line run its paths
	// once before the first request).
	_ = unix.Mlockall(unix.MCL_CURRENT | unix.MCL_FUTURE | unix.MCL_ONFAULT)
	c, err := Open(Options{Udev: UdevOff})
	if err != nil {
		os.Exit(1)
	}
	os.Exit(serveSuspendHelper(os.Stdin, os.Stdout, c.suspendHere))
}

// suspendRequest and suspendReply are the helper's protocol: one JSON
// object a line each way.
type suspendRequest struct {
	Name  string       `json:"name"`
	Flags SuspendFlags `json:"flags"`
}

type suspendReply struct {
	Info  Info   `json:"info"`
	Errno int    `json:"errno,omitempty"` // the ioctl's errno
	Msg   string `json:"msg,omitempty"`   // any other failure
}

// serveSuspendHelper is the child's main: it suspends the devices it is
// asked to, one at a time, until its input ends.
func serveSuspendHelper(in io.Reader, out io.Writer, suspend func(string, SuspendFlags) (Info, error)) int {
	enc := json.NewEncoder(out)
	dec := json.NewDecoder(bufio.NewReader(in))
	if enc.Encode(suspendReply{}) != nil { // ready
		return 1
	}
	for {
		var req suspendRequest
		if err := dec.Decode(&req); err != nil {
			return 0 // the parent is gone (or closed us)
		}
		info, err := suspend(req.Name, req.Flags)
		rep := suspendReply{Info: info}
		if err != nil {
			rep.Msg = err.Error()
			var oe *OpError
			if errors.As(err, &oe) && oe.Err != nil {
				rep.Msg = oe.Err.Error()
			}
			var errno unix.Errno
			if errors.As(err, &errno) {
				rep.Errno = int(errno)
			}
		}
		if enc.Encode(rep) != nil {
			return 0
		}
	}
}

// suspendHelper is the parent's end: the child, started on first use.
type suspendHelper struct {
	mu     sync.Mutex
	cmd    *exec.Cmd
	in     io.WriteCloser
	enc    *json.Encoder
	dec    *json.Decoder
	broken error // the helper failed: suspends run in this process
}

// start runs the child and waits for its ready line.
func (h *suspendHelper) start() error {
	cmd := exec.Command("/proc/self/exe")
	cmd.Args = []string{"dmtable-suspend-helper"}
	cmd.Env = append(os.Environ(), suspendHelperEnv+"=1")
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	// No standard error: the helper may outlive this process by a
	// suspend, and should not hold the caller's pipe open meanwhile (a
	// failure to start shows as the missing ready line).
	in, err := cmd.StdinPipe()
	if err != nil {
		return err
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		in.Close()
		return err
	}
	if err := cmd.Start(); err != nil {
		in.Close()
		return err
	}
	h.cmd, h.in, h.enc, h.dec = cmd, in, json.NewEncoder(in), json.NewDecoder(bufio.NewReader(out))
	ready := make(chan error, 1)
	go func() {
		var rep suspendReply
		ready <- h.dec.Decode(&rep)
	}()
	select {
	case err = <-ready:
	case <-time.After(helperStartTimeout):
		// Its program could not be read (from a disk behind a device
		// left suspended?): go on without it.
		// It is reaped in the background: a process waiting for a
		// disk dies only once the disk answers.
		cmd.Process.Kill()
		in.Close()
		go cmd.Wait()
		h.cmd = nil
		return fmt.Errorf("the suspend helper did not start: no answer in %v", helperStartTimeout)
	}
	if err != nil {
		h.stop()
		return fmt.Errorf("the suspend helper did not start: %w", err)
	}
	return nil
}

// helperStartTimeout bounds the wait for the helper's ready line.
const helperStartTimeout = 10 * time.Second

// StartSuspendHelper starts the suspend helper (Options.SuspendHelper)
// now instead of at the first Suspend: call it while no device the
// program's file lives behind is suspended. If the helper cannot start,
// it returns why, and suspends run in this process.
func (c *Client) StartSuspendHelper() error {
	if c.helper == nil {
		return nil
	}
	h := c.helper
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.broken != nil || h.cmd != nil {
		return h.broken
	}
	if err := h.start(); err != nil {
		h.broken = err
		return err
	}
	return nil
}

// stop ends the child (end of file on its input) and reaps it.
func (h *suspendHelper) stop() {
	if h.cmd == nil {
		return
	}
	h.in.Close()
	_ = h.cmd.Wait()
	h.cmd = nil
}

// suspend asks the child to suspend name. ok false: the helper is not
// usable (it could not start, or died); the caller suspends itself.
func (h *suspendHelper) suspend(name string, flags SuspendFlags) (info Info, err error, ok bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.broken != nil {
		return Info{}, nil, false
	}
	if h.cmd == nil {
		if err := h.start(); err != nil {
			h.broken = err
			return Info{}, nil, false
		}
	}
	var rep suspendReply
	if err := h.enc.Encode(suspendRequest{Name: name, Flags: flags}); err != nil {
		h.broken = err
		h.stop()
		return Info{}, nil, false
	}
	if err := h.dec.Decode(&rep); err != nil {
		// The child died during the request: whether the device is
		// suspended now is unknown, and suspending again is harmless
		// (a suspended device's suspend does nothing).
		h.broken = err
		h.stop()
		return Info{}, nil, false
	}
	info, err = rep.result(name)
	return info, err, true
}

// result is what Suspend returns for the helper's reply.
func (rep suspendReply) result(name string) (Info, error) {
	if rep.Msg != "" || rep.Errno != 0 {
		return Info{}, &OpError{Op: "suspend", Device: name, Err: &helperError{msg: rep.Msg, errno: unix.Errno(rep.Errno)}}
	}
	return rep.Info, nil
}

// helperError is a failure the helper reported: its text, and the errno
// under it (0: none) for errors.Is and errors.As.
type helperError struct {
	msg   string
	errno unix.Errno
}

func (e *helperError) Error() string {
	if e.msg == "" {
		return e.errno.Error()
	}
	return e.msg
}

func (e *helperError) Unwrap() error {
	if e.errno == 0 {
		return nil
	}
	return e.errno
}
