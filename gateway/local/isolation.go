package local

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/boxq/boxq/gateway/limits"
)

// sandboxPath is the PATH every command gets: the host's usual one, not
// the gateway's.
const sandboxPath = limits.SandboxPath

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
	mode  Isolation // IsolationBwrap or IsolationNone, never auto
	bwrap string    // the bubblewrap binary
	// user, when not nil, is who bubblewrap and so every command runs as:
	// set when the gateway runs as root, which must not reach a command.
	user *owner
	// view is the host's files a command sees, worked out once.
	view hostView
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
		Pdeathsig: syscall.SIGKILL, // Go sets it after the credentials, which would clear it
	}
	if l.mode == IsolationBwrap && l.user != nil {
		// bwrap starts as the sandbox user, unprivileged: its user
		// namespace maps that user alone, so no command gets root on
		// anything of the host's, not even through a file owned by root.
		cmd.SysProcAttr.Credential = &syscall.Credential{Uid: uint32(l.user.uid), Gid: uint32(l.user.gid), Groups: []uint32{}}
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
		// of its own, so neither the gateway's port nor the network. The
		// user namespace is asked for, not tried: it is what makes the
		// command unprivileged, and --disable-userns stops it from making
		// a nested one to get capabilities back.
		"--unshare-all",
		"--unshare-user",
		"--disable-userns",
		// No capability survives, whoever started bwrap.
		"--cap-drop", "ALL",
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
		args = append(args, l.view.bwrapArgs()...)
	}
	args = append(args,
		"--dev", "/dev",
		"--proc", "/proc",
		// The sandbox's own home and temporary directory.
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

// hostRoots are the host directories a command sees, read-only, where
// they exist: what a shell and the usual tools need, and no more. Not /run
// or /var (the host daemons' Unix sockets, which a read-only mount does
// not stop anyone from connecting to), not /home, /root, /tmp or /srv
// (people's and services' files), not /sys, /boot or /mnt. A symlink
// among them (/bin -> usr/bin on a merged /usr) is made as a symlink.
var hostRoots = []string{"/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc", "/opt"}

// etcSecrets are the files and directories of /etc covered with an empty
// one: password hashes, sudo rules, host keys, TLS private keys, stored
// credentials. Most are readable by root alone, and commands never run as
// root under bubblewrap; the cover is for a host where one is not.
var etcSecrets = []string{
	"/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-",
	"/etc/sudoers", "/etc/sudoers.d", "/etc/security/opasswd",
	"/etc/ssh/ssh_host_*key", "/etc/ssl/private", "/etc/pki/tls/private",
	"/etc/letsencrypt", "/etc/credstore", "/etc/credstore.encrypted",
	"/etc/NetworkManager/system-connections", "/etc/wireguard",
	"/etc/ipsec.secrets", "/etc/krb5.keytab", "/etc/docker",
}

// hostView is the host's files a command sees under bubblewrap, worked out
// once, at start: hostRoots read-only, etcSecrets covered, the state dir,
// the sandboxes' dir and the gateway user's home covered too should they
// be under one of the roots, and the Unix sockets found in the bound trees
// masked (see findSockets).
type hostView struct {
	args    []string // the binds and covers
	sockets []string // masked at each exec, where still sockets
}

// Bounds of the sockets a view masks. Each is one more mount in every
// exec's bubblewrap, and bubblewrap's mount set-up grows with the square
// of their number (measured with bwrap running `true` over the view: 0
// sockets 5.4 ms, 10: 5.9, 50: 13.4, 100: 28.4, 1000: 1,379 ms). A host
// past the bound has a socket farm in /usr, /etc or /opt, which no one
// should run a sandbox over; past slowViewSockets every exec pays for it,
// and the start log says so.
const (
	maxViewSockets     = 64
	maxViewSocketBytes = 64 << 10
	slowViewSockets    = 16
)

// newHostView works out the view, walking the bound trees for sockets. It
// fails on a host with more sockets in them than maxViewSockets or
// maxViewSocketBytes allow; the view it returns then masks none, for a
// probe of bubblewrap only (chooseIsolation: auto without a working
// bubblewrap still runs with none).
func newHostView(log *slog.Logger, stateDir, sandboxesDir string) (hostView, error) {
	var v hostView
	var bound []string
	for _, d := range hostRoots {
		fi, err := os.Lstat(d)
		switch {
		case err != nil:
		case fi.Mode()&fs.ModeSymlink != 0:
			if target, err := os.Readlink(d); err == nil {
				v.args = append(v.args, "--symlink", target, d)
			}
		case fi.IsDir():
			v.args = append(v.args, "--ro-bind", d, d)
			bound = append(bound, d)
		}
	}
	// Covered directories hide whatever is in them, sockets too: the walk
	// skips them.
	covered := make(map[string]bool)
	for _, pattern := range etcSecrets {
		matches, _ := filepath.Glob(pattern)
		for _, p := range matches {
			fi, err := os.Lstat(p)
			switch {
			case err != nil, fi.Mode()&fs.ModeSymlink != 0:
				// A symlink points into a root that is covered, or out of
				// the view.
			case fi.IsDir():
				v.args = append(v.args, "--tmpfs", p)
				covered[p] = true
			default:
				v.args = append(v.args, "--ro-bind", "/dev/null", p)
			}
		}
	}
	hide := []string{stateDir, sandboxesDir}
	if h, err := os.UserHomeDir(); err == nil && filepath.IsAbs(h) {
		hide = append(hide, filepath.Clean(h))
	}
	for _, h := range hide {
		for _, b := range bound {
			if h == b || strings.HasPrefix(h, b+"/") {
				if fi, err := os.Stat(h); err == nil && fi.IsDir() {
					v.args = append(v.args, "--tmpfs", h)
					covered[h] = true
				}
				break
			}
		}
	}
	start := time.Now()
	sockets, st, err := findSockets(bound, covered, maxViewSockets, maxViewSocketBytes)
	if err != nil {
		return v, err
	}
	v.sockets = sockets
	log.Info("view: host sockets masked", "trees", strings.Join(bound, " "), "sockets", len(sockets),
		"entries", st.entries, "nested_mounts", st.mounts, "took", time.Since(start).Round(time.Millisecond))
	for _, p := range sockets {
		log.Debug("view: socket masked", "path", p)
	}
	if len(sockets) > slowViewSockets {
		log.Warn("view: many host sockets to mask: every exec's bubblewrap mounts over each, ≈ 13 ms more per exec at 50 sockets; move them out of the trees a sandbox sees (into /run)",
			"sockets", len(sockets), "limit", maxViewSockets)
	}
	if st.unlisted > 0 {
		log.Warn("view: directories in the trees a command sees that the gateway cannot list: a Unix socket in one is not masked, and a command may still connect to it by name where it may search the directory; run the gateway as root, or make them readable",
			"directories", st.unlisted, "first", strings.Join(st.unlistedFirst, " "))
	}
	return v, nil
}

// bwrapArgs returns the view's arguments: the binds, the covers, and
// /dev/null over each socket found at start that is still a socket (one a
// daemon removed since has no path to mount over, and would fail the
// exec; one it made again is masked again).
func (v hostView) bwrapArgs() []string {
	args := v.args
	for _, p := range v.sockets {
		if fi, err := os.Lstat(p); err == nil && fi.Mode().Type() == fs.ModeSocket {
			// A bind over the socket file: connect(2) then meets
			// /dev/null, and fails with ECONNREFUSED.
			args = append(args[:len(args):len(args)], "--ro-bind", "/dev/null", p)
		}
	}
	return args
}

// walkStats says what a findSockets walk went through.
type walkStats struct {
	entries int // files and directories seen
	mounts  int // nested mounts walked
	// unlisted counts the directories the walk could not list, and
	// unlistedFirst names the first few: a command with the gateway's
	// rights (a gateway not run as root runs its commands as itself) can
	// still reach a socket in one by its name if it may search it.
	unlisted      int
	unlistedFirst []string
}

// findSockets returns the Unix sockets in the trees of roots, in walk
// order: a read-only bind does not stop connect(2), so each must be
// masked. It follows no symlink (a symlink's target is in a walked tree or
// out of the view), skips the covered directories, and walks a mount
// nested in a tree, which bubblewrap's recursive bind puts in the view too,
// unless it is a kernel pseudo file system (/proc, /sys, cgroups, ...),
// which holds no sockets. It fails when there are more than maxCount
// sockets or their paths take more than maxBytes.
func findSockets(roots []string, covered map[string]bool, maxCount, maxBytes int) ([]string, walkStats, error) {
	var sockets []string
	var st walkStats
	size := 0
	for _, root := range roots {
		// The directories from root down to the one being walked, with
		// their devices: a directory is a mount point when its device is
		// not its parent's. (Not root's: every directory below a nested
		// mount would count as one, and cost a statfs.)
		type dirDev struct {
			path string
			dev  uint64
		}
		var parents []dirDev
		err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				// A directory the gateway cannot list. Run as root it
				// lists all; otherwise its commands run as itself, and
				// can reach a socket in it by name where they may search
				// it (mode --x): newHostView warns.
				if d != nil && d.IsDir() {
					st.unlisted++
					if len(st.unlistedFirst) < 5 {
						st.unlistedFirst = append(st.unlistedFirst, p)
					}
				}
				return nil
			}
			st.entries++
			switch {
			case d.IsDir():
				if covered[p] {
					return filepath.SkipDir
				}
				fi, err := d.Info()
				if err != nil {
					return nil
				}
				sys, ok := fi.Sys().(*syscall.Stat_t)
				if !ok {
					return nil
				}
				if p == root || len(parents) == 0 {
					parents = append(parents[:0], dirDev{p, sys.Dev})
					return nil
				}
				// The walk is depth first: p's parent is on the stack.
				parent := filepath.Dir(p)
				for len(parents) > 1 && parents[len(parents)-1].path != parent {
					parents = parents[:len(parents)-1]
				}
				if sys.Dev != parents[len(parents)-1].dev {
					var sfs unix.Statfs_t
					if err := unix.Statfs(p, &sfs); err == nil && pseudoFS[int64(sfs.Type)] {
						return filepath.SkipDir
					}
					st.mounts++
				}
				parents = append(parents, dirDev{p, sys.Dev})
			case d.Type() == fs.ModeSocket:
				sockets = append(sockets, p)
				size += len(p)
				if len(sockets) > maxCount || size > maxBytes {
					return fmt.Errorf("view: more than %d Unix sockets (or %d KiB of their paths) in %s, the last %s: too many to mask; move them out of the trees a sandbox sees (into /run), or run with -isolation none on a trusted host",
						maxCount, maxBytes>>10, strings.Join(roots, " "), p)
				}
			}
			return nil
		})
		if err != nil {
			return nil, st, err
		}
	}
	return sockets, st, nil
}

