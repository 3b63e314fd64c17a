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

	"github.com/boxq/boxq/gateway/limits"
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

// Bash gets an exec's script on a pipe at descriptor 3, never in its argv:
// under `bash -c <script>`, the script, and with it the marker of a wrapped
// command (package wrap), was in /proc/<pid>/cmdline of the shell for every
// process of the sandbox to read, and under bubblewrap in /proc/1/cmdline
// too, bwrap's own argv. bashLoader is bash's whole command line:
//
//   - `read -N` reads the pipe to its end, 4 KiB at a time, before any of
//     the script runs, so nothing is left in the pipe for the command to
//     read. -N counts characters, and a script has at most MaxBodyBytes
//     bytes, so the bound is never reached. (`bash /dev/fd/3` would read
//     the script as it runs it and leave the rest in the pipe; `. /dev/fd/3`
//     would put "/dev/fd/3:" before every error message.)
//   - The descriptor is closed: the command inherits none.
//   - eval runs the script, on the loader's first line, as `bash -c` does:
//     the same $LINENO and "bash: line N:" messages, the same $0 and
//     BASH_SOURCE, `return` refused outside a function. Its first command
//     drops the variable that held the script, which from then on is only
//     in the shell's memory.
//
// What differs from `bash -c`: $BASH_EXECUTION_STRING is the loader; a
// syntax error in the script is reported as eval's ("bash: eval: line 1:"),
// and on the first line it quotes the unset with it; a NUL byte, which argv
// could not carry either, is refused (read would drop it).
//
// Under bubblewrap, the sandbox's pid 1 closes its copy of descriptor 3
// itself; the outer bwrap keeps one, outside the sandbox's PID namespace.
const bashLoader = `read -r -N 16777216 -u 3 __boxq_script; exec 3<&-; eval "unset __boxq_script; $__boxq_script"`

// The loader's bound must stay above the longest script a request can
// carry: this fails to compile otherwise.
const _ = uint(16777216 - MaxBodyBytes)

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

	image *imageRun     // the image the sandbox runs in; nil: the host's root
	group *limits.Group // the sandbox's cgroup; nil: none
}

// command returns the process that runs bash in a sandbox whose files are
// in dirs, with cwd as the sandbox sees it (absolute), on the script that
// arrives through script, the read end of a scriptPipe (see bashLoader).
// The process is a group leader and dies with the gateway's thread that
// started it, so a kill of its group or of the gateway leaves nothing.
func (l launcher) command(dirs fsDirs, cwd string, script *os.File) *exec.Cmd {
	var cmd *exec.Cmd
	switch l.mode {
	case IsolationBwrap:
		cmd = exec.Command(l.bwrap, l.bwrapArgs(dirs, cwd, bashLoader)...)
		// bwrap's --clearenv clears the command's environment; bwrap
		// itself needs none of the gateway's either.
		cmd.Env = []string{"PATH=" + sandboxPath}
	default:
		cmd = exec.Command("bash", "-c", bashLoader)
		cmd.Dir = hostPath(dirs, cwd)
		cmd.Env = []string{
			"HOME=" + dirs.home,
			"PATH=" + sandboxPath,
			"TERM=dumb",
			"LANG=C.UTF-8",
			"TMPDIR=" + dirs.tmp,
		}
	}
	// ExtraFiles start at descriptor 3, which bwrap passes on to bash.
	cmd.ExtraFiles = []*os.File{script}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Setpgid:   true,
		Pdeathsig: syscall.SIGKILL,
	}
	return cmd
}

// scriptPipe carries the script of one exec to bash (see bashLoader).
type scriptPipe struct {
	r, w *os.File
	done chan struct{} // closed when the writing has ended
}

func newScriptPipe() (*scriptPipe, error) {
	r, w, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("script pipe: %w", err)
	}
	return &scriptPipe{r: r, w: w, done: make(chan struct{})}, nil
}

// feed is called once the process that got p.r has started, or failed to:
// it closes the gateway's copy of the read end, so that only bash reads the
// pipe, and writes the script into the pipe in the background, since a
// script longer than the pipe's buffer is written only as bash reads it.
func (p *scriptPipe) feed(script string) {
	p.r.Close()
	go func() {
		defer close(p.done)
		defer p.w.Close()
		// An error means that every reader is gone before the end: bash
		// could not start, or was killed. The exec's outcome says so.
		_, _ = p.w.WriteString(script)
	}()
}

// wait returns once the writing has ended; call it after feed, once the
// process is reaped. A reader that lives on without reading (a process that
// got descriptor 3 before the loader closed it and left the exec's group)
// does not hold it up.
func (p *scriptPipe) wait() {
	_ = p.w.SetWriteDeadline(time.Now())
	<-p.done
}

// bwrapArgs is the bubblewrap argv (without the binary) of one exec, which
// runs `bash -c arg`. The order matters: later mounts cover earlier ones.
func (l launcher) bwrapArgs(dirs fsDirs, cwd, arg string) []string {
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
	}
	if dirs.image != nil {
		// The sandbox's overlay of its image: writable, its own.
		args = append(args, "--bind", dirs.image.root, "/")
	} else {
		args = append(args,
			"--ro-bind", "/", "/",
			// The state dir holds every sandbox's files and the snapshots:
			// with / bound read-only it would be readable, so cover it.
			"--tmpfs", l.stateDir,
		)
		for _, d := range hiddenHostDirs() {
			args = append(args, "--tmpfs", d)
		}
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
	)
	if dirs.image != nil {
		args = append(args, dirs.image.bwrapArgs()...)
	}
	args = append(args,
		"--chdir", cwd,
		"--",
		"bash", "-c", arg,
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
	script, err := newScriptPipe()
	if err != nil {
		return fmt.Errorf("probe: %w", err)
	}
	cmd := l.command(dirs, sandboxHome, script.r)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.WaitDelay = time.Second
	err = cmd.Start()
	script.feed("true")
	defer script.wait()
	if err != nil {
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
