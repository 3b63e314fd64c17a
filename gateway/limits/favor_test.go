package limits

import (
	"bufio"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// ownFavorMounted reports whether this process's favordynmods mount is
// there.
func ownFavorMounted(t *testing.T) bool {
	t.Helper()
	on, err := mountedAt("/proc/self/mountinfo", favorDir())
	if err != nil {
		t.Fatal(err)
	}
	return on
}

// TestV1FavorDynMods: a v1 controller turns the kernel's cgroup
// favordynmods on with a mount of the named hierarchy at its first group,
// not before (a gateway whose sandboxes ask for no limit leaves the kernel
// alone); the mount is shared by the process's controllers, and the last
// Close unmounts it; NoFavorDynMods leaves the kernel alone; a mount left
// by a gateway that is gone is removed at the next start. What the option
// buys is a time (docs/PERFORMANCE.md), not tested here.
func TestV1FavorDynMods(t *testing.T) {
	first := realV1(t) // skips where there is no v1 to test
	if first.FavorDynMods() || ownFavorMounted(t) {
		t.Fatalf("FavorDynMods() = %v, mounted %v before any group; want neither", first.FavorDynMods(), ownFavorMounted(t))
	}
	// group makes a group of c and returns what removes it.
	group := func(c *Controller, name string) func() {
		t.Helper()
		g, err := c.New(name, Spec{Pids: 32})
		if err != nil {
			t.Fatal(err)
		}
		return func() {
			if err := g.Remove(); err != nil {
				t.Error(err)
			}
		}
	}
	removeFirst := group(first, "favor-first")
	if !first.FavorDynMods() {
		// Linux before 6.0 has no such option: nothing to test there.
		dir := t.TempDir()
		if err := unix.Mount("cgroup", dir, "cgroup", 0, "none,name="+favorName+",favordynmods"); err != nil {
			removeFirst()
			t.Skipf("the kernel refuses a cgroup mount with favordynmods: %v", err)
		}
		_ = unix.Unmount(dir, unix.MNT_DETACH)
	}
	a, err := Detect(Config{Name: "boxq-test-fa-" + strconv.Itoa(os.Getpid())})
	if err != nil {
		t.Fatal(err)
	}
	removeA := group(a, "favor-a")
	if !first.FavorDynMods() || !a.FavorDynMods() {
		t.Fatalf("FavorDynMods() = %v, %v; want true (New logs why not)", first.FavorDynMods(), a.FavorDynMods())
	}
	if !ownFavorMounted(t) {
		t.Fatal("no favordynmods mount of this process")
	}
	off, err := Detect(Config{Name: "boxq-test-fo-" + strconv.Itoa(os.Getpid()), NoFavorDynMods: true})
	if err != nil {
		t.Fatal(err)
	}
	removeOff := group(off, "favor-off")
	if off.FavorDynMods() {
		t.Error("NoFavorDynMods: FavorDynMods() = true")
	}
	removeOff()
	_ = off.Close()
	removeA()
	_ = a.Close()
	if !ownFavorMounted(t) {
		t.Error("the mount went while a controller still uses it")
	}
	removeFirst()
	_ = first.Close()
	if ownFavorMounted(t) {
		t.Error("the favordynmods mount is still there after every Close")
	}

	// A gateway killed before Close: its mount stays until the next start.
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}
	stale := filepath.Join(os.TempDir(), favorPrefix+strconv.Itoa(gone.Process.Pid))
	if err := os.MkdirAll(stale, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("cgroup", stale, "cgroup", 0, "none,name="+favorName+",favordynmods"); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = unix.Unmount(stale, unix.MNT_DETACH); _ = os.Remove(stale) })
	c, err := Detect(Config{Name: "boxq-test-fs-" + strconv.Itoa(os.Getpid())})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	defer group(c, "favor-stale")()
	if on, _ := mountedAt("/proc/self/mountinfo", stale); on {
		t.Errorf("the stale mount at %s is still there", stale)
	}
	if !c.FavorDynMods() || !ownFavorMounted(t) {
		t.Error("after removing the stale mount, no mount of its own")
	}
}

