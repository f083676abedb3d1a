package convert

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/dmconvert/dmconvert/testvm"
)

// Real-kernel tests of the dmconvert command: signals, kill -9, abort,
// and every refusal, driving the statically built binary the way an
// administrator would.

// vmCLI (TestVMCLI) boots one VM for the command-line tests: vda, vdb, vdc are
// converted (one per test), vdd holds journals and acknowledgement logs,
// vde and vdf are for the refusal cases.
func vmCLI(t *testing.T) {
	vmParallel(t)
	bin := testvm.BuildStatic(t, "./cmd/dmconvert")
	testvm.RunTestsInGuest(t, testvm.Options{
		Disks: []testvm.Disk{
			{Size: 512 * guestMiB}, {Size: 192 * guestMiB}, {Size: 192 * guestMiB},
			{Size: 256 * guestMiB}, {Size: 128 * guestMiB}, {Size: 64 * guestMiB},
			{Size: 160 * guestMiB}, {Size: 160 * guestMiB}, {Size: 160 * guestMiB},
			{Size: 160 * guestMiB}, // d[9]: random kills
			{Size: 160 * guestMiB}, // d[10]: random kills of an abort
			{Size: 96 * guestMiB},  // d[11]: a helper held open
			{Size: 128 * guestMiB}, // d[12]: lvs in a loop
		},
		Run:     "^TestGuestCLI",
		Files:   map[string]string{"dmconvert": bin},
		Env:     map[string]string{loopEnv: os.Getenv(loopEnv)},
		Timeout: 30 * time.Minute,
	})
}

// guestStateDir mounts the shared state disk, formatting it the first
// time in this boot.
func guestStateDir(t testing.TB, dev string) string {
	t.Helper()
	if isMounted("/state") {
		return "/state"
	}
	typ, _ := shOK("blkid", "-o", "value", "-s", "TYPE", dev)
	return mountState(t, dev, strings.TrimSpace(typ) != "ext4")
}

const pwFile = "/tmp/dmconvert-pw"

var cheapKDFFlags = []string{"--pbkdf", "argon2id", "--pbkdf-memory", "32768", "--pbkdf-force-iterations", "4", "--pbkdf-parallel", "1"}

func writePW(t testing.TB) {
	if err := os.WriteFile(pwFile, guestPass, 0o600); err != nil {
		t.Fatal(err)
	}
}

func dmconvertBin(t testing.TB) string {
	if p := os.Getenv("DMCONVERT_BIN"); p != "" {
		return p
	}
	p := testvm.GuestFile("dmconvert")
	if p == "" {
		t.Fatal("the dmconvert binary was not passed into the guest")
	}
	return p
}

// cliRun runs dmconvert to completion and returns its exit code and
// combined output.
func cliRun(t testing.TB, args ...string) (int, string) {
	t.Helper()
	return cliRunEnv(t, nil, args...)
}

// cliRunEnv is cliRun with extra environment variables.
func cliRunEnv(t testing.TB, env []string, args ...string) (int, string) {
	t.Helper()
	return cliRunIn(t, env, nil, args...)
}

// cliRunIn is cliRunEnv with stdin as dmconvert's standard input.
func cliRunIn(t testing.TB, env []string, stdin []byte, args ...string) (int, string) {
	t.Helper()
	cmd := exec.Command(dmconvertBin(t), args...)
	if env != nil {
		cmd.Env = append(os.Environ(), env...)
	}
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	if err := cmd.Start(); err != nil {
		t.Fatalf("dmconvert %v: %v", args, err)
	}
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	var err error
	select {
	case err = <-waited:
	case <-time.After(10 * time.Minute):
		// Hung: say where before killing it.
		info, _ := shOK("dmsetup", "info", "-c", "-o", "name,attr,open,uuid")
		tasks := blockedTasks()
		cmd.Process.Kill()
		<-waited
		t.Fatalf("dmconvert %v did not finish in 10 minutes\n%s\n%s\nblocked tasks:\n%s", args, buf.String(), info, tasks)
	}
	out := buf.Bytes()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("dmconvert %v: %v", args, err)
		}
		code = ee.ExitCode()
	}
	return code, string(out)
}

// running is a dmconvert process whose --json progress is followed.
type running struct {
	cmd    *exec.Cmd
	lines  chan map[string]any
	stderr bytes.Buffer
	done   chan error
}

func cliStart(t testing.TB, args ...string) *running {
	t.Helper()
	r := &running{lines: make(chan map[string]any, 1024), done: make(chan error, 1)}
	r.cmd = exec.Command(dmconvertBin(t), args...)
	r.cmd.Stderr = &r.stderr
	out, err := r.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := r.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			var m map[string]any
			if json.Unmarshal(sc.Bytes(), &m) == nil {
				select {
				case r.lines <- m:
				default:
				}
			}
		}
		io.Copy(io.Discard, out)
		close(r.lines)
		r.done <- r.cmd.Wait()
	}()
	return r
}

// waitProgress waits until the run reports at least frac of its bytes
// done (or ends).
func (r *running) waitProgress(t testing.TB, frac float64) {
	t.Helper()
	timeout := time.After(5 * time.Minute)
	for {
		select {
		case m, ok := <-r.lines:
			if !ok {
				t.Fatalf("dmconvert ended before reaching %.0f%%: %s", frac*100, r.stderr.String())
			}
			done, _ := m["done_bytes"].(float64)
			total, _ := m["total_bytes"].(float64)
			if total > 0 && done/total >= frac {
				return
			}
		case <-timeout:
			info, _ := shOK("dmsetup", "info", "-c", "-o", "name,attr,open,uuid")
			table, _ := shOK("dmsetup", "table")
			t.Fatalf("no progress from dmconvert in 5 minutes\n%s\n%s\nblocked tasks:\n%s", info, table, blockedTasks())
		}
	}
}

func (r *running) wait() (int, string) {
	for range r.lines {
	}
	err := <-r.done
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			code = 128 + int(ws.Signal())
		}
	} else if err != nil {
		code = -1
	}
	return code, r.stderr.String()
}

// killedAt runs dmconvert with args and kills it (SIGKILL, no cleanup)
// once frac of the run is done.
func killedAt(t testing.TB, frac float64, what string, args ...string) {
	t.Helper()
	r := cliStart(t, args...)
	r.waitProgress(t, frac)
	r.cmd.Process.Kill()
	code, _ := r.wait()
	requireExit(t, what+" after kill -9", code, 128+int(syscall.SIGKILL), "")
}

func encryptArgs(st *stack, state string, extra ...string) []string {
	a := []string{"encrypt", st.Disk, "--batch-mode", "--json", "--key-file", pwFile, "--journal", st.file(state, "journal")}
	a = append(a, cheapKDFFlags...)
	return append(a, extra...)
}

// verifyEncryptedCold tears the live stack down and opens the disk the way
// a fresh boot does: stock cryptsetup, vgchange -ay, then every check.
func verifyEncryptedCold(t testing.TB, st *stack, state, name string) {
	t.Helper()
	for _, mp := range st.Mounts {
		shOK("umount", mp)
	}
	sh(t, "vgchange", "-an", st.VG)
	sh(t, "dmsetup", "remove", name)
	if typ, _ := shOK("blkid", "-p", "-o", "value", "-s", "TYPE", st.Disk); strings.TrimSpace(typ) != "crypto_LUKS" {
		t.Fatalf("blkid -p %s says %q, want crypto_LUKS", st.Disk, typ)
	}
	if out, err := shOK("vgchange", "-ay", st.VG); err == nil && strings.Contains(out, "logical volume(s)") && !strings.Contains(out, " 0 logical") {
		t.Fatalf("LVM activated %s from the raw encrypted disk: %s", st.VG, out)
	}
	sh(t, "cryptsetup", "open", "--key-file", pwFile, st.Disk, name)
	sh(t, "vgchange", "-ay", st.VG)
	verifyStack(t, st, state)
}

