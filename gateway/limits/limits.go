// Package limits enforces a sandbox's memory, cpu and process limits with
// cgroups, and gives it a size-limited disk and an overlay root.
//
// Under cgroup v2 (a delegated subtree) a sandbox's processes are cloned
// straight into its cgroup (SysProcAttr.UseCgroupFD), so not one instruction
// of user code runs outside it. cgroup v1 has no such clone flag: the command
// is started through a shim, which writes its own pid to the sandbox's
// cgroup.procs files and then execs the real command (bwrap). Every later
// fork inherits the cgroup. The shim is a few lines of /bin/sh where there is
// one (about 1.4 ms per exec); the fallback is the gateway binary re-executed
// in shim mode (RunShim), whose Go runtime and package init cost about 8 ms
// per exec. ProbeShim checks, at start, that the sandbox user can run the
// shim, and falls back from sh to the binary when it cannot.
//
// Detect finds what the machine offers and says which limits hold; a
// gateway that cannot enforce a limit reports it instead of pretending.
package limits

import (
	"bufio"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Spec is what one sandbox is allowed. Zero means no limit of that kind.
type Spec struct {
	MemoryMiB int
	CPU       float64 // cores; 0.5 is half a core
	Pids      int
}

// Holds says which limits are enforced.
type Holds struct {
	Memory bool `json:"memory"`
	CPU    bool `json:"cpu"`
	Pids   bool `json:"pids"`
	Disk   bool `json:"disk"`
}

// Config configures Detect. Zero values are this machine's real files.
type Config struct {
	// CgroupRoot replaces "/" in front of the mount points read from
	// MountInfo (tests point it at a fake tree).
	CgroupRoot string
	MountInfo  string // default /proc/self/mountinfo
	SelfCgroup string // default /proc/self/cgroup
	// Name of the directory holding this gateway's sandboxes (default
	// "boxq-<pid>-<random>").
	Name string
	// ShimPath is the executable RunShim runs in: the v1 shim where
	// Shell is unset or the sandbox user cannot run it (default: this
	// executable; "-": none, for a program whose main does not call
	// RunShim, such as an embedded gateway).
	ShimPath string
	// Shell is the POSIX shell the v1 shim runs in when there is one
	// (default /bin/sh if it exists; "-": always the Go shim of
	// ShimPath). A shell starts in about 1 ms; the gateway binary, with
	// its runtime and its packages' init, in about 8: every exec pays it.
	Shell string
	// NoFavorDynMods leaves the kernel's cgroup favordynmods as it is
	// under v1 (favor.go: by default a gateway turns it on at its first
	// New, for as long as it runs, so that an exec's move into its cgroups waits for no RCU grace
	// period).
	NoFavorDynMods bool
	Logger         *slog.Logger
	// mkdir and rmdir make and remove a cgroup directory: a fake tree's
	// need their control files made, and are not empty.
	mkdir func(string) error
	rmdir func(string) error
}

// Versions of cgroups a Controller uses.
const (
	ModeNone = "none"
	ModeV1   = "v1"
	ModeV2   = "v2"
)

var controllers = []string{"memory", "cpu", "pids"}

// SandboxPath is the PATH a sandbox's commands, and the shim's probe, run
// with.
const SandboxPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Controller makes per-sandbox cgroups.
type Controller struct {
	cfg   Config
	mode  string
	v2dir string            // v2: parent of the sandbox cgroups
	v1    map[string]string // v1: controller → parent of the sandbox cgroups
	holds Holds
	why   []string
	// favordynmods (favor.go), turned on at the first New, not at Detect:
	// a gateway whose sandboxes ask for no limit moves no exec into a
	// cgroup, and must not make every fork and exit of the host pay for
	// it. favorWanted: v1, and not opted out; favorTried: the first New
	// came; favor: it holds; unfavor undoes it on Close.
	favorMu     sync.Mutex
	favorWanted bool
	favorTried  bool
	favor       bool
	unfavor     func()
}

// Detect looks at the machine's cgroups and prepares a parent cgroup for the
// sandboxes. It fails only on a broken configuration; a machine without
// usable cgroups gives a Controller that enforces nothing and says why.
func Detect(cfg Config) (*Controller, error) {
	if cfg.MountInfo == "" {
		cfg.MountInfo = "/proc/self/mountinfo"
	}
	if cfg.SelfCgroup == "" {
		cfg.SelfCgroup = "/proc/self/cgroup"
	}
	if cfg.Name == "" {
		// Unique per Controller: one process may run several gateways.
		rnd := make([]byte, 4)
		_, _ = rand.Read(rnd)
		cfg.Name = "boxq-" + strconv.Itoa(os.Getpid()) + "-" + hex.EncodeToString(rnd)
	}
	switch cfg.ShimPath {
	case "-":
		cfg.ShimPath = ""
	case "":
		exe, err := os.Executable()
		if err != nil {
			return nil, fmt.Errorf("limits: own executable for the cgroup v1 shim: %w", err)
		}
		cfg.ShimPath = exe
	}
	switch cfg.Shell {
	case "":
		if _, err := os.Stat("/bin/sh"); err == nil {
			cfg.Shell = "/bin/sh"
		}
	case "-":
		cfg.Shell = ""
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.rmdir == nil {
		cfg.rmdir = os.Remove
	}
	if cfg.mkdir == nil {
		cfg.mkdir = func(d string) error { return os.Mkdir(d, 0o755) }
	}
	c := &Controller{cfg: cfg, mode: ModeNone, v1: map[string]string{}}
	mounts, err := readMounts(cfg.MountInfo)
	if err != nil {
		c.why = append(c.why, "cgroups: "+err.Error())
		return c, nil
	}
	self, err := readSelfCgroup(cfg.SelfCgroup)
	if err != nil {
		c.why = append(c.why, "cgroups: "+err.Error())
		return c, nil
	}
	var v2why []string
	if m, ok := mounts.v2(); ok {
		if err := c.setupV2(filepath.Join(cfg.CgroupRoot, m, self[""])); err == nil {
			return c, nil
		} else {
			v2why = append(v2why, "cgroup v2: "+err.Error())
		}
	}
	c.setupV1(mounts, self)
	if c.mode == ModeNone {
		c.why = append(v2why, c.why...)
	}
	c.favorWanted = c.mode == ModeV1 && cfg.CgroupRoot == "" && !cfg.NoFavorDynMods
	return c, nil
}

// FavorDynMods reports whether the kernel's cgroup favordynmods holds for
// this v1 controller (favor.go): from its first New on, unless opted out
// or the kernel refused.
func (c *Controller) FavorDynMods() bool {
	c.favorMu.Lock()
	defer c.favorMu.Unlock()
	return c.favor
}

// favorOn turns favordynmods on for this controller, once, at its first
// New.
func (c *Controller) favorOn() {
	c.favorMu.Lock()
	defer c.favorMu.Unlock()
	if !c.favorWanted || c.favorTried {
		return
	}
	c.favorTried = true
	c.unfavor, c.favor = favorDynMods(c.cfg.Logger)
}

// Mode is ModeV2, ModeV1 or ModeNone.
func (c *Controller) Mode() string { return c.mode }

// Holds says which limits this controller enforces (Disk is not its
// business: see MountTmpfs).
func (c *Controller) Holds() Holds { return c.holds }

// Why lists, one line each, the limits that cannot be enforced and why.
func (c *Controller) Why() []string { return append([]string(nil), c.why...) }

func (c *Controller) setupV2(own string) error {
	b, err := os.ReadFile(filepath.Join(own, "cgroup.controllers"))
	if err != nil {
		return err
	}
	avail := strings.Fields(string(b))
	var enable []string
	for _, ctl := range controllers {
		if contains(avail, ctl) {
			enable = append(enable, "+"+ctl)
		}
	}
	if len(enable) == 0 {
		return fmt.Errorf("no memory, cpu or pids controller delegated to %s", own)
	}
	// "No internal processes": a cgroup whose children get controllers
	// holds no processes itself. Move this gateway into a leaf of its own
	// first. Only itself: anything else in its cgroup (a service's other
	// processes) is not ours to move, and the delegation then fails, said.
	if procs, _ := readProcs(own); contains(procs, os.Getpid()) {
		leaf := filepath.Join(own, "boxq-gateway")
		if err := c.cfg.mkdir(leaf); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("not delegated: %w", err)
		}
		if err := writeFile(filepath.Join(leaf, "cgroup.procs"), strconv.Itoa(os.Getpid())); err != nil {
			return fmt.Errorf("move the gateway to %s: %w", leaf, err)
		}
	}
	ctl := strings.Join(enable, " ")
	if err := writeFile(filepath.Join(own, "cgroup.subtree_control"), ctl); err != nil {
		return fmt.Errorf("not delegated: %w", err)
	}
	c.removeStale(own)
	parent := filepath.Join(own, c.cfg.Name)
	if err := c.cfg.mkdir(parent); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	if err := writeFile(filepath.Join(parent, "cgroup.subtree_control"), ctl); err != nil {
		return err
	}
	c.mode, c.v2dir = ModeV2, parent
	c.holds = Holds{Memory: contains(avail, "memory"), CPU: contains(avail, "cpu"), Pids: contains(avail, "pids")}
	for _, ctl := range controllers {
		if !contains(avail, ctl) {
			c.why = append(c.why, fmt.Sprintf("%s: not enforced: controller not delegated to %s (cgroup v2)", ctl, own))
		}
	}
	return nil
}

func (c *Controller) setupV1(mounts mountTable, self map[string]string) {
	for _, ctl := range controllers {
		m, ok := mounts.v1[ctl]
		if !ok {
			c.why = append(c.why, fmt.Sprintf("%s: not enforced: no cgroup v1 %s hierarchy and no delegated cgroup v2", ctl, ctl))
			continue
		}
		if c.cfg.Shell == "" && c.cfg.ShimPath == "" {
			// Without a shim no exec could join its cgroup.
			c.why = append(c.why, fmt.Sprintf("%s: not enforced: cgroup v1 needs a shim to join the sandbox's cgroups, and there is no /bin/sh nor a gateway binary to run it in (run cmd/gateway)", ctl))
			continue
		}
		c.removeStale(filepath.Join(c.cfg.CgroupRoot, m, self[ctl]))
		parent := filepath.Join(c.cfg.CgroupRoot, m, self[ctl], c.cfg.Name)
		if err := os.MkdirAll(parent, 0o755); err != nil {
			c.why = append(c.why, fmt.Sprintf("%s: not enforced: cgroup v1: %v", ctl, err))
			continue
		}
		c.v1[ctl] = parent
		c.mode = ModeV1
		switch ctl {
		case "memory":
			c.holds.Memory = true
		case "cpu":
			c.holds.CPU = true
		case "pids":
			c.holds.Pids = true
		}
	}
}

// removeStale removes, under dir, the cgroups of gateways that are gone
// (named boxq-PID-HEX by Detect, PID no longer running): a gateway killed
// before Close leaves its sandboxes' groups behind, and the next one, in the
// same cgroup, clears them. A group still holding processes is killed
// first (its bwrap dies with the gateway anyway); a live gateway's are left.
func (c *Controller) removeStale(dir string) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		pid, ok := stalePid(e.Name())
		if !e.IsDir() || !ok || pid == os.Getpid() || syscall.Kill(pid, 0) != syscall.ESRCH {
			continue
		}
		parent := filepath.Join(dir, e.Name())
		subs, _ := os.ReadDir(parent)
		g := &Group{c: c, fd: -1}
		for _, sub := range subs {
			if sub.IsDir() {
				g.dirs = append(g.dirs, filepath.Join(parent, sub.Name()))
			}
		}
		err := g.Remove()
		if err == nil {
			err = c.cfg.rmdir(parent)
		}
		if err != nil {
			c.cfg.Logger.Warn("limits: cannot remove a stale cgroup of a gone gateway", "cgroup", parent, "error", err)
		} else {
			c.cfg.Logger.Info("limits: removed the stale cgroup of a gone gateway", "cgroup", parent)
		}
	}
}