// TestFavorSymlinks: os.TempDir() is writable by everyone, and the
// gateway that mounts and unmounts in it runs as root. A symlink planted
// where a gone gateway's mount point would be must not make the start-up
// clean-up unmount what it points to, and one planted at this process's
// own mount point must not make the cgroup hierarchy land on its target.
func TestFavorSymlinks(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounts need root")
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	gone := exec.Command("true")
	if err := gone.Run(); err != nil {
		t.Fatal(err)
	}

	// Someone else's mount, named by a symlink in the clean-up's glob.
	target := t.TempDir()
	if err := unix.Mount("tmpfs", target, "tmpfs", 0, "size=64k"); err != nil {
		t.Skipf("cannot mount a tmpfs: %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(target, unix.MNT_DETACH) })
	link := filepath.Join(os.TempDir(), favorPrefix+strconv.Itoa(gone.Process.Pid))
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(link) })
	removeStaleFavor(log)
	if on, err := mountedAt("/proc/self/mountinfo", target); err != nil || !on {
		t.Errorf("the mount at %s, which a symlink %s points to, is gone after removeStaleFavor (err %v)", target, link, err)
	}

	// A symlink at this process's own mount point.
	favor.mu.Lock()
	refs := favor.refs
	favor.mu.Unlock()
	if refs != 0 {
		t.Fatalf("favor.refs = %d: a controller of another test is still open", refs)
	}
	aim := t.TempDir()
	own := favorDir()
	if err := os.Symlink(aim, own); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.Remove(own) })
	release, on := favorDynMods(log)
	mounted, err := mountedAt("/proc/self/mountinfo", aim)
	release()
	if err != nil {
		t.Fatal(err)
	}
	if mounted {
		_ = unix.Unmount(aim, unix.MNT_DETACH)
		t.Errorf("favorDynMods mounted the hierarchy at %s, through a symlink at %s", aim, own)
	}
	if on {
		t.Errorf("favorDynMods with a symlink at its mount point: on = true, want false")
	}
}

// TestFavorStalePidReused: the mount of a gone gateway whose pid a live
// process has since taken is removed at the next start; the mount of a
// live gateway is not.
func TestFavorStalePidReused(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounts need root")
	}
	live := exec.Command("sleep", "300")
	if err := live.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = live.Process.Kill(); _ = live.Wait() })
	start, err := procStart(live.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name      string
		start     string // of the process that made the mount
		wantStays bool
	}{
		{"pid reused", strconv.FormatUint(start+1, 10), false},
		{"gateway alive", strconv.FormatUint(start, 10), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(os.TempDir(), favorPrefix+strconv.Itoa(live.Process.Pid)+"-"+tc.start)
			if err := os.Mkdir(dir, 0o700); err != nil {
				t.Fatal(err)
			}
			if err := unix.Mount("cgroup", dir, "cgroup", 0, "none,name="+favorName+",favordynmods"); err != nil {
				t.Skipf("cannot mount the favordynmods hierarchy: %v", err)
			}
			t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH); _ = os.Remove(dir) })
			removeStaleFavor(slog.New(slog.NewTextHandler(io.Discard, nil)))
			on, err := mountedAt("/proc/self/mountinfo", dir)
			if err != nil {
				t.Fatal(err)
			}
			if on != tc.wantStays {
				t.Errorf("mount at %s still there: %v, want %v", dir, on, tc.wantStays)
			}
		})
	}
}

// mountedAt reports whether something is mounted at dir, from mountInfo
// (/proc/self/mountinfo's format).
func mountedAt(mountInfo, dir string) (bool, error) {
	f, err := os.Open(mountInfo)
	if err != nil {
		return false, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		// id parent major:minor root mountpoint ...
		if fields := strings.Fields(sc.Text()); len(fields) > 4 && unescapeMount(fields[4]) == dir {
			return true, nil
		}
	}
	if err := sc.Err(); err != nil {
		return false, fmt.Errorf("read %s: %w", mountInfo, err)
	}
	return false, nil
}
