package limits

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func TestMain(m *testing.M) {
	// The v1 tests start commands through the test binary as the shim.
	if RunShim(os.Args) {
		return
	}
	os.Exit(m.Run())
}

// realV1 returns a controller on this machine's cgroup v1 hierarchies, or
// skips when the machine has none usable (a v2 host, a non-root run).
func realV1(t *testing.T, need ...string) *Controller {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("cgroups need root")
	}
	c, err := Detect(Config{Name: "boxq-test-" + strconv.Itoa(os.Getpid())})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	if c.Mode() != ModeV1 {
		t.Skipf("cgroup mode %s, not v1: %v", c.Mode(), c.Why())
	}
	for _, n := range need {
		if _, ok := c.v1[n]; !ok {
			t.Skipf("no v1 %s hierarchy: %v", n, c.Why())
		}
	}
	return c
}

func newGroup(t *testing.T, c *Controller, s Spec) *Group {
	t.Helper()
	g, err := c.New(strings.ReplaceAll(t.Name(), "/", "_"), s)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := g.Remove(); err != nil {
			t.Error(err)
		}
	})
	return g
}

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

// TestV1ShimJoinsBeforeExec runs both shims: the shell one (the default
// where /bin/sh exists) and the Go one of the gateway binary (RunShim).
func TestV1ShimJoinsBeforeExec(t *testing.T) {
	for name, shell := range map[string]string{"sh": "/bin/sh", "go": ""} {
		t.Run(name, func(t *testing.T) { testV1ShimJoinsBeforeExec(t, shell) })
	}
}

func testV1ShimJoinsBeforeExec(t *testing.T, shell string) {
	c := realV1(t, "memory", "pids", "cpu")
	c.cfg.Shell = shell
	g := newGroup(t, c, Spec{MemoryMiB: 256, CPU: 0.5, Pids: 64})
	cmd := exec.Command("cat", "/proc/self/cgroup")
	g.Wrap(cmd)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	// The exec'd command itself (not only its children) is in every
	// hierarchy's group.
	for _, ctl := range []string{"memory", "pids", "cpu"} {
		want := strings.TrimPrefix(filepath.Join(c.v1[ctl], strings.ReplaceAll(t.Name(), "/", "_")), "/sys/fs/cgroup/"+ctl)
		if !strings.Contains(string(out), ":"+ctl+":"+want+"\n") {
			t.Errorf("%s: /proc/self/cgroup = %s, want %s", ctl, out, want)
		}
	}
	if diff := cmp.Diff(Holds{Memory: true, CPU: true, Pids: true}, g.Holds()); diff != "" {
		t.Errorf("Holds (-want +got):\n%s", diff)
	}
	q, err := os.ReadFile(filepath.Join(c.v1["cpu"], strings.ReplaceAll(t.Name(), "/", "_"), "cpu.cfs_quota_us"))
	if err != nil || strings.TrimSpace(string(q)) != "50000" {
		t.Errorf("cpu.cfs_quota_us = %q, %v; want 50000", q, err)
	}
}

func TestV1MemoryLimitOOMKills(t *testing.T) {
	c := realV1(t, "memory")
	g := newGroup(t, c, Spec{MemoryMiB: 64})
	// tail holds all of a newline-free input: 512 MiB against 64.
	cmd := exec.Command("bash", "-c", "head -c 512M /dev/zero | tail > /dev/null")
	g.Wrap(cmd)
	out, err := cmd.CombinedOutput()
	if got := exitCode(err); got != 137 {
		t.Fatalf("exit code %d (%v: %s), want 137", got, err, out)
	}
	if n := g.OOMKills(); n < 1 {
		t.Errorf("OOMKills = %d, want ≥ 1", n)
	}
	// The group is usable after: a later command runs.
	cmd = exec.Command("true")
	g.Wrap(cmd)
	if err := cmd.Run(); err != nil {
		t.Errorf("true after the OOM kill: %v", err)
	}
}

