package limits

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// MountTmpfs mounts a tmpfs of sizeMiB at dir: a sandbox's disk, living as
// long as the sandbox (bwrap starts once per exec, so a tmpfs of its own
// would vanish with each command). Writes past the size fail with ENOSPC.
// Its pages are memory: they count toward the memory limit of the cgroup
// that writes them.
func MountTmpfs(dir string, sizeMiB int) error {
	if sizeMiB <= 0 {
		return fmt.Errorf("limits: tmpfs size %d MiB", sizeMiB)
	}
	opts := fmt.Sprintf("size=%dm,mode=0755", sizeMiB)
	if err := unix.Mount("tmpfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
		return fmt.Errorf("limits: mount tmpfs on %s: %w", dir, err)
	}
	return nil
}

// MountOverlay mounts kernel overlayfs at merged: the read-only lower tree
// (a cached image rootfs, shared) under the sandbox's own upper tree. upper
// and work must be on one filesystem (the sandbox's disk).
func MountOverlay(lower, upper, work, merged string) error {
	for _, d := range []string{lower, upper, work, merged} {
		if strings.ContainsAny(d, ",:") {
			return fmt.Errorf("limits: overlay path %q has a ',' or ':'", d)
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lower, upper, work)
	if err := unix.Mount("overlay", merged, "overlay", unix.MS_NODEV, opts); err != nil {
		return fmt.Errorf("limits: mount overlay on %s: %w", merged, err)
	}
	return nil
}

// Unmount detaches the mount at dir; nothing mounted there is not an error.
func Unmount(dir string) error {
	err := unix.Unmount(dir, unix.MNT_DETACH)
	if err == nil || errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
		return nil
	}
	return fmt.Errorf("limits: unmount %s: %w", dir, err)
}

// CanMount says whether this process can mount a tmpfs and an overlay (root
// in the initial user namespace, or CAP_SYS_ADMIN), trying both in a
// scratch directory under dir.
func CanMount(dir string) error {
	tmp, err := os.MkdirTemp(dir, "mountcheck-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	disk := filepath.Join(tmp, "disk")
	if err := os.Mkdir(disk, 0o755); err != nil {
		return err
	}
	if err := MountTmpfs(disk, 1); err != nil {
		return err
	}
	defer Unmount(disk)
	lower, merged := filepath.Join(tmp, "lower"), filepath.Join(tmp, "merged")
	upper, work := filepath.Join(disk, "upper"), filepath.Join(disk, "work")
	for _, d := range []string{lower, merged, upper, work} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return err
		}
	}
	if err := MountOverlay(lower, upper, work, merged); err != nil {
		return err
	}
	return Unmount(merged)
}

// UnmountUnder detaches every mount at or below dir, the deepest first: what
// a gateway that crashed left of its sandboxes' disks and overlays, before
// their directories are removed.
func UnmountUnder(dir string) error {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return fmt.Errorf("limits: %w", err)
	}
	var points []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := unescapeMount(f[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			points = append(points, mp)
		}
	}
	var errs []error
	for i := len(points) - 1; i >= 0; i-- { // mountinfo lists parents first
		errs = append(errs, Unmount(points[i]))
	}
	return errors.Join(errs...)
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space …).
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