// stalePid parses Detect's default name, boxq-PID-HEX.
func stalePid(name string) (int, bool) {
	rest, ok := strings.CutPrefix(name, "boxq-")
	if !ok {
		return 0, false
	}
	p, h, ok := strings.Cut(rest, "-")
	if !ok || h == "" {
		return 0, false
	}
	if _, err := hex.DecodeString(h); err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(p)
	return pid, err == nil && pid > 0
}

// Close removes the parent cgroups (they must be empty: remove the groups
// first).
func (c *Controller) Close() error {
	c.favorMu.Lock()
	if c.unfavor != nil {
		c.unfavor()
		c.unfavor = nil
	}
	c.favor = false
	c.favorMu.Unlock()
	var errs []error
	if c.v2dir != "" {
		errs = append(errs, c.cfg.rmdir(c.v2dir))
	}
	for _, d := range c.v1 {
		errs = append(errs, c.cfg.rmdir(d))
	}
	return errors.Join(errs...)
}

// Group is one sandbox's cgroup (one directory per hierarchy under v1).
type Group struct {
	c      *Controller
	dirs   []string // v2: one; v1: one per controller
	memDir string   // the directory with the memory controller's files
	spec   Spec
	holds  Holds
	fd     int // v2: the cgroup directory, for clone3
}