// requireLiveStatus: dmconvert status of the journal j, run while the
// process pid runs command on it, says so and how far it is, in JSON and
// in text.
func requireLiveStatus(t testing.TB, j string, pid int, command string) {
	t.Helper()
	out, err := shOK(dmconvertBin(t), "status", "--journal", j, "--json")
	if err != nil {
		t.Fatalf("status during the run: %v\n%s", err, out)
	}
	var res struct {
		Result struct {
			Runs []struct {
				Elsewhere bool `json:"in_progress_elsewhere"`
				Live      *struct {
					PID     int    `json:"pid"`
					Command string `json:"command"`
					Done    uint64 `json:"done_bytes"`
					Total   uint64 `json:"total_bytes"`
				} `json:"live"`
			} `json:"runs"`
		} `json:"result"`
	}
	var found bool
	for _, l := range strings.Split(out, "\n") {
		if json.Unmarshal([]byte(l), &res) == nil && len(res.Result.Runs) == 1 {
			found = true
			break
		}
	}
	if !found {
		t.Fatalf("status during the run shows no run:\n%s", out)
	}
	run := res.Result.Runs[0]
	if !run.Elsewhere || run.Live == nil || run.Live.PID != pid || run.Live.Command != command || run.Live.Done == 0 || run.Live.Done > run.Live.Total {
		t.Fatalf("status during the run (process %d, %s) does not show its position:\n%s", pid, command, out)
	}
	text, err := shOK(dmconvertBin(t), "status", "--journal", j)
	if err != nil || !strings.Contains(text, "position:") || !strings.Contains(text, "copied") || !strings.Contains(text, fmt.Sprintf("process %d", pid)) {
		t.Fatalf("status during the run: %v\n%s", err, text)
	}
	t.Logf("status during the run:\n%s", text)
}

// requireFoundWhileRunning stops the process pid, which runs a conversion
// of disk with its journal j outside the journal directory, and checks
// that status finds the run with and without the disk, that resume of
// the disk is refused as busy naming the journal, and that a new encrypt
// of the disk is refused as busy naming the process (before it plans:
// nothing it does waits on the run's devices, some of which may be
// suspended while the process is stopped). Then it lets it go on.
func requireFoundWhileRunning(t testing.TB, disk, j string, pid int) {
	t.Helper()
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	defer syscall.Kill(pid, syscall.SIGCONT)
	proc := fmt.Sprintf("process %d", pid)
	for _, args := range [][]string{{"status"}, {"status", disk}} {
		code, out := cliRun(t, args...)
		requireExit(t, strings.Join(args, " "), code, 0, out)
		if !strings.Contains(out, "journal:   "+j) || !strings.Contains(out, proc) {
			t.Fatalf("dmconvert %s while %s runs with its journal %s shows neither:\n%s", strings.Join(args, " "), proc, j, out)
		}
	}
	code, out := cliRun(t, "resume", disk, "--batch-mode", "--key-file", pwFile)
	requireExit(t, "resume of the running run's disk", code, 4, out)
	if !strings.Contains(out, "is running this conversion") || !strings.Contains(out, j) {
		t.Fatalf("resume of the running run's disk does not name its journal %s:\n%s", j, out)
	}
	code, out = cliRun(t, append([]string{"encrypt", disk, "--dry-run", "--batch-mode", "--key-file", pwFile}, cheapKDFFlags...)...)
	requireExit(t, "encrypt of the running run's disk", code, 4, out)
	if want := "dmconvert " + proc + " is working on it"; !strings.Contains(out, want) {
		t.Fatalf("encrypt of the running run's disk does not say %q:\n%s", want, out)
	}
}

func requireExit(t testing.TB, what string, code, want int, out string) {
	t.Helper()
	if code != want {
		t.Fatalf("%s: exit %d, want %d; output:\n%s", what, code, want, out)
	}
}

// TestGuestCLIInterruptResume: SIGINT mid-run stops at a safe point
// (exit 5), status says so, resume finishes; every acknowledged write is
// there, live and after a cold open.
func TestGuestCLIInterruptResume(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	st := buildStackTag(t, "int", d[0], state, 32768, true)
	w := startWriter(t, st, state)
	r := cliStart(t, encryptArgs(st, state)...)
	r.waitProgress(t, 0.3)
	// While it runs (it holds the journal), status shows the position
	// the running process publishes.
	requireLiveStatus(t, st.file(state, "journal"), r.cmd.Process.Pid, "encrypt")
	// Stopped (SIGSTOP), so that it surely still runs, the run is found
	// by the disk alone although its journal is not in the journal
	// directory, and a new plan of the disk is refused as busy.
	requireFoundWhileRunning(t, st.Disk, st.file(state, "journal"), r.cmd.Process.Pid)
	r.cmd.Process.Signal(syscall.SIGINT)
	code, errOut := r.wait()
	requireExit(t, "encrypt after SIGINT", code, 5, errOut)
	code, out := cliRun(t, "status", "--journal", st.file(state, "journal"), "--json")
	requireExit(t, "status", code, 0, out)
	if !strings.Contains(out, "interrupted") {
		t.Fatalf("status after SIGINT does not say interrupted:\n%s", out)
	}
	code, out = cliRun(t, "resume", "--journal", st.file(state, "journal"), "--key-file", pwFile, "--json")
	requireExit(t, "resume", code, 0, out)
	acks, gap := w.finish(t)
	t.Logf("writer: %d acknowledged writes, longest write+fsync %v", acks, gap)
	verifyStack(t, st, state)
	verifyEncryptedCold(t, st, state, filepath.Base(st.Disk)+"_crypt")
}

// TestGuestCLIKillResume: kill -9 mid-run (the process dies wherever it
// is: a device may stay suspended, the writer blocked), then resume.
func TestGuestCLIKillResume(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	st := buildLightTagged(t, "kill", d[1], state)
	w := startWriter(t, st, state)
	r := cliStart(t, encryptArgs(st, state)...)
	r.waitProgress(t, 0.45)
	r.cmd.Process.Kill()
	code, _ := r.wait()
	requireExit(t, "encrypt after kill -9", code, 128+int(syscall.SIGKILL), "")
	code, out := cliRun(t, "resume", "--journal", st.file(state, "journal"), "--key-file", pwFile)
	requireExit(t, "resume after kill -9", code, 0, out)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	verifyStack(t, st, state)
	verifyEncryptedCold(t, st, state, filepath.Base(st.Disk)+"_crypt")
}