func TestV1PidsCapsForkBomb(t *testing.T) {
	c := realV1(t, "pids")
	const max = 24
	g := newGroup(t, c, Spec{Pids: max})
	cmd := exec.Command("bash", "-c", `:(){ :|:& };:; sleep 60`)
	g.Wrap(cmd)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	// Wait until the bomb presses on the cap.
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if len(g.Procs()) >= max-2 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	pids := g.Procs()
	if len(pids) > max {
		t.Errorf("%d processes in the group, cap %d", len(pids), max)
	}
	b, _ := os.ReadFile(filepath.Join(c.v1["pids"], strings.ReplaceAll(t.Name(), "/", "_"), "pids.events"))
	if !strings.Contains(string(b), "max ") || strings.Contains(string(b), "max 0") {
		t.Errorf("pids.events = %q, want forks refused at the cap", b)
	}
	if err := g.Remove(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("the bomb's shell survived Remove")
	}
	for _, p := range pids {
		if err := syscall.Kill(p, 0); err == nil {
			if b, _ := os.ReadFile("/proc/" + strconv.Itoa(p) + "/cgroup"); strings.Contains(string(b), "TestV1PidsCapsForkBomb") {
				t.Errorf("process %d of the bomb is alive", p)
			}
		}
	}
}

func TestDetectNoCgroups(t *testing.T) {
	dir := t.TempDir()
	mi := filepath.Join(dir, "mountinfo")
	sc := filepath.Join(dir, "cgroup")
	os.WriteFile(mi, []byte("22 1 0:20 / /proc rw - proc proc rw\n"), 0o644)
	os.WriteFile(sc, []byte("0::/\n"), 0o644)
	c, err := Detect(Config{CgroupRoot: dir, MountInfo: mi, SelfCgroup: sc})
	if err != nil {
		t.Fatal(err)
	}
	if c.Mode() != ModeNone || c.Holds() != (Holds{}) || len(c.Why()) != 3 {
		t.Fatalf("mode %s holds %+v why %q; want none, nothing, three reasons", c.Mode(), c.Holds(), c.Why())
	}
	g, err := c.New("sb1", Spec{MemoryMiB: 64, Pids: 10})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("true")
	g.Wrap(cmd)
	if cmd.Path != mustLook(t, "true") || g.Holds() != (Holds{}) {
		t.Errorf("no-cgroup group changed the command or claims limits: %v %+v", cmd.Args, g.Holds())
	}
}