// New makes the cgroup of sandbox id and writes its limits.
func (c *Controller) New(id string, s Spec) (*Group, error) {
	if id == "" || strings.ContainsAny(id, "/.") {
		return nil, fmt.Errorf("limits: bad sandbox id %q", id)
	}
	g := &Group{c: c, spec: s, fd: -1}
	switch c.mode {
	case ModeNone:
		return g, nil
	case ModeV2:
		dir := filepath.Join(c.v2dir, id)
		if err := c.cfg.mkdir(dir); err != nil {
			return nil, fmt.Errorf("limits: %w", err)
		}
		g.dirs, g.memDir = []string{dir}, dir
		if err := g.writeV2(dir); err != nil {
			_ = g.Remove()
			return nil, err
		}
		fd, err := syscall.Open(dir, syscall.O_DIRECTORY|syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err != nil {
			_ = g.Remove()
			return nil, fmt.Errorf("limits: %w", err)
		}
		g.fd = fd
	case ModeV1:
		c.favorOn()
		for _, ctl := range controllers {
			parent, ok := c.v1[ctl]
			if !ok {
				continue
			}
			dir := filepath.Join(parent, id)
			if err := c.cfg.mkdir(dir); err != nil {
				_ = g.Remove()
				return nil, fmt.Errorf("limits: %w", err)
			}
			g.dirs = append(g.dirs, dir)
			if ctl == "memory" {
				g.memDir = dir
			}
			if err := g.writeV1(ctl, dir); err != nil {
				_ = g.Remove()
				return nil, err
			}
		}
	}
	return g, nil
}

func (g *Group) writeV2(dir string) error {
	s, h := g.spec, g.c.holds
	if s.MemoryMiB > 0 && h.Memory {
		if err := writeFile(filepath.Join(dir, "memory.max"), strconv.FormatInt(int64(s.MemoryMiB)<<20, 10)); err != nil {
			return fmt.Errorf("limits: memory: %w", err)
		}
		// No swap: the limit is the memory the sandbox gets.
		if _, err := os.Stat(filepath.Join(dir, "memory.swap.max")); err == nil {
			if err := writeFile(filepath.Join(dir, "memory.swap.max"), "0"); err != nil {
				return fmt.Errorf("limits: memory: %w", err)
			}
		}
		g.holds.Memory = true
	}
	if s.CPU > 0 && h.CPU {
		if err := writeFile(filepath.Join(dir, "cpu.max"), fmt.Sprintf("%d %d", quota(s.CPU), cpuPeriod)); err != nil {
			return fmt.Errorf("limits: cpu: %w", err)
		}
		g.holds.CPU = true
	}
	if s.Pids > 0 && h.Pids {
		if err := writeFile(filepath.Join(dir, "pids.max"), strconv.Itoa(s.Pids)); err != nil {
			return fmt.Errorf("limits: pids: %w", err)
		}
		g.holds.Pids = true
	}
	return nil
}

func (g *Group) writeV1(ctl, dir string) error {
	s := g.spec
	switch {
	case ctl == "memory" && s.MemoryMiB > 0:
		v := strconv.FormatInt(int64(s.MemoryMiB)<<20, 10)
		if err := writeFile(filepath.Join(dir, "memory.limit_in_bytes"), v); err != nil {
			return fmt.Errorf("limits: memory: %w", err)
		}
		// memory+swap at the same value: no swap (the file exists only
		// with swap accounting on; it must be written after the limit).
		if _, err := os.Stat(filepath.Join(dir, "memory.memsw.limit_in_bytes")); err == nil {
			if err := writeFile(filepath.Join(dir, "memory.memsw.limit_in_bytes"), v); err != nil {
				return fmt.Errorf("limits: memory+swap: %w", err)
			}
		}
		g.holds.Memory = true
	case ctl == "cpu" && s.CPU > 0:
		if err := writeFile(filepath.Join(dir, "cpu.cfs_period_us"), strconv.Itoa(cpuPeriod)); err != nil {
			return fmt.Errorf("limits: cpu: %w", err)
		}
		if err := writeFile(filepath.Join(dir, "cpu.cfs_quota_us"), strconv.Itoa(quota(s.CPU))); err != nil {
			return fmt.Errorf("limits: cpu: %w", err)
		}
		g.holds.CPU = true
	case ctl == "pids" && s.Pids > 0:
		if err := writeFile(filepath.Join(dir, "pids.max"), strconv.Itoa(s.Pids)); err != nil {
			return fmt.Errorf("limits: pids: %w", err)
		}
		g.holds.Pids = true
	}
	return nil
}

const cpuPeriod = 100000 // µs

func quota(cpu float64) int {
	q := int(cpu * cpuPeriod)
	if q < 1000 { // the kernel's minimum
		q = 1000
	}
	return q
}

// Holds says which of the spec's limits this group enforces.
func (g *Group) Holds() Holds { return g.holds }

// Allow lets processes running as uid/gid join the group from the v1 shim
// (which runs with the exec's credentials). v2 clones into the group from
// the gateway itself and needs nothing.
func (g *Group) Allow(uid, gid int) error {
	if g.c.mode != ModeV1 {
		return nil
	}
	for _, d := range g.dirs {
		for _, f := range []string{"cgroup.procs", "tasks"} {
			if err := os.Chown(filepath.Join(d, f), uid, gid); err != nil && !errors.Is(err, os.ErrNotExist) {
				return fmt.Errorf("limits: %w", err)
			}
		}
	}
	return nil
}

// Wrap makes cmd start inside the group. Call it after cmd's Path, Args and
// SysProcAttr are set, before Start.
func (g *Group) Wrap(cmd *exec.Cmd) {
	switch g.c.mode {
	case ModeV2:
		if cmd.SysProcAttr == nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{}
		}
		cmd.SysProcAttr.UseCgroupFD = true
		cmd.SysProcAttr.CgroupFD = g.fd
	case ModeV1:
		if sh := g.c.cfg.Shell; sh != "" {
			// The same steps as RunShim's, in sh: write its own pid into
			// each cgroup.procs (a failure ends it, 126, before the command
			// runs), then exec the command. exec "$@" gives the command its
			// path as argv[0], which bwrap does not mind.
			args := []string{sh, "-c", shellShim, "boxq-cgroup-shim"}
			for _, d := range g.dirs {
				args = append(args, filepath.Join(d, "cgroup.procs"))
			}
			args = append(args, "--", cmd.Path)
			args = append(args, cmd.Args[1:]...)
			cmd.Path, cmd.Args = sh, args
			return
		}
		args := []string{g.c.cfg.ShimPath, ShimArg}
		for _, d := range g.dirs {
			args = append(args, filepath.Join(d, "cgroup.procs"))
		}
		args = append(args, "--", cmd.Path)
		args = append(args, cmd.Args...)
		cmd.Path, cmd.Args = g.c.cfg.ShimPath, args
	}
}

