package lvm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"github.com/dmconvert/dmconvert/dmtable"
)

// Client runs the lvm tools. The zero value is ready to use: it runs
// "lvm" from PATH with the system's lvm.conf. A Client holds no state
// between calls and may be copied; it is safe for concurrent use.
//
// Every command goes through one place (Client.run): the lvm multi-call
// binary with the command name as its first argument (so no pvs/vgs
// symlinks are needed), stdin from /dev/null (lvm never waits at a
// prompt; commands that would prompt get -y), LC_ALL=C, fd-leak warnings
// suppressed, stdout and stderr captured separately. A non-zero exit
// becomes a *CommandError; callers decide on the exit code and on the
// JSON report, never on lvm's English.
type Client struct {
	// Binary is the lvm executable; "" means "lvm" from PATH.
	Binary string
	// Config, if set, is passed as --config to every command: an lvm.conf
	// fragment such as `devices { filter=["a|/dev/vdb|","r|.*|"] }` or
	// `global/thin_check_executable=""`.
	Config string
	// Devices, if set, restricts every scanning command to these devices
	// (lvm's --devices, lvm2 >= 2.03.12): the others look missing, and
	// the lvm.conf filter and the devices file are not used. lvmconfig
	// and lvmdevices are not restricted.
	Devices []string
	// Env is appended to the environment of every command
	// (e.g. "LVM_SYSTEM_DIR=/etc/lvm-test").
	Env []string
	// Trace, if set, is called after every command with its argv, its
	// output and its exit code (-1 when it did not run to an exit).
	Trace func(args []string, stdout, stderr []byte, exitCode int)

	// exec, statDev and readLabel replace process execution and device
	// access in unit tests (nil: the real thing).
	exec      func(ctx context.Context, argv, env []string) (stdout, stderr []byte, exitCode int, err error)
	statDev   func(path string) (dmtable.Dev, error)
	readLabel func(path string) (*Label, error)
}

func (c *Client) blockDevice(path string) (dmtable.Dev, error) {
	if c.statDev != nil {
		return c.statDev(path)
	}
	return blockDevice(path)
}

func (c *Client) label(path string) (*Label, error) {
	if c.readLabel != nil {
		return c.readLabel(path)
	}
	return ReadLabel(path)
}

// flags that change how a command takes LVM's locks.
type lockMode int

const (
	lockNormal lockMode = iota
	// lockNone passes --nolocking: the command takes no file lock. Only
	// for use while this process holds the VG's lock itself (a Fence):
	// then the command is as serialised as if it had taken it.
	lockNone
)

// call describes one lvm invocation.
type call struct {
	cmd     string   // lvm command: "pvs", "vgchange", "lvmconfig", ...
	args    []string // its arguments
	lock    lockMode
	devices bool // restrict to Client.Devices (scanning commands)
}

func (c *Client) binary() string {
	if c.Binary != "" {
		return c.Binary
	}
	return "lvm"
}

// argv builds the full command line of a call.
func (c *Client) argv(k call) []string {
	a := []string{c.binary(), k.cmd}
	if c.Config != "" {
		a = append(a, "--config", c.Config)
	}
	if k.devices {
		for _, d := range c.Devices {
			a = append(a, "--devices", d)
		}
	}
	if k.lock == lockNone {
		a = append(a, "--nolocking")
	}
	return append(a, k.args...)
}

// run executes one lvm command and returns its stdout. A non-zero exit
// is a *CommandError (which still carries stderr); stdout is returned
// with it, since lvm prints a JSON report even when it fails.
func (c *Client) run(ctx context.Context, k call) ([]byte, error) {
	argv := c.argv(k)
	env := append(os.Environ(), "LC_ALL=C", "LVM_SUPPRESS_FD_WARNINGS=1")
	env = append(env, c.Env...)
	ex := c.exec
	if ex == nil {
		ex = execLVM
	}
	stdout, stderr, code, err := ex(ctx, argv, env)
	if c.Trace != nil {
		c.Trace(argv, stdout, stderr, code)
	}
	if err != nil || code != 0 {
		if err == nil {
			err = fmt.Errorf("exit status %d", code)
		}
		if ctx.Err() != nil {
			err = fmt.Errorf("%w (%v)", ctx.Err(), err)
		}
		return stdout, &CommandError{Args: argv, ExitCode: code, Stderr: cleanStderr(stderr), Err: err}
	}
	return stdout, nil
}

