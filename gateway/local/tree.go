package local

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"

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
// readable for the copy and given its mode back after. Both sides go by
// descriptors, so a tree deeper than PATH_MAX copies too.
func copyTree(src, dst string, own *owner) error {
	parent, err := unix.Open(filepath.Dir(src), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &fs.PathError{Op: "open", Path: filepath.Dir(src), Err: err}
	}
	defer unix.Close(parent)
	dstParent, err := unix.Open(filepath.Dir(dst), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return &fs.PathError{Op: "open", Path: filepath.Dir(dst), Err: err}
	}
	defer unix.Close(dstParent)
	c := &treeCopy{own: own, dstRoot: dst, rootFD: -1}
	return c.dirAt(parent, src, filepath.Base(src), dstParent, dst, filepath.Base(dst))
}

// treeCopy is the state of one copyTree.
type treeCopy struct {
	own     *owner
	dstRoot string // the copy's path
	rootFD  int    // the copy's directory, open while the copy runs
	// links maps a file with more than one link, by device and inode, to
	// the path of its copy from dstRoot: its other names in the source are
	// linked to that copy, not copied again. A file and a thousand links
	// to it cost a command its size once, and so does the copy.
	links     map[[2]uint64]string
	linkBytes int // the paths in links, bounded by maxLinkBytes
}

// maxLinkBytes bounds the memory links takes: beyond it, more links of a
// file not yet seen are copied as files.
const maxLinkBytes = 16 << 20

// dirAt copies the directory name in srcParent (at srcPath) to dstName
// in dstParent (at dstPath).
func (c *treeCopy) dirAt(srcParent int, srcPath, name string, dstParent int, dstPath, dstName string) error {
	own := c.own
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
	if err := unix.Mkdirat(dstParent, dstName, 0o700); err != nil {
		return &fs.PathError{Op: "mkdir", Path: dstPath, Err: err}
	}
	dfd, err := unix.Openat(dstParent, dstName, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return &fs.PathError{Op: "open", Path: dstPath, Err: err}
	}
	defer unix.Close(dfd)
	if c.rootFD < 0 {
		c.rootFD = dfd
	}
	copyOpaque(fd, dfd)
	names, err := readNames(fd, srcPath)
	if err != nil {
		return err
	}
	for _, n := range names {
		if err := c.entryAt(fd, filepath.Join(srcPath, n), n, dfd, filepath.Join(dstPath, n)); err != nil {
			return err
		}
	}
	if own != nil {
		if err := unix.Fchown(dfd, own.uid, own.gid); err != nil {
			return &fs.PathError{Op: "chown", Path: dstPath, Err: err}
		}
	}
	// The permission bits, and the sticky bit: a /tmp stays one.
	if err := unix.Fchmod(dfd, st.Mode&(0o777|unix.S_ISVTX)); err != nil {
		return &fs.PathError{Op: "chmod", Path: dstPath, Err: err}
	}
	return nil
}

// entryAt copies the entry name of the directory dirfd to the same name
// in dstDir.
func (c *treeCopy) entryAt(dirfd int, srcPath, name string, dstDir int, dstPath string) error {
	own := c.own
	var st unix.Stat_t
	if err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return &fs.PathError{Op: "stat", Path: srcPath, Err: err}
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return c.dirAt(dirfd, srcPath, name, dstDir, dstPath, name)
	case unix.S_IFREG:
		return c.fileAt(dirfd, srcPath, name, dstDir, dstPath, &st)
	case unix.S_IFCHR:
		if st.Rdev != 0 {
			return nil // a device: skipped
		}
		// A file of the image that the sandbox deleted (runtime.go): a
		// whiteout, mode 0, device 0:0, as overlayfs makes them.
		if err := unix.Mknodat(dstDir, name, unix.S_IFCHR, 0); err != nil {
			return &fs.PathError{Op: "mknod", Path: dstPath, Err: err}
		}
		if own != nil {
			if err := unix.Fchownat(dstDir, name, own.uid, own.gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return &fs.PathError{Op: "chown", Path: dstPath, Err: err}
			}
		}
	case unix.S_IFLNK:
		buf := make([]byte, unix.PathMax)
		n, err := unix.Readlinkat(dirfd, name, buf)
		if err != nil {
			return &fs.PathError{Op: "readlink", Path: srcPath, Err: err}
		}
		if err := unix.Symlinkat(string(buf[:n]), dstDir, name); err != nil {
			return &fs.PathError{Op: "symlink", Path: dstPath, Err: err}
		}
		if own != nil {
			if err := unix.Fchownat(dstDir, name, own.uid, own.gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return &fs.PathError{Op: "chown", Path: dstPath, Err: err}
			}
		}
	}
	return nil
}