// Shim is the program the v1 shim runs in: the shell, or the gateway binary
// (RunShim) where there is no shell or ProbeShim found that the sandbox user
// cannot run it.
func (c *Controller) Shim() string {
	if c.cfg.Shell != "" {
		return c.cfg.Shell
	}
	return c.cfg.ShimPath
}

// ProbeShim runs `true` through the cgroup v1 shim as Wrap runs every
// exec's command, with cred (nil: this process's), joining no cgroup. The
// shell shim is tried first; if it fails, the gateway binary's, which Wrap
// then uses (and the fallback is logged). An error means that neither runs:
// no exec could join its cgroup, and the v1 limits cannot be enforced. Call
// it once, before the first New; it does nothing under v2 (no shim).
func (c *Controller) ProbeShim(cred *syscall.Credential) error {
	if c.mode != ModeV1 {
		return nil
	}
	var errs []error
	if sh := c.cfg.Shell; sh != "" {
		err := c.runProbe(cred)
		if err == nil {
			return nil
		}
		errs = append(errs, fmt.Errorf("shell shim %s: %w", sh, err))
		c.cfg.Shell = ""
	}
	if c.cfg.ShimPath != "" {
		err := c.runProbe(cred)
		if err == nil {
			if len(errs) > 0 {
				c.cfg.Logger.Warn("limits: the cgroup v1 shim runs in the gateway binary (about 8 ms per exec, against 1.4 in sh): the sandbox user cannot run it in sh",
					"shim", c.cfg.ShimPath, "error", errs[0])
			}
			return nil
		}
		errs = append(errs, fmt.Errorf("binary shim %s: %w", c.cfg.ShimPath, err))
	}
	if len(errs) == 0 {
		errs = append(errs, errors.New("no /bin/sh and no gateway binary"))
	}
	return fmt.Errorf("limits: the cgroup v1 shim does not run: %w", errors.Join(errs...))
}

