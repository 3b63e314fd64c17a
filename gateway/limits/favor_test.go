package limits

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// ownFavorMounted reports whether this process's favordynmods mount is
// there.
func ownFavorMounted(t *testing.T) bool {
	t.Helper()
	on, err := mountedAt("/proc/self/mountinfo", filepath.Join(os.TempDir(), favorPrefix+strconv.Itoa(os.Getpid())))
	if err != nil {
		t.Fatal(err)
	}
	return on
}

// TestV1FavorDynMods: a v1 controller turns the kernel's cgroup
// favordynmods on with a mount of the named hierarchy, shared by the
// process's controllers, and the last Close unmounts it; NoFavorDynMods
// leaves the kernel alone; a mount left by a gateway that is gone is
// removed at the next start. What the option buys is a time
// (docs/PERFORMANCE.md), not tested here.
func TestV1FavorDynMods(t *testing.T) {
	first := realV1(t) // skips where there is no v1 to test
	a, err := Detect(Config{Name: "boxq-test-fa-" + strconv.Itoa(os.Getpid())})
	if err != nil {
		t.Fatal(err)
	}
	if !first.FavorDynMods() || !a.FavorDynMods() {
		t.Fatalf("FavorDynMods() = %v, %v; want true (Detect logs why not)", first.FavorDynMods(), a.FavorDynMods())
	}
	if !ownFavorMounted(t) {
		t.Fatal("no favordynmods mount of this process")
	}
	off, err := Detect(Config{Name: "boxq-test-fo-" + strconv.Itoa(os.Getpid()), NoFavorDynMods: true})
	if err != nil {
		t.Fatal(err)
	}
	if off.FavorDynMods() {
		t.Error("NoFavorDynMods: FavorDynMods() = true")
	}
	_ = off.Close()
	_ = a.Close()
	if !ownFavorMounted(t) {
		t.Error("the mount went while a controller still uses it")
	}
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
	if on, _ := mountedAt("/proc/self/mountinfo", stale); on {
		t.Errorf("the stale mount at %s is still there", stale)
	}
	if !c.FavorDynMods() || !ownFavorMounted(t) {
		t.Error("after removing the stale mount, no mount of its own")
	}
}