// fileAt copies the regular file name of dirfd to the same name in
// dstDir, or links it to the copy of another of its names.
func (c *treeCopy) fileAt(dirfd int, srcPath, name string, dstDir int, dstPath string, st *unix.Stat_t) error {
	if st.Nlink < 2 || st.Size == 0 {
		return copyFileAt(dirfd, srcPath, name, dstDir, dstPath, st, c.own)
	}
	key := [2]uint64{st.Dev, st.Ino}
	if first, ok := c.links[key]; ok {
		if unix.Linkat(c.rootFD, first, dstDir, name, 0) == nil {
			return nil
		}
		// Its first copy is out of reach (a directory of the copy the
		// gateway cannot search, a path too long): copy it again.
	}
	if err := copyFileAt(dirfd, srcPath, name, dstDir, dstPath, st, c.own); err != nil {
		return err
	}
	rel, err := filepath.Rel(c.dstRoot, dstPath)
	if _, seen := c.links[key]; err == nil && !seen && len(rel) < unix.PathMax && c.linkBytes+len(rel) <= maxLinkBytes {
		if c.links == nil {
			c.links = make(map[[2]uint64]string)
		}
		c.links[key] = rel
		c.linkBytes += len(rel)
	}
	return nil
}

// copyFileAt copies the regular file name of dirfd to the same name in
// dstDir.
func copyFileAt(dirfd int, srcPath, name string, dstDir int, dstPath string, st *unix.Stat_t, own *owner) error {
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
	ofd, err := unix.Openat(dstDir, name, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
	if err != nil {
		return &fs.PathError{Op: "open", Path: dstPath, Err: err}
	}
	out := os.NewFile(uintptr(ofd), dstPath)
	if err := copyData(out, in, fd, st.Size); err != nil {
		out.Close()
		return fmt.Errorf("copy %s: %w", srcPath, err)
	}
	if own != nil {
		if err := unix.Fchown(ofd, own.uid, own.gid); err != nil {
			out.Close()
			return &fs.PathError{Op: "chown", Path: dstPath, Err: err}
		}
	}
	// Setuid and setgid are dropped: a restored file must not carry more
	// rights than its sandbox user has.
	if err := unix.Fchmod(ofd, st.Mode&0o777); err != nil {
		out.Close()
		return &fs.PathError{Op: "chmod", Path: dstPath, Err: err}
	}
	if err := out.Close(); err != nil {
		return err
	}
	if err := unix.UtimesNanoAt(dstDir, name, []unix.Timespec{st.Mtim, st.Mtim}, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return &fs.PathError{Op: "chtimes", Path: dstPath, Err: err}
	}
	return nil
}

// copyData copies the size bytes of in (open at fd) to out, an empty
// file, and only its data: its holes stay holes. A sparse file costs a
// command nothing (truncate -s 10T), and a copy that wrote its zeros out
// would fill the host's disk. Where the file system cannot say where the
// data is, everything is copied.
func copyData(out, in *os.File, fd int, size int64) error {
	for off := int64(0); off < size; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			break // nothing but a hole up to the end
		}
		hole := size
		if err != nil {
			data = off
		} else if h, err := unix.Seek(fd, data, unix.SEEK_HOLE); err == nil {
			hole = min(h, size)
		}
		if data >= hole {
			break
		}
		if _, err := in.Seek(data, io.SeekStart); err != nil {
			return err
		}
		if _, err := out.Seek(data, io.SeekStart); err != nil {
			return err
		}
		// The file may have shrunk since its size was taken: what is
		// there is copied.
		if _, err := io.CopyN(out, in, hole-data); err != nil && !errors.Is(err, io.EOF) {
			return err
		}
		off = hole
	}
	// A hole at the end has no data to write: the size makes it.
	return out.Truncate(size)
}