func (c *Controller) runProbe(cred *syscall.Credential) error {
	cmd := exec.Command("true")
	cmd.Env = []string{"PATH=" + SandboxPath}
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: cred}
	// A group in no cgroup: the shim joins nothing and execs true.
	(&Group{c: c, fd: -1}).Wrap(cmd)
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%w: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// shellShim is the v1 shim in sh: its arguments are the cgroup.procs files,
// "--", and the command.
const shellShim = `p=$$
while [ "$#" -gt 0 ] && [ "$1" != -- ]; do
	echo "$p" > "$1" || { echo "boxq cgroup shim: join cgroup: cannot write $1" >&2; exit 126; }
	shift
done
[ "$#" -ge 2 ] || { echo "boxq cgroup shim: no command" >&2; exit 126; }
shift
exec "$@"`

// OOMKills counts the processes of the group the kernel killed for memory.
func (g *Group) OOMKills() int {
	if g.memDir == "" {
		return 0
	}
	file := filepath.Join(g.memDir, "memory.oom_control") // v1
	if g.c.mode == ModeV2 {
		file = filepath.Join(g.memDir, "memory.events")
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 2 && f[0] == "oom_kill" {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	return 0
}

// CPUThrottled counts the cpu periods in which the group used up its cpu
// quota and was held back: the cpu limit at work (0 without one).
func (g *Group) CPUThrottled() int {
	for _, d := range g.dirs {
		b, err := os.ReadFile(filepath.Join(d, "cpu.stat")) // v1 and v2
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) == 2 && f[0] == "nr_throttled" {
				n, _ := strconv.Atoi(f[1])
				return n
			}
		}
	}
	return 0
}