// TestGuestCLIKillInSuspend: kill -9 exactly while a suspend of the
// mapping with its mirror waits for the writer's in-flight I/O. A process
// killed in that wait leaves dm-raid1 unable to suspend again (its
// region-recovery slots stay taken; dmtable's suspendhelper_linux.go):
// the resume's first table swap would block for ever. dmconvert's
// suspends run in a helper process the kill does not reach, which
// finishes the suspend; the resume then resumes the mapping and ends the
// run, with every acknowledged write there. The PV is on a dm-delay
// device whose writes are held 400 ms from a tenth of the run on, so
// that the wait lasts long enough to kill dmconvert inside it.
func TestGuestCLIKillInSuspend(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	// The delay device starts 1 MiB into the disk, so that LVM does not
	// find the PV's label on the disk as well (a duplicate PV).
	slow, sectors := "kis-slow", diskSectors(t, d[8])-2048
	setDelay := func(ms int) {
		table := fmt.Sprintf("0 %d delay %s 2048 0 %s 2048 %d", sectors, d[8], d[8], ms)
		if _, err := shOK("dmsetup", "info", slow); err != nil {
			sh(t, "dmsetup", "create", slow, "--table", table)
			return
		}
		sh(t, "dmsetup", "reload", slow, "--table", table)
		sh(t, "dmsetup", "resume", slow)
	}
	setDelay(0)
	st := buildLightTagged(t, "kis", "/dev/mapper/"+slow, state)
	name := slow + "_crypt"
	w := startWriter(t, st, state) // with writes held 400 ms, nearly always one in flight
	r := cliStart(t, encryptArgs(st, state, "--chunk-size", "4M")...)
	r.waitProgress(t, 0.1)
	helper := 0
	for _, p := range childPids(r.cmd.Process.Pid) {
		if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", p)); strings.TrimSpace(string(comm)) == "dmtable-suspend" {
			helper = p
		}
	}
	if helper == 0 {
		r.cmd.Process.Kill()
		r.wait()
		t.Fatalf("dmconvert (pid %d) runs no suspend helper", r.cmd.Process.Pid)
	}
	setDelay(400)
	stackFile := fmt.Sprintf("/proc/%d/stack", helper)
	var stack []byte
	for deadline := time.Now().Add(3 * time.Minute); stack == nil && time.Now().Before(deadline); {
		b, err := os.ReadFile(stackFile)
		if err != nil {
			break // the run ended
		}
		if strings.Contains(string(b), "dm_wait_for_completion") {
			r.cmd.Process.Kill()
			stack = b
		}
	}
	if stack == nil {
		r.cmd.Process.Kill()
		r.wait()
		t.Fatalf("never caught the suspend helper waiting for in-flight I/O in a suspend before the run ended")
	}
	code, _ := r.wait()
	requireExit(t, "encrypt killed in a suspend", code, 128+int(syscall.SIGKILL), "")
	setDelay(0)
	// The helper finishes the suspend and goes.
	for end := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", helper)); err != nil {
			break
		}
		if time.Now().After(end) {
			b, _ := os.ReadFile(stackFile)
			t.Fatalf("the suspend helper %d is still there 30 s after its dmconvert was killed:\n%s", helper, b)
		}
	}
	if out, _ := shOK("dmsetup", "info", name); !strings.Contains(out, "SUSPENDED") {
		info, _ := shOK("dmsetup", "info")
		t.Fatalf("%s is not suspended after dmconvert was killed in its suspend and the helper finished it:\n%s", name, info)
	}
	t.Logf("killed while the helper was in\n%s\n%s stayed suspended", stack, name)
	code, out := cliRun(t, "resume", "--journal", st.file(state, "journal"), "--key-file", pwFile)
	requireExit(t, "resume after a kill in a suspend", code, 0, out)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	verifyStack(t, st, state)
	verifyEncryptedCold(t, st, state, name)
}

// TestGuestCLIRandomKills: kill -9 at random moments, not at progress
// events: an encrypt under a writer is killed after a random time from its
// start (50 ms to 6 s: the start-up, the copy, the end), then resumed
// and killed again the same way, six times in all (killRandomly). Then a
// resume without a kill ends it, and every acknowledged write is there,
// live and cold. DMCONVERT_KILL_SEED replays a sequence of delays.
func TestGuestCLIRandomKills(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	rng := killRand(t)
	st := buildLightTagged(t, "rk", d[9], state)
	w := startWriter(t, st, state)
	j := st.file(state, "journal")
	killRandomly(t, rng, encryptArgs(st, state, "--chunk-size", "8M"), resumeArgs(j), j, 6, 6*time.Second)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	verifyStack(t, st, state)
	verifyEncryptedCold(t, st, state, filepath.Base(st.Disk)+"_crypt")
}

// killRand is the random source of the random kills, seeded by
// DMCONVERT_KILL_SEED or the clock (logged, to replay).
func killRand(t testing.TB) *rand.Rand {
	seed := time.Now().UnixNano()
	if v, err := strconv.ParseInt(os.Getenv("DMCONVERT_KILL_SEED"), 10, 64); err == nil {
		seed = v
	}
	t.Logf("DMCONVERT_KILL_SEED=%d", seed)
	return rand.New(rand.NewSource(seed))
}

// killRandomly runs dmconvert with args (a command that starts a run
// recorded in journal j) and kills it (-9) after a random time from its
// start, between 50 ms and maxDelay, then runs next (a resume, or the
// abort again: an abort killed before it recorded its decision left a
// forward run, which a resume would finish) and kills it the same way,
// kills times in all (fewer when a kill lands after the journal recorded
// the run's end), and finally runs next to the end. A run killed
// before its journal recorded it is started again without counting;
// after two such kills, the next is killed within 3 s of its first
// progress event.
func killRandomly(t testing.TB, rng *rand.Rand, args, next []string, j string, kills int, maxDelay time.Duration) {
	t.Helper()
	var log []string
	early := 0
	for n := 0; n < kills; {
		delay := 50*time.Millisecond + time.Duration(rng.Int63n(int64(maxDelay-50*time.Millisecond)))
		r := cliStart(t, args...)
		from := "its start"
		if n == 0 && early >= 2 {
			r.waitProgress(t, 0)
			delay, from = time.Duration(rng.Int63n(int64(3*time.Second))), "its first progress event"
		}
		exited := make(chan struct{})
		go func() {
			select {
			case <-time.After(delay):
				r.cmd.Process.Kill()
			case <-exited:
			}
		}()
		code, errOut := r.wait()
		close(exited)
		what := fmt.Sprintf("%s killed %v after %s", args[0], delay, from)
		if code == 0 {
			log = append(log, fmt.Sprintf("%s ended before its kill %v after %s", args[0], delay, from))
			break
		}
		requireExit(t, what, code, 128+int(syscall.SIGKILL), errOut)
		_, out := cliRun(t, "status", "--journal", j, "--json")
		switch {
		case !strings.Contains(out, `"runs":[`):
			// Killed before the journal recorded the run: nothing was
			// written (the caller's checks see it); start again.
			log = append(log, what+", before the run was recorded")
			early++
			continue
		case runEnded(out):
			// Killed after the journal recorded the end: there is
			// nothing left to resume (a resume would refuse).
			log = append(log, what+", after the run ended")
			n = kills
			continue
		default:
			log = append(log, what)
		}
		n++
		args = next
	}
	t.Logf("kills:\n%s", strings.Join(log, "\n"))
	if _, out := cliRun(t, "status", "--journal", j, "--json"); !runEnded(out) {
		code, out := cliRun(t, args...)
		requireExit(t, "the last "+args[0], code, 0, out)
	}
}

// resumeArgs resumes the run of journal j.
func resumeArgs(j string) []string { return []string{"resume", "--journal", j, "--key-file", pwFile} }