func mustLook(t *testing.T, n string) string {
	p, err := exec.LookPath(n)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// fakeV2 lays out a delegated cgroup v2 subtree in a temp dir: this
// machine's v2 mount has no controllers, so the v2 code is tested here.
func fakeV2(t *testing.T, controllers string) (Config, string) {
	t.Helper()
	root := t.TempDir()
	own := filepath.Join(root, "sys/fs/cgroup/system.slice/boxq.service")
	files := []string{"cgroup.procs", "cgroup.subtree_control", "cgroup.kill", "memory.max", "memory.swap.max", "memory.events", "cpu.max", "pids.max"}
	mk := func(d string) error {
		if err := os.Mkdir(d, 0o755); err != nil {
			return err
		}
		for _, f := range files {
			if err := os.WriteFile(filepath.Join(d, f), nil, 0o644); err != nil {
				return err
			}
		}
		return nil
	}
	if err := os.MkdirAll(filepath.Dir(own), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := mk(own); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(own, "cgroup.controllers"), []byte(controllers+"\n"), 0o644)
	os.WriteFile(filepath.Join(own, "cgroup.procs"), []byte("1\n"+strconv.Itoa(os.Getpid())+"\n"), 0o644)
	mi := filepath.Join(root, "mountinfo")
	os.WriteFile(mi, []byte("41 31 0:38 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw\n"), 0o644)
	sc := filepath.Join(root, "cgroup")
	os.WriteFile(sc, []byte("0::/system.slice/boxq.service\n"), 0o644)
	return Config{CgroupRoot: root, MountInfo: mi, SelfCgroup: sc, Name: "boxq", ShimPath: "/nonexistent",
		mkdir: mk, rmdir: os.RemoveAll}, own
}

func read(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func TestV2FakeTree(t *testing.T) {
	cfg, own := fakeV2(t, "cpuset cpu io memory pids")
	c, err := Detect(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if c.Mode() != ModeV2 || c.Holds() != (Holds{Memory: true, CPU: true, Pids: true}) || len(c.Why()) != 0 {
		t.Fatalf("mode %s holds %+v why %q", c.Mode(), c.Holds(), c.Why())
	}
	// The gateway left its cgroup for a leaf, then delegated.
	if got := read(t, filepath.Join(own, "boxq-gateway/cgroup.procs")); got != strconv.Itoa(os.Getpid()) {
		t.Errorf("leaf cgroup.procs = %q, want the gateway's pid moved there", got)
	}
	for _, d := range []string{own, filepath.Join(own, "boxq")} {
		if got := read(t, filepath.Join(d, "cgroup.subtree_control")); got != "+memory +cpu +pids" {
			t.Errorf("%s/cgroup.subtree_control = %q", d, got)
		}
	}
	g, err := c.New("sb1", Spec{MemoryMiB: 64, CPU: 1.5, Pids: 100})
	if err != nil {
		t.Fatal(err)
	}
	dir := filepath.Join(own, "boxq/sb1")
	for f, want := range map[string]string{"memory.max": "67108864", "memory.swap.max": "0", "cpu.max": "150000 100000", "pids.max": "100"} {
		if got := read(t, filepath.Join(dir, f)); got != want {
			t.Errorf("%s = %q, want %q", f, got, want)
		}
	}
	cmd := exec.Command("true")
	g.Wrap(cmd)
	if cmd.SysProcAttr == nil || !cmd.SysProcAttr.UseCgroupFD || cmd.SysProcAttr.CgroupFD != g.fd || g.fd < 0 {
		t.Errorf("Wrap: SysProcAttr = %+v, want a clone into the group's fd %d", cmd.SysProcAttr, g.fd)
	}
	if cmd.Path != mustLook(t, "true") {
		t.Errorf("v2 Wrap changed the command to %s", cmd.Path)
	}
	os.WriteFile(filepath.Join(dir, "memory.events"), []byte("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n"), 0o644)
	if n := g.OOMKills(); n != 1 {
		t.Errorf("OOMKills = %d, want 1", n)
	}
	if err := g.Remove(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("group dir left: %v", err)
	}
	if err := g.Remove(); err != nil {
		t.Errorf("second Remove: %v", err)
	}
}

func TestV2NotDelegatedFallsBack(t *testing.T) {
	// This machine's case: a v2 mount with no controllers, no v1 mounts in
	// the (fake) mountinfo: nothing holds, and the reasons say why.
	cfg, _ := fakeV2(t, "")
	c, err := Detect(cfg)
	if err != nil {
		t.Fatal(err)
	}
	why := strings.Join(c.Why(), "\n")
	if c.Mode() != ModeNone || !strings.Contains(why, "no memory, cpu or pids controller delegated") || !strings.Contains(why, "pids: not enforced") {
		t.Fatalf("mode %s, why:\n%s", c.Mode(), why)
	}
}

func TestTmpfsDiskAndOverlay(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounts need root")
	}
	tmp := t.TempDir()
	if err := CanMount(tmp); err != nil {
		t.Skipf("cannot mount here: %v", err)
	}
	disk := filepath.Join(tmp, "disk")
	lower := filepath.Join(tmp, "lower")
	merged := filepath.Join(tmp, "merged")
	for _, d := range []string{disk, lower, merged} {
		os.Mkdir(d, 0o755)
	}
	os.WriteFile(filepath.Join(lower, "base"), []byte("image"), 0o644)
	if err := MountTmpfs(disk, 2); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { Unmount(disk) })
	upper, work := filepath.Join(disk, "upper"), filepath.Join(disk, "work")
	os.Mkdir(upper, 0o755)
	os.Mkdir(work, 0o755)
	if err := MountOverlay(lower, upper, work, merged); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { Unmount(merged) })

	if err := os.WriteFile(filepath.Join(merged, "base"), []byte("changed"), 0o644); err != nil {
		t.Fatal(err)
	}
	if got := read(t, filepath.Join(lower, "base")); got != "image" {
		t.Errorf("lower changed to %q", got)
	}
	if got := read(t, filepath.Join(upper, "base")); got != "changed" {
		t.Errorf("upper = %q", got)
	}
	// 3 MiB into a 2 MiB disk: ENOSPC.
	err := os.WriteFile(filepath.Join(merged, "big"), make([]byte, 3<<20), 0o644)
	if !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("writing past the disk size: err = %v, want ENOSPC", err)
	}
	if err := Unmount(merged); err != nil {
		t.Fatal(err)
	}
	if err := Unmount(disk); err != nil {
		t.Fatal(err)
	}
	if err := Unmount(disk); err != nil {
		t.Errorf("second unmount: %v", err)
	}
}