// Kill kills every process in the group, forks in flight included: it
// repeats until the group is empty (a fork bomb under a pids cap runs out).
func (g *Group) Kill() {
	if g.c.mode == ModeV2 {
		if err := writeFile(filepath.Join(g.dirs[0], "cgroup.kill"), "1"); err == nil {
			return
		}
	}
	for round := 0; round < 200; round++ {
		alive := 0
		for _, d := range g.dirs {
			procs, _ := readProcs(d)
			for _, p := range procs {
				alive++
				_ = syscall.Kill(p, syscall.SIGKILL)
			}
		}
		if alive == 0 {
			return
		}
		time.Sleep(time.Millisecond)
	}
}

// Remove kills what is left and removes the group. Safe to repeat.
func (g *Group) Remove() error {
	if len(g.dirs) == 0 {
		return nil
	}
	g.Kill()
	if g.fd >= 0 {
		syscall.Close(g.fd)
		g.fd = -1
	}
	var errs []error
	for _, d := range g.dirs {
		// Killed processes leave the cgroup as they exit; rmdir is
		// refused (EBUSY) until the last one has.
		var err error
		for try := 0; try < 500; try++ {
			err = g.c.cfg.rmdir(d)
			if err == nil || errors.Is(err, os.ErrNotExist) {
				err = nil
				break
			}
			if !errors.Is(err, syscall.EBUSY) {
				break
			}
			time.Sleep(2 * time.Millisecond)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("limits: remove %s: %w", d, err))
		}
	}
	g.dirs = nil
	return errors.Join(errs...)
}