// runEnded reports whether status --json says the run is over (done, or
// aborted to the end).
func runEnded(statusJSON string) bool {
	return strings.Contains(statusJSON, `"status":"done"`) || strings.Contains(statusJSON, `"status":"aborted"`)
}

// TestGuestCLIAbortRandomKills: an encrypt stopped past half way (SIGINT)
// is aborted, and the abort is killed -9 at random moments from each
// process's start, four times (killRandomly; resume continues an abort);
// then the LVs are on the raw disk with every write, live and cold.
func TestGuestCLIAbortRandomKills(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	rng := killRand(t)
	st := buildLightTagged(t, "rka", d[10], state)
	j := st.file(state, "journal")
	w := startWriter(t, st, state)
	r := cliStart(t, encryptArgs(st, state, "--chunk-size", "8M")...)
	r.waitProgress(t, 0.6)
	r.cmd.Process.Signal(syscall.SIGINT)
	code, errOut := r.wait()
	requireExit(t, "encrypt after SIGINT", code, 5, errOut)
	abort := []string{"abort", "--journal", j, "--key-file", pwFile, "--json"}
	killRandomly(t, rng, abort, abort, j, 4, 4*time.Second)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	if _, out := cliRun(t, "status", "--journal", j, "--json"); !strings.Contains(out, `"status":"aborted"`) {
		t.Fatalf("the run is not aborted:\n%s", out)
	}
	verifyAborted(t, st, state)
}

// verifyAborted checks an aborted encrypt: no crypt mapping, every LV on
// the raw disk with every file and write, and after everything is closed
// LVM finds the VG on the raw disk again.
func verifyAborted(t testing.TB, st *stack, state string) {
	t.Helper()
	name := filepath.Base(st.Disk) + "_crypt"
	if out, err := shOK("dmsetup", "info", name); err == nil {
		t.Fatalf("%s still exists after abort:\n%s", name, out)
	}
	for _, lv := range append(append([]string{}, st.FSLVs...), "raw") {
		deps := sh(t, "dmsetup", "deps", "-o", "devname", st.VG+"-"+lv)
		if !strings.Contains(deps, "("+filepath.Base(st.Disk)+")") {
			t.Fatalf("%s-%s does not map the raw disk after abort: %s", st.VG, lv, deps)
		}
	}
	verifyStack(t, st, state)
	// Cold: LVM finds the VG on the raw disk again.
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	sh(t, "vgchange", "-an", st.VG)
	if typ, _ := shOK("blkid", "-p", "-o", "value", "-s", "TYPE", st.Disk); strings.TrimSpace(typ) != "LVM2_member" {
		t.Fatalf("blkid -p %s says %q after abort, want LVM2_member", st.Disk, typ)
	}
	sh(t, "vgchange", "-ay", st.VG)
	verifyStack(t, st, state)
}

// childPids lists the processes whose parent is pid.
func childPids(pid int) []int {
	stats, _ := filepath.Glob("/proc/[0-9]*/stat")
	var out []int
	for _, p := range stats {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		// pid (comm) state ppid ...: comm may hold spaces, so read after
		// its closing parenthesis.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		var self, ppid int
		var state string
		if _, err := fmt.Sscanf(s, "%d", &self); err != nil || i < 0 {
			continue
		}
		if _, err := fmt.Sscanf(s[i+1:], " %s %d", &state, &ppid); err == nil && ppid == pid {
			out = append(out, self)
		}
	}
	return out
}

// TestGuestCLIAbort: SIGHUP mid-run, then abort walks back online to the
// plaintext layout: the LVs on the raw disk, the disk an LVM PV again.
func TestGuestCLIAbort(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	st := buildLightTagged(t, "abort", d[2], state)
	w := startWriter(t, st, state)
	r := cliStart(t, encryptArgs(st, state)...)
	r.waitProgress(t, 0.5)
	// A hang-up (the ssh session went away) stops it at a safe point,
	// as SIGINT and SIGTERM do.
	r.cmd.Process.Signal(syscall.SIGHUP)
	code, errOut := r.wait()
	requireExit(t, "encrypt after SIGHUP", code, 5, errOut)
	code, out := cliRun(t, "abort", "--journal", st.file(state, "journal"), "--key-file", pwFile, "--json")
	requireExit(t, "abort", code, 0, out)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	verifyAborted(t, st, state)
}

// --- refusals ----------------------------------------------------------

// diskBytes reads the whole disk (O_DIRECT, past any cache). Hashing it
// instead costs tens of seconds under emulation; comparing two copies in
// memory does not.
func diskBytes(t testing.TB, dev string) []byte {
	t.Helper()
	sh(t, "sync")
	f, err := os.OpenFile(dev, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size := blockDevBytes(t, dev)
	out := make([]byte, 0, size)
	// O_DIRECT wants an aligned buffer: carve one out of a larger slice.
	raw := make([]byte, 1<<20+4096)
	off := 4096 - int(uintptrOfSlice(raw)%4096)
	buf := raw[off : off+1<<20]
	for pos := uint64(0); pos < size; {
		n, err := f.ReadAt(buf[:min(uint64(len(buf)), size-pos)], int64(pos))
		if n <= 0 {
			t.Fatalf("reading %s at %d: %v", dev, pos, err)
		}
		out = append(out, buf[:n]...)
		pos += uint64(n)
	}
	return out
}

// refused runs dmconvert and checks: the exit code, that the message
// names the device and says why, and that the disk is byte for byte what
// it was.
func refused(t *testing.T, dev string, want int, reason string, args ...string) {
	t.Helper()
	refusedNaming(t, dev, dev, want, reason, args...)
}

// refusedNaming is refused for a message that names named (a mapping)
// while dev (the disk under it) must stay unchanged.
func refusedNaming(t *testing.T, dev, named string, want int, reason string, args ...string) {
	t.Helper()
	before := diskBytes(t, dev)
	code, out := cliRun(t, args...)
	if code != want {
		t.Fatalf("dmconvert %s: exit %d, want %d:\n%s", strings.Join(args, " "), code, want, out)
	}
	if !strings.Contains(out, named) || !strings.Contains(out, reason) {
		t.Fatalf("dmconvert %s: the message does not name %s and say %q:\n%s", strings.Join(args, " "), named, reason, out)
	}
	if after := diskBytes(t, dev); !bytes.Equal(after, before) {
		t.Fatalf("dmconvert %s changed %s although it refused (first difference at byte %d)", strings.Join(args, " "), dev, firstDiff(after, before))
	}
	t.Logf("refused as expected (exit %d): %s", code, strings.TrimSpace(out))
}

func wipe(t testing.TB, dev string) {
	t.Helper()
	for _, vg := range []string{"vgr", "vgr2"} {
		shOK("vgchange", "-an", vg)
		shOK("vgremove", "-ff", "-y", vg)
	}
	shOK("pvremove", "-ff", "-y", dev)
	sh(t, "wipefs", "-a", "-q", dev)
	sh(t, "dd", "if=/dev/zero", "of="+dev, "bs=1M", "count=4", "oflag=direct", "status=none")
}

// lightStack is a small VG on dev: an ext4 LV (not mounted unless asked)
// and a raw LV.
func lightStack(t testing.TB, dev string, shrink bool, mount bool) {
	t.Helper()
	size := diskSectors(t, dev)
	if shrink {
		sh(t, "pvcreate", "-y", "--setphysicalvolumesize", fmt.Sprintf("%ds", size-2*32768), dev)
	} else {
		sh(t, "pvcreate", "-y", dev)
	}
	sh(t, "vgcreate", "-y", "vgr", dev)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "ext", "-L", "32m", "vgr")
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-l", "100%FREE", "vgr")
	sh(t, "vgchange", "-ay", "vgr")
	sh(t, "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", "/dev/mapper/vgr-ext")
	if mount {
		os.MkdirAll("/mnt/r-ext", 0o755)
		sh(t, "mount", "-o", "noatime", "/dev/mapper/vgr-ext", "/mnt/r-ext")
	}
}