// TestV1AllowUnprivileged: an exec that runs as another user (its shim
// too) can join the group once Allow has given it the group's procs files.
func TestV1AllowUnprivileged(t *testing.T) {
	c := realV1(t, "pids")
	// The shim must be a binary that user can run: a copy of this one.
	dir := t.TempDir()
	for _, d := range []string{dir, filepath.Dir(dir)} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	shim := filepath.Join(dir, "shim")
	if err := os.WriteFile(shim, b, 0o755); err != nil {
		t.Fatal(err)
	}
	c.cfg.ShimPath = shim
	g := newGroup(t, c, Spec{Pids: 32})
	run := func() (string, error) {
		cmd := exec.Command("cat", "/proc/self/cgroup")
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
		g.Wrap(cmd)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	if out, err := run(); err == nil || !strings.Contains(out, "join cgroup") {
		t.Fatalf("without Allow: %v, %s; want the shim refused its join", err, out)
	}
	if err := g.Allow(65534, 65534); err != nil {
		t.Fatal(err)
	}
	out, err := run()
	if err != nil {
		t.Fatalf("after Allow: %v: %s", err, out)
	}
	if !strings.Contains(out, strings.ReplaceAll(t.Name(), "/", "_")) {
		t.Errorf("/proc/self/cgroup = %s, want the group", out)
	}
}

// TestV2CloneIntoCgroup exercises the real v2 path where a cgroup2 mount
// exists, even one without controllers (this machine's: its controllers
// are bound to v1): the process is cloned into the group (clone3 with
// CLONE_INTO_CGROUP), and cgroup.kill ends everything in it.
func TestV2CloneIntoCgroup(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	mounts, err := readMounts("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	mp, ok := mounts.v2()
	if !ok {
		t.Skip("no cgroup2 mount")
	}
	self, err := readSelfCgroup("/proc/self/cgroup")
	if err != nil {
		t.Fatal(err)
	}
	parent := filepath.Join(mp, self[""], "boxq-test-"+strconv.Itoa(os.Getpid()))
	if err := os.Mkdir(parent, 0o755); err != nil {
		t.Skipf("cgroup2 not writable here: %v", err)
	}
	t.Cleanup(func() { _ = os.Remove(parent) })
	c := &Controller{mode: ModeV2, v2dir: parent, cfg: Config{
		rmdir: os.Remove, mkdir: func(d string) error { return os.Mkdir(d, 0o755) },
	}}
	g, err := c.New("sb", Spec{})
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("bash", "-c", "cat /proc/self/cgroup; sleep 60 & sleep 60 & wait")
	g.Wrap(cmd)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatalf("clone into the cgroup: %v", err)
	}
	line := make([]byte, 4096)
	n, _ := stdout.Read(line)
	want := "0::" + strings.TrimPrefix(filepath.Join(parent, "sb"), mp) + "\n"
	if !strings.Contains(string(line[:n]), want) {
		t.Errorf("/proc/self/cgroup = %q, want %q", line[:n], want)
	}
	waitProcs := time.Now().Add(10 * time.Second)
	for len(g.Procs()) < 3 && time.Now().Before(waitProcs) {
		time.Sleep(10 * time.Millisecond)
	}
	if got := len(g.Procs()); got != 3 {
		t.Errorf("%d processes in the group, want bash and its two sleeps", got)
	}
	if err := g.Remove(); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err == nil {
		t.Error("bash survived Remove")
	}
}

// TestV1StaleGroupsOfAGoneGatewayRemoved: a gateway killed with sandboxes
// leaves its cgroups; the next Detect in the same cgroup removes them (and
// kills what is still in them), and leaves a live gateway's alone.
func TestV1StaleGroupsOfAGoneGatewayRemoved(t *testing.T) {
	c := realV1(t, "memory")
	dir := filepath.Dir(c.v1["memory"])
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	live := exec.Command("sleep", "600")
	if err := live.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = live.Process.Kill(); _ = live.Wait() })
	stale := filepath.Join(dir, fmt.Sprintf("boxq-%d-0badcafe", gone.Process.Pid))
	alive := filepath.Join(dir, fmt.Sprintf("boxq-%d-0badcafe", live.Process.Pid))
	for _, d := range []string{filepath.Join(stale, "sb1"), filepath.Join(stale, "sb2"), filepath.Join(alive, "sb3")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() {
		for _, d := range []string{filepath.Join(alive, "sb3"), alive, filepath.Join(stale, "sb1"), filepath.Join(stale, "sb2"), stale} {
			_ = os.Remove(d)
		}
	})
	// A process the gone gateway's sandbox left running.
	orphan := exec.Command("sleep", "600")
	if err := orphan.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = orphan.Process.Kill(); _ = orphan.Wait() })
	if err := writeFile(filepath.Join(stale, "sb1", "cgroup.procs"), strconv.Itoa(orphan.Process.Pid)); err != nil {
		t.Fatal(err)
	}

	c2, err := Detect(Config{Name: "boxq-test2-" + strconv.Itoa(os.Getpid())})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c2.Close() })
	// (A v1 cgroup is removed only once no process is left in it: the
	// orphan was killed.)
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the gone gateway's cgroup %s is still there: %v", stale, err)
	}
	if _, err := os.Stat(filepath.Join(alive, "sb3")); err != nil {
		t.Errorf("a live gateway's cgroup was removed: %v", err)
	}
}