// Procs lists the processes in the group (under v1, in any of its
// hierarchies).
func (g *Group) Procs() []int {
	seen := map[int]bool{}
	var all []int
	for _, d := range g.dirs {
		p, _ := readProcs(d)
		for _, pid := range p {
			if !seen[pid] {
				seen[pid] = true
				all = append(all, pid)
			}
		}
	}
	return all
}

func readProcs(dir string) ([]int, error) {
	b, err := os.ReadFile(filepath.Join(dir, "cgroup.procs"))
	if err != nil {
		return nil, err
	}
	var out []int
	for _, f := range strings.Fields(string(b)) {
		if n, err := strconv.Atoi(f); err == nil {
			out = append(out, n)
		}
	}
	return out, nil
}

func writeFile(p, v string) error {
	f, err := os.OpenFile(p, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString(v)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

type mountTable struct {
	v1     map[string]string // controller → mount point
	v2Path string
}

func (m mountTable) v2() (string, bool) { return m.v2Path, m.v2Path != "" }

func readMounts(p string) (mountTable, error) {
	t := mountTable{v1: map[string]string{}}
	f, err := os.Open(p)
	if err != nil {
		return t, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// id parent maj:min root mountpoint opts [optional…] - fstype source superopts
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		if !ok {
			continue
		}
		pf, qf := strings.Fields(pre), strings.Fields(post)
		if len(pf) < 5 || len(qf) < 3 {
			continue
		}
		switch qf[0] {
		case "cgroup2":
			t.v2Path = pf[4]
		case "cgroup":
			for _, o := range strings.Split(qf[2], ",") {
				if contains(controllers, o) {
					t.v1[o] = pf[4]
				}
			}
		}
	}
	return t, sc.Err()
}

// readSelfCgroup maps each v1 controller (and "" for v2) to this process's
// cgroup path.
func readSelfCgroup(p string) (map[string]string, error) {
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		parts := strings.SplitN(line, ":", 3)
		if len(parts) != 3 {
			continue
		}
		if parts[1] == "" {
			out[""] = parts[2]
			continue
		}
		for _, ctl := range strings.Split(parts[1], ",") {
			out[ctl] = parts[2]
		}
	}
	return out, nil
}

func contains[T comparable](xs []T, x T) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}