// TestGuestCLIRefusals: every bad input is refused before anything is
// written, with a message naming the device and the reason.
func TestGuestCLIRefusals(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	dev, small := d[4], d[5]
	state := guestStateDir(t, d[3])
	writePW(t)
	j := filepath.Join(state, "refusal.journal")
	enc := func(extra ...string) []string {
		a := []string{"encrypt", dev, "--batch-mode", "--key-file", pwFile, "--journal", j}
		return append(append(a, cheapKDFFlags...), extra...)
	}

	t.Run("not-a-pv", func(t *testing.T) {
		wipe(t, dev)
		refused(t, dev, 2, "not an LVM physical volume", enc()...)
	})
	t.Run("pv-in-no-vg", func(t *testing.T) {
		wipe(t, dev)
		sh(t, "pvcreate", "-y", dev)
		refused(t, dev, 2, "no volume group", enc()...)
	})
	t.Run("fs-directly-on-disk", func(t *testing.T) {
		wipe(t, dev)
		sh(t, "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
		os.MkdirAll("/mnt/direct", 0o755)
		sh(t, "mount", "-o", "noatime", dev, "/mnt/direct")
		defer sh(t, "umount", "/mnt/direct")
		refused(t, dev, 2, "offline", enc()...)
	})
	t.Run("no-tail-space", func(t *testing.T) {
		wipe(t, dev)
		lightStack(t, dev, false, false) // the raw LV fills the PV to its end
		refused(t, dev, 2, "short", enc()...)
		refused(t, dev, 2, "cannot shrink", enc("--shrink-pv")...)
	})
	t.Run("unrestackable-mapping", func(t *testing.T) {
		wipe(t, dev)
		lightStack(t, dev, true, false)
		key := strings.Repeat("ab", 64)
		sh(t, "dmsetup", "create", "odd", "--table", "0 2048 crypt aes-xts-plain64 "+key+" 0 "+dev+" 4096")
		defer sh(t, "dmsetup", "remove", "odd")
		refused(t, dev, 2, "odd", enc()...)
	})
	t.Run("journal-on-the-stack", func(t *testing.T) {
		wipe(t, dev)
		lightStack(t, dev, true, true)
		defer sh(t, "umount", "/mnt/r-ext")
		a := []string{"encrypt", dev, "--batch-mode", "--key-file", pwFile, "--journal", "/mnt/r-ext/j.journal"}
		refused(t, dev, 2, "journal", append(a, cheapKDFFlags...)...)
	})
	t.Run("journal-on-tmpfs", func(t *testing.T) {
		// A journal on tmpfs is lost by the power cut it is there for:
		// the plan warns (and --json says where it is), one on a
		// disk's file system gets no warning.
		wipe(t, dev)
		lightStack(t, dev, true, false)
		tj := "/tmp/refusal-tmpfs.journal"
		dry := func(jp string, extra ...string) string {
			a := append([]string{"encrypt", dev, "--dry-run", "--key-file", pwFile, "--journal", jp}, cheapKDFFlags...)
			code, out := cliRun(t, append(a, extra...)...)
			requireExit(t, "dry run with --journal "+jp, code, 0, out)
			return out
		}
		if out := dry(tj); !strings.Contains(out, "WARNING:       the journal is on tmpfs") {
			t.Errorf("a dry run with its journal on /tmp (tmpfs) does not warn:\n%s", out)
		}
		if out := dry(tj, "--json"); !strings.Contains(out, `"journal_fs":"tmpfs"`) {
			t.Errorf("--json does not say the journal is on tmpfs:\n%s", out)
		}
		if out := dry(j); strings.Contains(out, "WARNING") || strings.Contains(out, "tmpfs") {
			t.Errorf("a dry run with its journal on %s (ext4) warns:\n%s", j, out)
		}
		if _, err := os.Stat(tj); !os.IsNotExist(err) {
			t.Errorf("the dry run created %s: %v", tj, err)
		}
	})
	t.Run("journal-is-a-device", func(t *testing.T) {
		// The journal's database library, given an existing empty
		// file, writes its first pages there; a block device reads as
		// empty. Before the check, the other disk lost its first 16
		// KiB, and --journal naming the disk itself its PV label.
		wipe(t, dev)
		lightStack(t, dev, true, false)
		sh(t, "mkfs.ext4", "-q", "-F", small)
		otherBefore := diskBytes(t, small)
		for _, jp := range []string{small, dev} {
			a := []string{"encrypt", dev, "--batch-mode", "--key-file", pwFile, "--journal", jp}
			refused(t, dev, 2, "is not a regular file (a block device)", append(a, cheapKDFFlags...)...)
			refused(t, dev, 2, "is not a regular file (a block device)", append(a, append(cheapKDFFlags, "--dry-run")...)...)
		}
		mustEqual(t, small, otherBefore, diskBytes(t, small))
		wipe(t, small)
	})
	t.Run("lvm-filter", func(t *testing.T) {
		// lvm.conf's filter accepts the disk and nothing else: after an
		// encrypt LVM would not see the VG on the mapping. Refused, dry
		// run or not (before 2026-11-25 the whole run went through and
		// failed in LVM's refresh at its end, exit 1). Then, encrypted,
		// a filter that accepts only mappings: a decrypt would leave the
		// VG on the raw disk LVM does not see.
		wipe(t, dev)
		lightStack(t, dev, true, false)
		const conf = "/etc/lvm/lvm.conf"
		orig, err := os.ReadFile(conf)
		if err != nil {
			t.Fatal(err)
		}
		defer os.WriteFile(conf, orig, 0o644)
		setFilter := func(f string) {
			re := regexp.MustCompile(`(?m)^\s*filter = .*$`)
			if !re.Match(orig) {
				t.Fatalf("no filter line in %s", conf)
			}
			if err := os.WriteFile(conf, re.ReplaceAll(orig, []byte("\tfilter = "+f)), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		setFilter(`[ "a|^` + dev + `$|", "r|.*|" ]`)
		name := filepath.Base(dev) + "_crypt"
		want := `rejects /dev/mapper/` + name + ` (pattern "r|.*|"); let LVM accept it`
		refused(t, dev, 2, want, enc("--shrink-pv", "--dry-run")...)
		refused(t, dev, 2, want, enc("--shrink-pv")...)
		os.WriteFile(conf, orig, 0o644)
		code, out := cliRun(t, enc("--shrink-pv")...)
		requireExit(t, "encrypt with the filter restored", code, 0, out)
		setFilter(`[ "a|^/dev/mapper/|", "r|.*|" ]`)
		refusedNaming(t, dev, dev, 2, `lvm.conf's devices/filter rejects `+dev+` (pattern "r|.*|")`,
			"decrypt", "/dev/mapper/"+name, "--batch-mode", "--dry-run", "--key-file", pwFile, "--journal", filepath.Join(state, "refusal-decrypt.journal"))
		os.WriteFile(conf, orig, 0o644)
		sh(t, "vgchange", "-an", "vgr")
		sh(t, "dmsetup", "remove", name)
	})
	t.Run("sector-size", func(t *testing.T) {
		wipe(t, dev)
		lightStack(t, dev, true, false)
		refused(t, dev, 2, "logical block size", enc("--sector-size", "4096")...)
	})
	t.Run("pvmove-in-progress", func(t *testing.T) {
		// A pvmove moving an LV off the disk (onto a PV whose writes
		// dm-delay holds, so that it is still running): busy, exit 4,
		// naming the pvmove; dmconvert writes nothing. LVM names the
		// pvmove's mirror <VG>-pvmove0 and maps the disk itself with it.
		wipe(t, dev)
		lightStack(t, dev, true, false)
		// Every write to the target waits 5 s (dm-delay; reads do not):
		// the mirror copies one region at a time, so moving the 32 MiB
		// LV takes minutes, not the ~13 s it took at 200 ms, which a
		// loaded host could spend before dmconvert looked (a full run
		// saw the pvmove end first and the disk encrypted). The cleanup
		// swaps the delay for a linear map first, so the abort is quick.
		slow := "/dev/mapper/slowr"
		slowLen := diskSectors(t, small) - 2048
		sh(t, "dmsetup", "create", "slowr", "--table", fmt.Sprintf("0 %d delay %s 2048 0 %s 2048 5000", slowLen, small, small))
		sh(t, "pvcreate", "-y", slow)
		sh(t, "vgextend", "-y", "vgr", slow)
		var mvOut bytes.Buffer
		mv := exec.Command("pvmove", "-i", "1", "-n", "ext", dev, slow)
		mv.Stdout, mv.Stderr = &mvOut, &mvOut
		if err := mv.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() {
			// Best effort, with waits: the abort's end (the pvmove's
			// device going away, its last metadata update) can lag
			// behind the pvmove process on a loaded host. small is
			// used after this only as a disk of another size.
			// Suspending the delay target sends its held writes on at
			// once (dm-delay's presuspend), so this is quick.
			shOK("dmsetup", "reload", "slowr", "--table", fmt.Sprintf("0 %d linear %s 2048", slowLen, small))
			shOK("dmsetup", "resume", "slowr")
			shOK("pvmove", "--abort")
			mv.Wait()
			for i := 0; i < 100; i++ {
				if _, err := shOK("dmsetup", "info", "vgr-pvmove0"); err != nil {
					break
				}
				time.Sleep(200 * time.Millisecond)
			}
			shOK("vgreduce", "vgr", slow)
			shOK("pvremove", "-ff", "-y", slow)
			for i := 0; i < 50; i++ {
				if _, err := shOK("dmsetup", "remove", "slowr"); err == nil {
					break
				}
				time.Sleep(200 * time.Millisecond)
			}
			if out, err := shOK("wipefs", "-a", "-q", small); err != nil {
				tree, _ := shOK("dmsetup", "ls", "--tree")
				t.Logf("cleanup: wipefs %s: %v %s\n%s", small, err, out, tree)
			}
		}()
		for i := 0; ; i++ {
			if _, err := shOK("dmsetup", "info", "vgr-pvmove0"); err == nil {
				break
			}
			if i == 200 {
				t.Fatalf("no vgr-pvmove0 after 20 s; pvmove said:\n%s", mvOut.String())
			}
			time.Sleep(100 * time.Millisecond)
		}
		// The pvmove itself rewrites LVM's metadata area (from 4 KiB to
		// the data area at 1 MiB) as it goes: compare the rest.
		before := diskBytes(t, dev)
		code, out := cliRun(t, enc()...)
		after := diskBytes(t, dev)
		want := "a pvmove is moving extents of it (device-mapper device vgr-pvmove0)"
		if code != 4 || !strings.Contains(out, dev) || !strings.Contains(out, want) {
			t.Fatalf("encrypt during a pvmove: exit %d, want 4 and %q:\n%s", code, want, out)
		}
		mustEqual(t, dev+"'s label", before[:4096], after[:4096])
		mustEqual(t, dev+"'s data area", before[1<<20:], after[1<<20:])
		t.Logf("refused as expected (exit %d): %s", code, strings.TrimSpace(out))
	})
	t.Run("wrong-passphrase-and-foreign-journal", func(t *testing.T) {
		wipe(t, dev)
		lightStack(t, dev, true, false)
		os.Remove(j)
		r := cliStart(t, enc("--json", "--chunk-size", "1M")...)
		r.waitProgress(t, 0.3)
		r.cmd.Process.Signal(syscall.SIGINT)
		code, errOut := r.wait()
		requireExit(t, "encrypt after SIGINT", code, 5, errOut)
		os.WriteFile("/tmp/wrong-pw", []byte("not the passphrase"), 0o600)
		refused(t, dev, 3, "passphrase", "resume", "--journal", j, "--key-file", "/tmp/wrong-pw")
		// The journal belongs to dev, not to the small disk.
		refused(t, small, 2, "journal", "resume", "--journal", j, "--device", small, "--key-file", pwFile)
		// Stopped, its devices in place: a new encrypt of the disk
		// with another journal is refused as that run's.
		code, out := cliRun(t, enc("--journal", filepath.Join(state, "other.journal"))...)
		if code != 2 || !strings.Contains(out, dev+": a dmconvert run's devices use it: dmconvert-") {
			t.Fatalf("new encrypt of a stopped run's disk: exit %d (want 2, the run's devices named): %q", code, out)
		}
		// A second dmconvert while one works on the disk: start the
		// resume, then try another one and a new encrypt.
		r2 := cliStart(t, "resume", "--journal", j, "--key-file", pwFile, "--json")
		r2.waitProgress(t, 0.4)
		requireLiveStatus(t, j, r2.cmd.Process.Pid, "resume")
		code, out = cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
		if code != 4 || !strings.Contains(out, "another dmconvert") {
			t.Fatalf("second resume while one runs: exit %d:\n%s", code, out)
		}
		code, out = cliRun(t, enc("--journal", filepath.Join(state, "second.journal"))...)
		if code != 2 && code != 4 {
			t.Fatalf("second encrypt while one runs: exit %d:\n%s", code, out)
		}
		if !strings.Contains(out, dev) && !strings.Contains(out, "vde_crypt") {
			t.Fatalf("second encrypt refusal does not name the device:\n%s", out)
		}
		code, errOut = r2.wait()
		requireExit(t, "the resume that was running", code, 0, errOut)
		// (The second encrypt's lvm scan opened the run's helper and
		// waited for the VG lock the run held: the run's removal of the
		// helper found it open. The kernel removes it once lvm closes it.)
		requireNoHelpers(t)
	})
	t.Run("after-a-reboot-mid-run", func(t *testing.T) {
		// An encrypt killed, its devices gone as by a reboot: the disk
		// shows the run's LUKS header, whose checkpoint names the
		// journal. A new encrypt is refused as that run's (before: "not
		// an LVM physical volume"); the run then resumes.
		shOK("vgchange", "-an", "vgr")
		shOK("dmsetup", "remove", filepath.Base(dev)+"_crypt")
		wipe(t, dev)
		lightStack(t, dev, true, false)
		rj := filepath.Join(state, "reboot.journal")
		r := cliStart(t, append([]string{"encrypt", dev, "--batch-mode", "--key-file", pwFile, "--journal", rj, "--json", "--chunk-size", "1M"}, cheapKDFFlags...)...)
		r.waitProgress(t, 0.4)
		r.cmd.Process.Kill()
		r.wait()
		for _, prefix := range []string{"vgr-", filepath.Base(dev) + "_crypt", "dmconvert-"} {
			for _, l := range strings.Split(sh(t, "dmsetup", "ls"), "\n") {
				if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], prefix) {
					sh(t, "dmsetup", "remove", f[0])
				}
			}
		}
		refused(t, dev, 2, "journal "+rj+") is in progress on it", enc("--journal", filepath.Join(state, "other.journal"))...)
		code, out := cliRun(t, "resume", "--journal", rj, "--key-file", pwFile)
		requireExit(t, "resume after the reboot", code, 0, out)
		requireNoHelpers(t)
	})
}

// requireNoHelpers: no dmconvert helper device is left (within 10 s: a
// helper held open at the end of a run is removed when it is closed).
func requireNoHelpers(t testing.TB) {
	t.Helper()
	var out string
	for i := 0; i < 100; i++ {
		out = sh(t, "dmsetup", "ls")
		if !strings.Contains(out, "dmconvert-") {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("dmconvert helpers left after the run:\n%s", out)
}

// TestGuestCLIHelperHeldOpen: a process holds the run's helper open at
// the end of the run, longer than Remove's retries (as an lvm command
// does that scanned it and waits for the VG lock the run holds): the run
// still ends (exit 0), and the kernel removes the helper once that
// process closes it.
func TestGuestCLIHelperHeldOpen(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	st := buildLightSized(t, "hho", d[11], state, "40m", "8m")
	w := startWriter(t, st, state)
	r := cliStart(t, encryptArgs(st, state)...)
	r.waitProgress(t, 0.3)
	var helper string
	for _, l := range strings.Split(sh(t, "dmsetup", "ls"), "\n") {
		if f := strings.Fields(l); len(f) > 0 && strings.HasPrefix(f[0], "dmconvert-") && strings.HasSuffix(f[0], "-new") {
			helper = f[0]
		}
	}
	if helper == "" {
		t.Fatalf("no helper device during the run:\n%s", sh(t, "dmsetup", "ls"))
	}
	holder := exec.Command("sh", "-c", "exec 3</dev/mapper/"+helper+"; sleep 8")
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	code, errOut := r.wait()
	requireExit(t, "encrypt with its helper held open", code, 0, errOut)
	if _, err := shOK("dmsetup", "info", helper); err != nil {
		t.Logf("the helper was gone at the end of the run (released early): %v", err)
	} else {
		t.Logf("the helper outlived the run while held open")
	}
	holder.Wait()
	requireNoHelpers(t)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	verifyStack(t, st, state)
	verifyEncryptedCold(t, st, state, filepath.Base(st.Disk)+"_crypt")
}

// TestGuestCLIMonitorLoop: lvs, pvs and blkid run in a loop all along
// (as a monitoring agent runs them) while a PV with live LVs is
// encrypted (kill -9, resume), rekeyed (SIGTERM, resume) and decrypted
// (SIGINT, resume); each ends, every write is there live and after a cold
// open, and no helper is left. (Before 2026-11-24 the rekey's resume
// failed at its end: an lvs waiting for the VG lock held the run's helper
// open, and its removal failed with EBUSY.)
func TestGuestCLIMonitorLoop(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	st := buildLightSized(t, "mon", d[12], state, "48m", "8m")
	// The loop runs while dmconvert runs, a second between rounds (as an
	// agent polls; each round costs a second or more of the emulated CPU,
	// and TestGuestCLIHelperHeldOpen holds a helper open deterministically
	// across a run's end); it stops before the test's own
	// cold checks (their dmsetup remove and vgchange -an would find what
	// it has open busy).
	monitor := func() (stop func()) {
		mon := exec.Command("sh", "-c", "while true; do lvs >/dev/null 2>&1; pvs >/dev/null 2>&1; blkid >/dev/null 2>&1; sleep 1; done")
		if err := mon.Start(); err != nil {
			t.Fatal(err)
		}
		return func() {
			mon.Process.Kill()
			mon.Wait()
			time.Sleep(2 * time.Second) // its last lvs or blkid ends
		}
	}
	name := filepath.Base(st.Disk) + "_crypt"
	j := st.file(state, "journal")

	stop := monitor()
	w := startWriter(t, st, state)
	killedAt(t, 0.4, "encrypt", encryptArgs(st, state)...)
	code, out := cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
	requireExit(t, "resume of the encrypt", code, 0, out)
	requireNoHelpers(t)
	stop()
	acks, _ := w.finish(t)
	t.Logf("encrypt: %d acknowledged writes", acks)
	verifyEncryptedCold(t, st, state, name)
	os.Remove(j)

	remount(t, st)
	stop = monitor()
	w = startWriter(t, st, state)
	rekeyStopped(t, name, j, 0.4, "4M")
	code, out = cliRun(t, "resume", "--journal", j, "--key-file", pwFile)
	requireExit(t, "resume of the rekey", code, 0, out)
	requireNoHelpers(t)
	stop()
	acks, _ = w.finish(t)
	t.Logf("rekey: %d acknowledged writes", acks)
	verifyEncryptedCold(t, st, state, name)
	os.Remove(j)

	remount(t, st)
	stop = monitor()
	out = decryptInterrupted(t, st, state, name)
	requireNoHelpers(t)
	stop()
	verifyPlainCold(t, st, state, name)
	growPVAsTold(t, st, out)
}

// luksStack makes what a distribution installer makes: cryptsetup
// luksFormat, open, an LVM PV on the mapping (filling it, as installers
// do), LVs, a mounted ext4.
func luksStack(t testing.TB, tag, disk, state string) (*stack, string) {
	t.Helper()
	return luksStackSized(t, tag, disk, state, "56m", "8m")
}

func luksStackSized(t testing.TB, tag, disk, state, extSize, rawSize string) (*stack, string) {
	t.Helper()
	return luksStackFormat(t, tag, disk, state, extSize, rawSize, "--type", "luks2", "--sector-size", "512")
}

// luksStackFormat is luksStackSized with luksFormat's type and options
// (format), e.g. --type luks1 --key-size 256.
func luksStackFormat(t testing.TB, tag, disk, state, extSize, rawSize string, format ...string) (*stack, string) {
	t.Helper()
	name := filepath.Base(disk) + "_crypt"
	args := append([]string{"luksFormat", "-q"}, format...)
	sh(t, "cryptsetup", append(args, "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--key-file", pwFile, disk)...)
	sh(t, "cryptsetup", "open", "--key-file", pwFile, disk, name)
	m := "/dev/mapper/" + name
	vg := "vg" + tag
	sh(t, "pvcreate", "-y", m)
	sh(t, "vgcreate", "-y", vg, m)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "ext", "-L", extSize, vg)
	sh(t, "lvcreate", "-y", "-an", "-Zn", "-n", "raw", "-L", rawSize, vg)
	sh(t, "vgchange", "-ay", vg)
	st := &stack{Tag: tag, Disk: disk, VG: vg, RawLV: "/dev/mapper/" + vg + "-raw"}
	dev := "/dev/mapper/" + vg + "-ext"
	mp := "/mnt/" + tag + "-ext"
	sh(t, "mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", dev)
	os.MkdirAll(mp, 0o755)
	sh(t, "mount", dev, mp)
	st.Mounts, st.FSLVs, st.FSTypes, st.Sizes = []string{mp}, []string{"ext"}, []string{"ext4"}, []uint64{blockDevBytes(t, dev)}
	writeManifest(t, st, state)
	return st, name
}

// verifyPlainCold checks a decrypted (or aborted-encrypt) disk: the LVs map
// the raw disk, no crypt mapping is left, and LVM activates the VG from the
// raw disk after everything is closed.
func verifyPlainCold(t testing.TB, st *stack, state, name string) {
	t.Helper()
	if out, err := shOK("dmsetup", "info", name); err == nil {
		t.Fatalf("%s still exists:\n%s", name, out)
	}
	for _, lv := range append(append([]string{}, st.FSLVs...), "raw") {
		// Every device under the LV (through a cache's or a pool's
		// sub-LVs too) leads to the raw disk, none through name.
		under := strings.Fields(sh(t, "lsblk", "-s", "-n", "-r", "-o", "NAME", "/dev/mapper/"+st.VG+"-"+lv))
		if !slices.Contains(under, filepath.Base(st.Disk)) || slices.Contains(under, name) {
			t.Fatalf("%s-%s does not map the raw disk alone: %v", st.VG, lv, under)
		}
	}
	verifyStack(t, st, state)
	for _, mp := range st.Mounts {
		sh(t, "umount", mp)
	}
	lv(t, "vgchange", "-an", st.VG)
	if typ, _ := shOK("blkid", "-p", "-o", "value", "-s", "TYPE", st.Disk); strings.TrimSpace(typ) != "LVM2_member" {
		t.Fatalf("blkid -p %s says %q, want LVM2_member", st.Disk, typ)
	}
	lv(t, "vgchange", "-ay", st.VG)
	verifyStack(t, st, state)
}

// TestGuestCLIDecrypt: a disk set up by cryptsetup and LVM the way an
// installer does is decrypted online under a writer (--shrink-pv makes the
// working space), interrupted with SIGINT, resumed; the result is a plain
// PV with every acknowledged write.
func TestGuestCLIDecrypt(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	st, name := luksStack(t, "dec", d[6], state)
	decryptInterruptResume(t, st, state, name)
}

// decryptInterruptResume: under a writer, decrypt the mapping name, SIGINT
// at 40%, resume; every write is there, live and after a cold open, and
// the PV grows into the header's space as the output says.
func decryptInterruptResume(t testing.TB, st *stack, state, name string) {
	t.Helper()
	out := decryptInterrupted(t, st, state, name)
	verifyPlainCold(t, st, state, name)
	growPVAsTold(t, st, out)
}

// decryptInterrupted runs decryptInterruptResume's decrypt, SIGINT and
// resume under a writer, and returns the resume's output.
func decryptInterrupted(t testing.TB, st *stack, state, name string) string {
	t.Helper()
	w := startWriter(t, st, state)
	args := []string{"decrypt", name, "--shrink-pv", "--batch-mode", "--json", "--key-file", pwFile, "--journal", st.file(state, "journal"), "--chunk-size", "4M"}
	r := cliStart(t, args...)
	r.waitProgress(t, 0.4)
	r.cmd.Process.Signal(syscall.SIGINT)
	code, errOut := r.wait()
	requireExit(t, "decrypt after SIGINT", code, 5, errOut)
	code, out := cliRun(t, "resume", "--journal", st.file(state, "journal"), "--key-file", pwFile)
	requireExit(t, "resume of the decrypt", code, 0, out)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	return out
}

// growPVAsTold: the header's sectors are free after the PV: the
// decrypt's output out says how to grow the PV into them, and that
// command does.
func growPVAsTold(t testing.TB, st *stack, out string) {
	t.Helper()
	if !strings.Contains(out, "pvresize "+st.Disk+"\n") {
		t.Fatalf("the decrypt did not say how to grow the PV into the header's space:\n%s", out)
	}
	pvSize := func() uint64 {
		n, err := strconv.ParseUint(strings.TrimSpace(lv(t, "pvs", "--noheadings", "--units", "s", "--nosuffix", "-o", "pv_size", st.Disk)), 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}
	before := pvSize()
	lv(t, "pvresize", st.Disk)
	if after := pvSize(); after <= before {
		t.Fatalf("pvresize %s left the PV at %d sectors (was %d)", st.Disk, after, before)
	}
}

// TestGuestCLIDecryptAbort: a decrypt stopped half way and aborted is a
// LUKS disk again that stock cryptsetup opens, with every write.
func TestGuestCLIDecryptAbort(t *testing.T) {
	testvm.RequireGuest(t)
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	st, name := luksStack(t, "deca", d[7], state)
	w := startWriter(t, st, state)
	args := []string{"decrypt", name, "--shrink-pv", "--batch-mode", "--json", "--key-file", pwFile, "--journal", st.file(state, "journal"), "--chunk-size", "4M"}
	r := cliStart(t, args...)
	r.waitProgress(t, 0.5)
	r.cmd.Process.Signal(syscall.SIGTERM)
	code, errOut := r.wait()
	requireExit(t, "decrypt after SIGTERM", code, 5, errOut)
	// The header says a conversion is in progress: stock cryptsetup will
	// not activate it (luks TestGuestRequirementBlocksActivation).
	if out := sh(t, "cryptsetup", "luksDump", st.Disk); !strings.Contains(out, "dmconvert") {
		t.Fatalf("the half-decrypted disk's header carries no dmconvert requirement:\n%s", out)
	}
	code, out := cliRun(t, "abort", "--journal", st.file(state, "journal"), "--key-file", pwFile)
	requireExit(t, "abort of the decrypt", code, 0, out)
	acks, _ := w.finish(t)
	t.Logf("writer: %d acknowledged writes", acks)
	verifyStack(t, st, state)
	verifyEncryptedCold(t, st, state, name)
}

// loopEnv, when set to N, makes TestOptInGuestDecryptLoop run the
// decrypt-with-interrupt cycle N times in one boot (to catch rare hangs).
const loopEnv = "DMCONVERT_LOOP"

// TestOptInGuestDecryptLoop repeats TestGuestCLIDecrypt's cycle on one
// disk: set up LUKS+LVM with a writer, decrypt, SIGINT, resume, verify,
// tear down. Run it with DMCONVERT_VM_RUN=^TestOptInGuestDecryptLoop$.
func TestOptInGuestDecryptLoop(t *testing.T) {
	testvm.RequireGuest(t)
	n, _ := strconv.Atoi(os.Getenv(loopEnv))
	if n <= 0 {
		t.Skip("set DMCONVERT_LOOP=N")
	}
	defer watchBlocked(t)()
	d := testvm.GuestDisks()
	state := guestStateDir(t, d[3])
	writePW(t)
	for i := 0; i < n; i++ {
		ok := t.Run(fmt.Sprintf("cycle%d", i), func(t *testing.T) {
			tag := fmt.Sprintf("lp%d", i)
			st, name := luksStack(t, tag, d[6], state)
			decryptInterruptResume(t, st, state, name)
			for _, mp := range st.Mounts {
				shOK("umount", mp)
			}
			sh(t, "vgremove", "-ff", "-y", st.VG)
			sh(t, "wipefs", "-a", "-q", st.Disk)
			old, _ := filepath.Glob(st.file(state, "*"))
			for _, f := range old {
				os.RemoveAll(f)
			}
		})
		if !ok {
			break
		}
	}
}