// copyExe copies the executable src into a new directory that uid 65534
// can reach or, reachable false, cannot (0700, root's).
func copyExe(t *testing.T, src string, reachable bool) string {
	t.Helper()
	dir := t.TempDir()
	for _, d := range []string{dir, filepath.Dir(dir)} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if !reachable {
		dir = filepath.Join(dir, "locked")
		if err := os.Mkdir(dir, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(dir, filepath.Base(src))
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

// TestV1ProbeShim: the probe tries the shim Wrap will use, as the sandbox
// user (65534 here), and falls back from sh to the binary: limits hold
// wherever either runs, and only where neither does is it an error.
func TestV1ProbeShim(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	nobody := &syscall.Credential{Uid: 65534, Gid: 65534, Groups: []uint32{}}
	for _, tc := range []struct {
		name                string
		shell, binary       string // "ok", "unreachable" or "" (none)
		wantShim, wantError string // wantShim: "shell" or "binary"
	}{
		{name: "sh runs, binary unreachable", shell: "ok", binary: "unreachable", wantShim: "shell"},
		{name: "sh runs, no binary (embedded gateway)", shell: "ok", wantShim: "shell"},
		{name: "sh unreachable, binary runs", shell: "unreachable", binary: "ok", wantShim: "binary"},
		{name: "neither runs", shell: "unreachable", binary: "unreachable", wantError: "shell shim"},
		{name: "sh unreachable, no binary", shell: "unreachable", wantError: "shell shim"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := realV1(t, "pids")
			exe := map[string]string{
				"shell/ok": "/bin/sh", "shell/unreachable": copyExe(t, "/bin/sh", false),
				"binary/ok": copyExe(t, self, true), "binary/unreachable": copyExe(t, self, false),
			}
			c.cfg.Shell, c.cfg.ShimPath = exe["shell/"+tc.shell], exe["binary/"+tc.binary]
			want := exe[tc.wantShim+"/"+map[string]string{"shell": tc.shell, "binary": tc.binary}[tc.wantShim]]
			err := c.ProbeShim(nobody)
			if tc.wantError != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantError) || (tc.binary != "" && !strings.Contains(err.Error(), "binary shim")) {
					t.Fatalf("ProbeShim = %v, want an error naming every shim tried", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("ProbeShim: %v", err)
			}
			if got := c.Shim(); got != want {
				t.Errorf("Shim() = %s, want %s", got, want)
			}
			// The shim chosen joins the sandbox user's commands to their group.
			g := newGroup(t, c, Spec{Pids: 32})
			if err := g.Allow(65534, 65534); err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command("cat", "/proc/self/cgroup")
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: nobody}
			g.Wrap(cmd)
			out, err := cmd.CombinedOutput()
			if err != nil || !strings.Contains(string(out), strings.ReplaceAll(t.Name(), "/", "_")) {
				t.Errorf("as uid 65534 through %s: %v: /proc/self/cgroup = %s, want the group", c.Shim(), err, out)
			}
		})
	}
}

// TestV1CPUQuotaThrottles: a busy loop under cpu 0.2 uses up its quota
// period after period, and the group's own counter (cpu.stat nr_throttled)
// shows the kernel held it back. The same loop in a group without a cpu
// limit is never throttled, so the check fails where the quota is missing
// or the command runs outside the group. No time is asserted.
func TestV1CPUQuotaThrottles(t *testing.T) {
	c := realV1(t, "cpu")
	for _, tc := range []struct {
		name    string
		spec    Spec
		limited bool
	}{
		{"cpu limit", Spec{CPU: 0.2}, true},
		{"no cpu limit", Spec{Pids: 32}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g := newGroup(t, c, tc.spec)
			cmd := exec.Command("timeout", "1", "sh", "-c", "while :; do :; done")
			g.Wrap(cmd)
			if out, err := cmd.CombinedOutput(); exitCode(err) != 124 {
				t.Fatalf("busy loop: %v: %s; want timeout's 124", err, out)
			}
			got := g.CPUThrottled()
			if tc.limited && got == 0 {
				t.Errorf("CPUThrottled = 0 after a second of busy loop under cpu 0.2: the quota did not hold it back")
			}
			if !tc.limited && got != 0 {
				t.Errorf("CPUThrottled = %d without a cpu limit, want 0", got)
			}
			t.Logf("nr_throttled %d", got)
		})
	}
}
