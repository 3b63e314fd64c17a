package local

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sys/unix"
)

// A command may leave anything in its sandbox: directories it cannot be
// listed or entered (chmod 000, the 555 of a Go module cache), fifos,
// sockets, symlinks to anywhere. The gateway must still remove, snapshot
// and restore the tree, and never be led out of it by a symlink. So the
// walks below go by file descriptors relative to their parent, opened with
// O_NOFOLLOW, and restore the permission bits they need (the owner's, which
// the gateway has on files its sandbox user made) before they look inside.

// removeTree removes path and everything under it, whatever the modes and
// file types inside. A symlink is removed, never followed.
func removeTree(path string) error {
	if err := os.RemoveAll(path); err == nil {
		return nil
	}
	parent, err := unix.Open(filepath.Dir(path), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &fs.PathError{Op: "open", Path: filepath.Dir(path), Err: err}
	}
	defer unix.Close(parent)
	return removeAt(parent, filepath.Dir(path), filepath.Base(path))
}

// removeAt removes name in the directory dirfd (at dirPath, for messages).
func removeAt(dirfd int, dirPath, name string) error {
	path := filepath.Join(dirPath, name)
	err := unix.Unlinkat(dirfd, name, 0)
	switch {
	case err == nil, errors.Is(err, unix.ENOENT):
		return nil
	case !errors.Is(err, unix.EISDIR) && !errors.Is(err, unix.EPERM):
		return &fs.PathError{Op: "unlink", Path: path, Err: err}
	}
	// A directory: make it listable and writable, empty it, remove it.
	fd, err := openDirAt(dirfd, name, path)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return err
	}
	names, err := readNames(fd, path)
	var errs []error
	if err != nil {
		errs = append(errs, err)
	}
	for _, n := range names {
		if err := removeAt(fd, path, n); err != nil {
			errs = append(errs, err)
		}
	}
	unix.Close(fd)
	if err := unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR); err != nil && !errors.Is(err, unix.ENOENT) {
		errs = append(errs, &fs.PathError{Op: "rmdir", Path: path, Err: err})
	}
	return errors.Join(errs...)
}

