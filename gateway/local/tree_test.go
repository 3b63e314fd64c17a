package local

import (
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

// TestTreeOps checks removeTree and copyTree on what a command may leave:
// unreadable and unwritable directories, fifos, sockets, setuid files and
// symlinks out of the tree, which must never be followed.
func TestTreeOps(t *testing.T) {
	outside := t.TempDir()
	victim := filepath.Join(outside, "victim")
	if err := os.WriteFile(victim, []byte("keep"), 0o600); err != nil {
		t.Fatal(err)
	}
	build := func(t *testing.T) string {
		t.Helper()
		root := filepath.Join(t.TempDir(), "tree")
		must := func(err error) {
			t.Helper()
			if err != nil {
				t.Fatal(err)
			}
		}
		must(os.MkdirAll(filepath.Join(root, "ro", "a"), 0o755))
		must(os.WriteFile(filepath.Join(root, "ro", "a", "f"), []byte("f"), 0o000))
		must(os.Chmod(filepath.Join(root, "ro", "a"), 0o555))
		must(os.Mkdir(filepath.Join(root, "secret"), 0o755))
		must(os.WriteFile(filepath.Join(root, "secret", "s"), []byte("s"), 0o600))
		must(os.Chmod(filepath.Join(root, "secret"), 0o000))
		must(syscall.Mkfifo(filepath.Join(root, "fifo"), 0o644))
		ln, err := net.Listen("unix", filepath.Join(root, "sock"))
		must(err)
		ln.(*net.UnixListener).SetUnlinkOnClose(false)
		ln.Close()
		must(os.WriteFile(filepath.Join(root, "suid"), []byte("#!/bin/sh\n"), 0o755))
		must(os.Chmod(filepath.Join(root, "suid"), 0o4755))
		must(os.Symlink(outside, filepath.Join(root, "out")))
		must(os.Symlink(victim, filepath.Join(root, "victim")))
		must(os.Chmod(root, 0o500))
		return root
	}

	t.Run("copy", func(t *testing.T) {
		src := build(t)
		dst := filepath.Join(t.TempDir(), "copy")
		if err := copyTree(src, dst, nil); err != nil {
			t.Fatalf("copyTree: %v", err)
		}
		for path, want := range map[string]os.FileMode{
			"":       os.ModeDir | 0o500,
			"ro/a":   os.ModeDir | 0o555,
			"ro/a/f": 0o000,
			"secret": os.ModeDir, // 000
			"suid":   0o755,      // the setuid bit dropped
			"out":    os.ModeSymlink | 0o777,
			"victim": os.ModeSymlink | 0o777,
		} {
			fi, err := os.Lstat(filepath.Join(dst, path))
			if err != nil {
				t.Errorf("%s: %v", path, err)
				continue
			}
			if fi.Mode() != want {
				t.Errorf("%s: got mode %v, want %v", path, fi.Mode(), want)
			}
		}
		for _, gone := range []string{"fifo", "sock"} {
			if _, err := os.Lstat(filepath.Join(dst, gone)); err == nil {
				t.Errorf("%s: copied, want special files skipped", gone)
			}
		}
		// The source has its modes back.
		if fi, err := os.Lstat(filepath.Join(src, "secret")); err != nil || fi.Mode().Perm() != 0 {
			t.Errorf("source secret: got %v, %v; want its mode 000 back", fi.Mode(), err)
		}
		if err := removeTree(dst); err != nil {
			t.Errorf("removeTree of the copy: %v", err)
		}
	})
	t.Run("remove", func(t *testing.T) {
		src := build(t)
		if err := removeTree(src); err != nil {
			t.Fatalf("removeTree: %v", err)
		}
		if _, err := os.Lstat(src); err == nil {
			t.Errorf("%s still there", src)
		}
		if data, err := os.ReadFile(victim); err != nil || string(data) != "keep" {
			t.Errorf("the symlinks' targets: got %q, %v; want them untouched", data, err)
		}
		if err := removeTree(src); err != nil {
			t.Errorf("removeTree of nothing: %v", err)
		}
	})
}
