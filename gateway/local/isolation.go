package local

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// sandboxPath is the PATH every command gets: the host's usual one, not
// the gateway's.
const sandboxPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Inside a sandbox under bubblewrap, its home and its temporary directory
// are at these paths. Without isolation the same paths, given as a cwd,
// are mapped to the sandbox's own directories.
const (
	sandboxHome = "/root"
	sandboxTmp  = "/tmp"
)

// launcher builds the process of one exec for an isolation mode.
type launcher struct {
	mode     Isolation // IsolationBwrap or IsolationNone, never auto
	bwrap    string    // the bubblewrap binary
	stateDir string    // hidden from commands under bubblewrap
}

// fsDirs are a sandbox's writable directories on the host.
type fsDirs struct {
	home string // seen as /root under bubblewrap
	tmp  string // seen as /tmp under bubblewrap
}

// command returns the process that runs `bash -c script` in a sandbox
// whose files are in dirs, with cwd as the sandbox sees it (absolute).
// The process is a group leader and dies with the gateway's thread that
// started it, so a kill of its group or of the gateway leaves nothing.
func (l launcher) command(dirs fsDirs, cwd, script string) *exec.Cmd {
	var cmd *exec.Cmd
	switch l.mode {
	case IsolationBwrap:
		cmd = exec.Command(l.bwrap, l.bwrapArgs(dirs, cwd, script)...)
		// bwrap's --clearenv clears the command's environment; bwrap
		// itself needs none of the gateway's either.
		cmd.Env = []string{"PATH=" + sandboxPath}
	default:
		cmd = exec.Command("bash", "-c", script)
		cmd.Dir = hostPath(dirs, cwd)
		cmd.Env = []string{
			"HOME=" + dirs.home,
			"PATH=" + sandboxPath,
			"TERM=dumb",
			"LANG=C.UTF-8",
			"TMPDIR=" + dirs.tmp,
		}
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid:   true,
		Pdeathsig: syscall.SIGKILL,
	}
	return cmd
}

// bwrapArgs is the bubblewrap argv (without the binary) of one exec. The
// order matters: later mounts cover earlier ones.
func (l launcher) bwrapArgs(dirs fsDirs, cwd, script string) []string {
	args := []string{
		// Fresh user, IPC, PID, network, UTS and cgroup namespaces: the
		// command sees only its own processes and only a loopback device
		// of its own, so neither the gateway's port nor the network.
		"--unshare-all",
		// When bwrap dies (a kill of the exec's group, or of the gateway),
		// everything in the sandbox dies with it.
		"--die-with-parent",
		// A new session: the command cannot push input into a terminal.
		"--new-session",
		"--ro-bind", "/", "/",
		// The state dir holds every sandbox's files and the snapshots: with
		// / bound read-only it would be readable, so cover it.
		"--tmpfs", l.stateDir,
	}
	for _, d := range hiddenHostDirs() {
		args = append(args, "--tmpfs", d)
	}
	args = append(args,
		"--dev", "/dev",
		"--proc", "/proc",
		// The sandbox's own home and temporary directory; these also hide
		// the host's /root and /tmp.
		"--bind", dirs.home, sandboxHome,
		"--bind", dirs.tmp, sandboxTmp,
		"--hostname", "sandbox",
		"--clearenv",
		"--setenv", "HOME", sandboxHome,
		"--setenv", "PATH", sandboxPath,
		"--setenv", "TERM", "dumb",
		"--setenv", "LANG", "C.UTF-8",
		"--chdir", cwd,
		"--",
		"bash", "-c", script,
	)
	return args
}

// hiddenHostDirs are the host directories covered with an empty tmpfs
// under bubblewrap, those that exist: /run, which holds the host daemons'
// Unix sockets (docker, dbus, ...) that a read-only mount does not stop
// anyone from connecting to; /home and the gateway user's own home, which
// hold people's files (the host's /root is covered by the sandbox's home).
func hiddenHostDirs() []string {
	dirs := []string{"/run", "/home"}
	if h, err := os.UserHomeDir(); err == nil && filepath.IsAbs(h) {
		h = filepath.Clean(h)
		if h != "/" && h != sandboxHome && !strings.HasPrefix(h, "/home/") && !strings.HasPrefix(h, "/run/") {
			dirs = append(dirs, h)
		}
	}
	out := dirs[:0]
	for _, d := range dirs {
		if fi, err := os.Stat(d); err == nil && fi.IsDir() {
			out = append(out, d)
		}
	}
	return out
}

// hostPath maps a sandbox path to the host without isolation: /root and
// /tmp, and paths under them, go to the sandbox's own directories, so that
// the default cwd works in both modes. Other paths are the host's.
func hostPath(dirs fsDirs, p string) string {
	p = filepath.Clean(p)
	for _, m := range []struct{ from, to string }{{sandboxHome, dirs.home}, {sandboxTmp, dirs.tmp}} {
		if p == m.from {
			return m.to
		}
		if rest, ok := strings.CutPrefix(p, m.from+"/"); ok {
			return filepath.Join(m.to, rest)
		}
	}
	return p
}

// probeBwrap runs `true` under the same bubblewrap arguments an exec gets,
// in a scratch sandbox under stateDir, and says why it failed, if it did.
func probeBwrap(ctx context.Context, bwrap, stateDir string) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	path, err := exec.LookPath(bwrap)
	if err != nil {
		return fmt.Errorf("bubblewrap not found: %w", err)
	}
	scratch, err := os.MkdirTemp(stateDir, "probe-")
	if err != nil {
		return fmt.Errorf("probe: %w", err)
	}
	defer os.RemoveAll(scratch)
	dirs := fsDirs{home: filepath.Join(scratch, "root"), tmp: filepath.Join(scratch, "tmp")}
	for _, d := range []string{dirs.home, dirs.tmp} {
		if err := os.Mkdir(d, 0o700); err != nil {
			return fmt.Errorf("probe: %w", err)
		}
	}
	l := launcher{mode: IsolationBwrap, bwrap: path, stateDir: stateDir}
	cmd := l.command(dirs, sandboxHome, "true")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = time.Second
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("probe: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) })
	err = cmd.Wait()
	stop()
	if err == nil {
		return nil
	}
	if msg := strings.TrimSpace(out.String()); msg != "" {
		err = fmt.Errorf("%w: %s", err, msg)
	}
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		err = fmt.Errorf("timed out: %w", err)
	}
	return fmt.Errorf("probe %s: %w", path, err)
}
