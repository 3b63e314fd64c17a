package limits

import (
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Moving an exec into its cgroups, as the v1 shim does by writing its pid
// to cgroup.procs, takes the kernel's cgroup_threadgroup_rwsem for writing.
// That lock is a per-cpu rwsem: unless a writer came by in the last grace
// period, a writer first waits for an RCU grace period, which on an idle
// host takes about 10 ms (measured on this 2-core VM: `sleep 0.01` in a
// sandbox, after 20 ms of idle, 28 ms moved into a cgroup against 13 ms
// not moved; back to back, 13 ms both; docs/PERFORMANCE.md). Every exec of
// a gateway that is not kept busy pays it.
//
// Linux (6.0 on) has a switch for exactly this: favordynmods, a mount
// option of any cgroup hierarchy, v1 or v2, which keeps that rwsem in its
// slow-reader mode while a hierarchy with the option exists: writers no
// longer wait for grace periods, and forks and exits, the readers, pay an
// atomic operation more, host-wide. cgroup v2's CLONE_INTO_CGROUP does not
// move a process and needs none of this.
//
// So, under v1, a gateway that runs as root mounts an empty named
// hierarchy with the option at its first sandbox cgroup (one whose
// sandbox asks for a limit: the others' execs move nowhere, and the host
// should not pay for them), keeps it for as long as it runs, and
// unmounts it on Close: the kernel goes back to its default when the last
// such mount goes. One mount serves every Controller of a process; a
// gateway killed before Close leaves its mount behind, and the next one
// removes it. Config.NoFavorDynMods leaves the kernel as it is.

// favorName is the named hierarchy's name: every gateway's mount is of the
// same hierarchy.
const favorName = "boxq-favordynmods"

// favorPrefix starts the names of the mount points, in os.TempDir():
// boxq-favordynmods-PID-START, START the process's start time (in clock
// ticks since boot, /proc/PID/stat): a pid alone may have been taken by
// another process since the gateway that made the mount went.
const favorPrefix = "boxq-favordynmods-"

// favorDir is this process's mount point.
func favorDir() string {
	name := favorPrefix + strconv.Itoa(os.Getpid())
	if start, err := procStart(os.Getpid()); err == nil {
		name += "-" + strconv.FormatUint(start, 10)
	}
	return filepath.Join(os.TempDir(), name)
}

// procStart is the start time of process pid, in clock ticks since boot.
func procStart(pid int) (uint64, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, err
	}
	// pid (comm) state ppid ...: comm may hold spaces and parentheses.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: no command name", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields after the command name, want 20 or more", pid, len(f))
	}
	return strconv.ParseUint(f[19], 10, 64) // field 22, starttime
}

var favor struct {
	mu   sync.Mutex
	refs int
	dir  string // this process's mount point, "" when not mounted
}

// favorDynMods turns favordynmods on for the process's Controllers: it
// mounts the hierarchy on the first call and counts the others. It returns
// what to call on Close, and whether the option holds (already on, or
// mounted now).
func favorDynMods(log *slog.Logger) (release func(), on bool) {
	favor.mu.Lock()
	defer favor.mu.Unlock()
	if favor.refs > 0 {
		favor.refs++
		return releaseFavor, true
	}
	removeStaleFavor(log)
	// A mount of its own even when the option is on already: another's
	// may go while this gateway runs.
	dir := favorDir()
	fd, err := openOwnDir(dir)
	if err != nil {
		log.Warn("limits: cannot turn cgroup favordynmods on: each exec waits for an RCU grace period (≈10 ms on an idle host) as it joins its cgroups", "error", err)
		return func() {}, false
	}
	// The mount goes on the directory just checked, through its
	// descriptor: not on whatever the path names by the time of the mount.
	err = unix.Mount("cgroup", "/proc/self/fd/"+strconv.Itoa(fd), "cgroup", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, "none,name="+favorName+",favordynmods")
	_ = unix.Close(fd)
	if err != nil {
		_ = os.Remove(dir)
		log.Warn("limits: cannot turn cgroup favordynmods on (Linux 6.0 or later, as root): each exec waits for an RCU grace period (≈10 ms on an idle host) as it joins its cgroups", "error", err)
		return func() {}, false
	}
	favor.dir, favor.refs = dir, 1
	log.Info("limits: cgroup favordynmods on from the first sandbox with a limit while the gateway runs (an empty cgroup hierarchy mounted with it): moving an exec into its cgroups no longer waits for an RCU grace period; host-wide, forks and exits pay an atomic operation more. -cgroup-favordynmods=false leaves the kernel as it is", "mount", dir)
	return releaseFavor, true
}

// openOwnDir makes dir, or finds it made, and opens it: it must be a
// directory of this process's user, not a symlink. os.TempDir() is
// writable by everyone, and the gateway mounting there runs as root: a
// symlink or a directory planted by another user at the path must not
// get a mount.
func openOwnDir(dir string) (int, error) {
	if err := os.Mkdir(dir, 0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return -1, err
	}
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("open %s (a symlink is refused): %w", dir, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		_ = unix.Close(fd)
		return -1, fmt.Errorf("stat %s: %w", dir, err)
	}
	if int(st.Uid) != os.Geteuid() {
		_ = unix.Close(fd)
		return -1, fmt.Errorf("%s belongs to uid %d, not to the gateway's (%d): refused; remove it", dir, st.Uid, os.Geteuid())
	}
	return fd, nil
}

func releaseFavor() {
	favor.mu.Lock()
	defer favor.mu.Unlock()
	if favor.refs == 0 {
		return
	}
	favor.refs--
	if favor.refs == 0 && favor.dir != "" {
		_ = unix.Unmount(favor.dir, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW)
		_ = os.Remove(favor.dir)
		favor.dir = ""
	}
}

// removeStaleFavor unmounts the mount points left by gateways that are
// gone (killed before Close).
func removeStaleFavor(log *slog.Logger) {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), favorPrefix+"*"))
	for _, d := range dirs {
		p, start, withStart := strings.Cut(strings.TrimPrefix(filepath.Base(d), favorPrefix), "-")
		pid, err := strconv.Atoi(p)
		if err != nil || pid <= 0 || d == favorDir() {
			continue
		}
		if syscall.Kill(pid, 0) != syscall.ESRCH {
			// A live process: the gateway that made the mount, unless it
			// started at another time than the mount's name says.
			now, err := procStart(pid)
			if !withStart || err != nil || strconv.FormatUint(now, 10) == start {
				continue
			}
		}
		// Only a directory of the gateway's user, never through a
		// symlink: anyone can plant one in os.TempDir(), and the
		// gateway, as root, could unmount any mount it points to.
		var st unix.Stat_t
		if err := unix.Lstat(d, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR || int(st.Uid) != os.Geteuid() {
			continue
		}
		err = unix.Unmount(d, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW)
		if err != nil && err != unix.EINVAL { // EINVAL: not mounted
			log.Warn("limits: cannot unmount the favordynmods hierarchy of a gone gateway", "mount", d, "error", err)
			continue
		}
		_ = os.Remove(d)
	}
}