// pseudoFS are the kernel file systems a bound tree's walk does not enter:
// none can hold a socket file, and some are large (/proc) or never end.
// autofs is not entered either: that would mount what it stands for.
var pseudoFS = map[int64]bool{
	unix.PROC_SUPER_MAGIC: true, unix.SYSFS_MAGIC: true, unix.CGROUP_SUPER_MAGIC: true,
	unix.CGROUP2_SUPER_MAGIC: true, unix.DEVPTS_SUPER_MAGIC: true, unix.DEBUGFS_MAGIC: true,
	unix.TRACEFS_MAGIC: true, unix.SECURITYFS_MAGIC: true, unix.BPF_FS_MAGIC: true,
	unix.PSTOREFS_MAGIC: true, unix.EFIVARFS_MAGIC: true, unix.BINFMTFS_MAGIC: true,
	unix.NSFS_MAGIC: true, unix.AUTOFS_SUPER_MAGIC: true,
	0x19800202: true, // mqueue
	0x65735543: true, // fusectl
	0x62656570: true, // configfs
}

// checkTopLevel refuses a sandbox tree whose own directories are not
// directories: bubblewrap's --bind follows a symlink, which would give a
// command whatever it points to on the host.
func checkTopLevel(dirs fsDirs) error {
	for _, d := range []string{dirs.home, dirs.tmp} {
		fi, err := os.Lstat(d)
		if err != nil {
			return err
		}
		if !fi.IsDir() {
			return fmt.Errorf("%s is not a directory (%s): refused", d, fi.Mode().Type())
		}
	}
	return nil
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
// with view, as user (nil: the gateway's), in a scratch sandbox under
// stateDir, and says why it failed, if it did.
func probeBwrap(ctx context.Context, bwrap, stateDir string, user *owner, view hostView) error {
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
	defer removeTree(scratch) //nolint:errcheck // a leftover goes at the next start
	if err := user.traversable(scratch); err != nil {
		return fmt.Errorf("probe: %w", err)
	}
	dirs := fsDirs{home: filepath.Join(scratch, "root"), tmp: filepath.Join(scratch, "tmp")}
	for _, d := range []string{dirs.home, dirs.tmp} {
		if err := os.Mkdir(d, 0o700); err != nil {
			return fmt.Errorf("probe: %w", err)
		}
		if err := user.give(d); err != nil {
			return fmt.Errorf("probe: %w", err)
		}
	}
	l := launcher{mode: IsolationBwrap, bwrap: path, user: user, view: view}
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
	if user != nil {
		err = fmt.Errorf("%w (bwrap runs as uid %d, gid %d: every directory above the state dir must let it search)", err, user.uid, user.gid)
	}
	return fmt.Errorf("probe %s: %w", path, err)
}