// openDirAt opens the directory name in dirfd for reading, without
// following a symlink, first giving its owner rwx on it if it lacks them.
// It fails with ENOTDIR or ELOOP on anything but a directory.
func openDirAt(dirfd int, name, path string) (int, error) {
	const flags = unix.O_RDONLY | unix.O_DIRECTORY | unix.O_NOFOLLOW | unix.O_CLOEXEC
	fd, err := unix.Openat(dirfd, name, flags, 0)
	if err == nil {
		if err := ensureOwnerBits(fd, path, 0o700); err != nil {
			unix.Close(fd)
			return -1, err
		}
		return fd, nil
	}
	if !errors.Is(err, unix.EACCES) {
		return -1, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	// Not readable: chmod it through an O_PATH descriptor, which needs no
	// permission on the directory and cannot be a symlink's target.
	pfd, err := unix.Openat(dirfd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFDIR {
		unix.Close(pfd)
		return -1, &fs.PathError{Op: "open", Path: path, Err: unix.ENOTDIR}
	}
	err = chmodFD(pfd, st.Mode&0o7777|0o700)
	unix.Close(pfd)
	if err != nil {
		return -1, &fs.PathError{Op: "chmod", Path: path, Err: err}
	}
	fd, err = unix.Openat(dirfd, name, flags, 0)
	if err != nil {
		return -1, &fs.PathError{Op: "open", Path: path, Err: err}
	}
	return fd, nil
}

// ensureOwnerBits gives the owner of the open file fd the bits want, if it
// lacks any of them.
func ensureOwnerBits(fd int, path string, want uint32) error {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return &fs.PathError{Op: "stat", Path: path, Err: err}
	}
	if st.Mode&want == want {
		return nil
	}
	if err := chmodFD(fd, st.Mode&0o7777|want); err != nil {
		return &fs.PathError{Op: "chmod", Path: path, Err: err}
	}
	return nil
}

// chmodFD changes the mode of the file open at fd, an O_PATH descriptor
// included (through its /proc/self/fd link, as fchmod cannot).
func chmodFD(fd int, mode uint32) error {
	return unix.Chmod("/proc/self/fd/"+strconv.Itoa(fd), mode)
}

// readNames lists the directory open at fd, without closing it.
func readNames(fd int, path string) ([]string, error) {
	dup, err := unix.Dup(fd)
	if err != nil {
		return nil, &fs.PathError{Op: "dup", Path: path, Err: err}
	}
	unix.CloseOnExec(dup)
	f := os.NewFile(uintptr(dup), path)
	defer f.Close()
	return f.Readdirnames(-1)
}

// owner is who the copies of a tree belong to: the sandbox user, when the
// gateway runs as root; nil keeps the gateway's own.
type owner struct{ uid, gid int }

// copyTree copies the directory src to dst, which must not exist: only
// directories, regular files and symbolic links (never followed), with
// their permission bits (setuid and setgid dropped) and the files'
// modification times, owned by own when it is not nil. Other kinds of
// files (sockets, fifos, devices) are skipped: they do not survive a
// snapshot. A source directory or file its owner cannot read is made
// readable for the copy and given its mode back after.
func copyTree(src, dst string, own *owner) error {
	parent, err := unix.Open(filepath.Dir(src), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &fs.PathError{Op: "open", Path: filepath.Dir(src), Err: err}
	}
	defer unix.Close(parent)
	return copyDirAt(parent, src, filepath.Base(src), dst, own)
}

// copyDirAt copies the directory name in srcParent (at srcPath) to dst.
func copyDirAt(srcParent int, srcPath, name, dst string, own *owner) error {
	var st unix.Stat_t
	if err := unix.Fstatat(srcParent, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return &fs.PathError{Op: "stat", Path: srcPath, Err: err}
	}
	fd, err := openDirAt(srcParent, name, srcPath)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	// openDirAt may have added the owner's rwx: give the source its mode back.
	if mode := st.Mode & 0o7777; mode&0o700 != 0o700 {
		defer chmodFD(fd, mode) //nolint:errcheck // best effort: the copy is what matters
	}
	// Writable until its contents are in; its own mode comes last.
	if err := os.Mkdir(dst, 0o700); err != nil {
		return err
	}
	names, err := readNames(fd, srcPath)
	if err != nil {
		return err
	}
	for _, n := range names {
		if err := copyEntryAt(fd, filepath.Join(srcPath, n), n, filepath.Join(dst, n), own); err != nil {
			return err
		}
	}
	if own != nil {
		if err := os.Lchown(dst, own.uid, own.gid); err != nil {
			return err
		}
	}
	perm := fs.FileMode(st.Mode & 0o777)
	if st.Mode&unix.S_ISVTX != 0 {
		perm |= fs.ModeSticky // a /tmp stays one
	}
	return os.Chmod(dst, perm)
}

// copyEntryAt copies the entry name of the directory dirfd.
func copyEntryAt(dirfd int, srcPath, name, dst string, own *owner) error {
	var st unix.Stat_t
	if err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return &fs.PathError{Op: "stat", Path: srcPath, Err: err}
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return copyDirAt(dirfd, srcPath, name, dst, own)
	case unix.S_IFREG:
		return copyFileAt(dirfd, srcPath, name, dst, &st, own)
	case unix.S_IFLNK:
		buf := make([]byte, unix.PathMax)
		n, err := unix.Readlinkat(dirfd, name, buf)
		if err != nil {
			return &fs.PathError{Op: "readlink", Path: srcPath, Err: err}
		}
		if err := os.Symlink(string(buf[:n]), dst); err != nil {
			return err
		}
		if own != nil {
			return os.Lchown(dst, own.uid, own.gid)
		}
	}
	return nil
}

// copyFileAt copies the regular file name of dirfd to dst.
func copyFileAt(dirfd int, srcPath, name, dst string, st *unix.Stat_t, own *owner) error {
	const flags = unix.O_RDONLY | unix.O_NOFOLLOW | unix.O_CLOEXEC | unix.O_NONBLOCK
	fd, err := unix.Openat(dirfd, name, flags, 0)
	if errors.Is(err, unix.EACCES) {
		// Unreadable to its owner: chmod it for the copy, and back.
		pfd, perr := unix.Openat(dirfd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if perr != nil {
			return &fs.PathError{Op: "open", Path: srcPath, Err: perr}
		}
		defer unix.Close(pfd)
		if err := chmodFD(pfd, st.Mode&0o7777|0o400); err != nil {
			return &fs.PathError{Op: "chmod", Path: srcPath, Err: err}
		}
		defer chmodFD(pfd, st.Mode&0o7777) //nolint:errcheck // best effort
		fd, err = unix.Openat(dirfd, name, flags, 0)
	}
	if err != nil {
		return &fs.PathError{Op: "open", Path: srcPath, Err: err}
	}
	in := os.NewFile(uintptr(fd), srcPath)
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("copy %s: %w", srcPath, err)
	}
	if err := out.Close(); err != nil {
		return err
	}
	if own != nil {
		if err := os.Lchown(dst, own.uid, own.gid); err != nil {
			return err
		}
	}
	// Setuid and setgid are dropped: a restored file must not carry more
	// rights than its sandbox user has.
	if err := os.Chmod(dst, fs.FileMode(st.Mode&0o777)); err != nil {
		return err
	}
	mtime := time.Unix(st.Mtim.Unix())
	return os.Chtimes(dst, mtime, mtime)
}