// execLVM runs argv as a child process.
func execLVM(ctx context.Context, argv, env []string) ([]byte, []byte, int, error) {
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = env
	var out, errb bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &errb
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return out.Bytes(), errb.Bytes(), 0, nil
	case errors.As(err, &ee) && ee.Exited():
		return out.Bytes(), errb.Bytes(), ee.ExitCode(), nil
	default:
		return out.Bytes(), errb.Bytes(), -1, err
	}
}

// cleanStderr keeps lvm's messages readable in one error line: trimmed
// lines joined with "; ".
func cleanStderr(b []byte) string {
	var lines []string
	for _, l := range strings.Split(string(b), "\n") {
		if l = strings.TrimSpace(l); l != "" {
			lines = append(lines, l)
		}
	}
	return strings.Join(lines, "; ")
}

// Run runs any lvm command with the Client's settings (binary, --config,
// environment) and returns its stdout. cmd is the lvm command name
// ("vgs", "lvchange", ...). The Client's Devices are not added: pass
// --devices in args if the command needs it. A non-zero exit is a
// *CommandError, returned together with whatever stdout lvm printed.
func (c *Client) Run(ctx context.Context, cmd string, args ...string) ([]byte, error) {
	return c.run(ctx, call{cmd: cmd, args: args})
}

// reportFlags are added to every reporting command: JSON, sizes in
// 512-byte sectors without a unit suffix, booleans as 0/1.
var reportFlags = []string{"--reportformat", "json", "--units", "s", "--nosuffix", "--binary"}

// ConfigValue reads one lvm.conf setting as lvm resolves it (the
// Client's --config on top of lvm.conf and the built-in defaults), with
// `lvmconfig --typeconfig full <path>`. path is "section/key", e.g.
// "global/locking_dir". The value is returned as lvm prints it, with the
// quotes of a string removed; a list comes back in its [..] form.
func (c *Client) ConfigValue(ctx context.Context, path string) (string, error) {
	m, err := c.configValues(ctx, path)
	if err != nil {
		return "", err
	}
	return m[path], nil
}

// configValues reads several settings in one lvmconfig call.
func (c *Client) configValues(ctx context.Context, paths ...string) (map[string]string, error) {
	args := append([]string{"--typeconfig", "full"}, paths...)
	out, err := c.run(ctx, call{cmd: "lvmconfig", args: args})
	if err != nil {
		return nil, fmt.Errorf("reading lvm configuration %s: %w", strings.Join(paths, " "), err)
	}
	return parseConfigOutput(out, paths)
}

// parseConfigOutput maps the `key=value` lines lvmconfig prints for the
// requested "section/key" paths (it prints only the key, in request
// order, one per line).
func parseConfigOutput(out []byte, paths []string) (map[string]string, error) {
	vals := map[string]string{}
	for _, line := range strings.Split(string(out), "\n") {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			return nil, fmt.Errorf("%w: lvmconfig line %q", ErrBadReport, line)
		}
		if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
			uq, err := strconv.Unquote(v)
			if err != nil {
				uq = v[1 : len(v)-1]
			}
			v = uq
		}
		vals[strings.TrimSpace(k)] = v
	}
	m := map[string]string{}
	for _, p := range paths {
		key := p[strings.LastIndex(p, "/")+1:]
		v, ok := vals[key]
		if !ok {
			return nil, fmt.Errorf("%w: lvmconfig printed no value for %s", ErrBadReport, p)
		}
		m[p] = v
	}
	return m, nil
}
