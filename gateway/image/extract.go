package image

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"strings"

	"golang.org/x/sys/unix"
)

// Extraction of a flattened image filesystem (mutate.Extract's tar) into a
// directory. Layers come from anywhere, so every name is treated as hostile:
// each path is resolved with openat2(RESOLVE_IN_ROOT), which resolves ".." and
// symlinks (absolute ones included) as if the rootfs were "/", the way a
// container runtime sees them. Nothing can be created, linked to or written
// outside the root, whatever order the entries come in.

// extractLimits bound what one image may write.
type extractLimits struct {
	maxFileBytes  int64
	maxTotalBytes int64
	owner         *Owner // every file's owner; nil: the layer's (as root)
}

// extractStats counts what extraction skipped, for the log.
type extractStats struct {
	files, skippedDevices, skippedWhiteouts, skippedUnsafe int
	bytes                                                  int64
}

// errTooLarge marks an image over a size cap.
var errTooLarge = errors.New("image too large")

func extract(r io.Reader, root string, lim extractLimits) (extractStats, error) {
	var st extractStats
	rootFD, err := unix.Open(root, unix.O_DIRECTORY|unix.O_PATH|unix.O_CLOEXEC, 0)
	if err != nil {
		return st, fmt.Errorf("open rootfs %s: %w", root, err)
	}
	defer unix.Close(rootFD)
	x := &extractor{root: rootFD, lim: lim, st: &st, chown: os.Geteuid() == 0 || lim.owner != nil}

	// A hard link can come before its target: the flattened stream lists the
	// top layer first, so a link in an upper layer to a file of a lower one
	// is seen before the file. Such links are retried at the end.
	var deferred []*tar.Header
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			// mutate.Extract writes the tar trailer even when it stops on
			// an error (an unsafe path in a layer), and reports the error
			// only on the pipe after it: read on, or a truncated image
			// would pass for a whole one.
			if _, err := io.Copy(io.Discard, r); err != nil {
				return st, fmt.Errorf("flatten layers: %w", err)
			}
			break
		}
		if err != nil {
			return st, fmt.Errorf("read layer tar: %w", err)
		}
		name, ok := cleanName(hdr.Name)
		if !ok {
			st.skippedUnsafe++
			continue
		}
		if name == "" { // the root itself
			continue
		}
		if strings.HasPrefix(path.Base(name), ".wh.") {
			// mutate.Extract applies whiteouts; one left over must not
			// become a file.
			st.skippedWhiteouts++
			continue
		}
		if hdr.Typeflag == tar.TypeLink {
			if err := x.link(name, hdr); err != nil {
				deferred = append(deferred, hdr)
			}
			continue
		}
		if err := x.entry(name, hdr, tr); err != nil {
			return st, fmt.Errorf("extract %q: %w", hdr.Name, err)
		}
	}
	for _, hdr := range deferred {
		name, _ := cleanName(hdr.Name)
		if err := x.link(name, hdr); err != nil {
			return st, fmt.Errorf("extract hard link %q -> %q: %w", hdr.Name, hdr.Linkname, err)
		}
	}
	return st, nil
}

// cleanName makes a tar name relative to the root. Names that climb out with
// ".." are refused outright (RESOLVE_IN_ROOT would clamp them, but no honest
// layer has them).
func cleanName(n string) (string, bool) {
	for _, part := range strings.Split(n, "/") {
		if part == ".." {
			return "", false
		}
	}
	c := path.Clean("/" + n)
	return strings.TrimPrefix(c, "/"), true
}

type extractor struct {
	root  int
	lim   extractLimits
	st    *extractStats
	chown bool
}

// openInRoot opens a directory of the rootfs, resolving the name as if the
// root were "/".
func (x *extractor) openInRoot(name string) (int, error) {
	if name == "" || name == "." {
		name = "."
	}
	return unix.Openat2(x.root, name, &unix.OpenHow{
		Flags:   unix.O_DIRECTORY | unix.O_PATH | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS,
	})
}

// parent returns an fd of name's parent directory (created as needed, inside
// the root) and name's last element.
func (x *extractor) parent(name string) (int, string, error) {
	dir, base := path.Split(name)
	dir = strings.TrimSuffix(dir, "/")
	fd, err := x.openInRoot(dir)
	if err == nil {
		return fd, base, nil
	}
	if !errors.Is(err, unix.ENOENT) {
		return -1, "", err
	}
	// Create the missing directories one by one, each resolved from the
	// root (so a symlink met on the way is followed inside the root).
	parts := strings.Split(dir, "/")
	fd, err = x.openInRoot(".")
	if err != nil {
		return -1, "", err
	}
	for i, part := range parts {
		prefix := strings.Join(parts[:i+1], "/")
		next, err := x.openInRoot(prefix)
		if errors.Is(err, unix.ENOENT) {
			merr := unix.Mkdirat(fd, part, 0o755)
			if merr == nil && x.lim.owner != nil {
				// The Owner's like the rest, or the sandbox (root
				// only over the Owner's files) could not write here.
				merr = unix.Fchownat(fd, part, x.lim.owner.UID, x.lim.owner.GID, unix.AT_SYMLINK_NOFOLLOW)
			}
			if merr != nil && !errors.Is(merr, unix.EEXIST) {
				unix.Close(fd)
				return -1, "", merr
			}
			next, err = x.openInRoot(prefix)
		}
		unix.Close(fd)
		if err != nil {
			// A dangling symlink where a directory should be: refuse
			// rather than guess.
			return -1, "", fmt.Errorf("parent %q: %w", prefix, err)
		}
		fd = next
	}
	return fd, base, nil
}

func (x *extractor) entry(name string, hdr *tar.Header, r io.Reader) error {
	switch hdr.Typeflag {
	case tar.TypeChar, tar.TypeBlock:
		// Device nodes give access to host hardware; a sandbox needs
		// none from its image (bwrap provides /dev).
		x.st.skippedDevices++
		return nil
	case tar.TypeDir, tar.TypeReg, tar.TypeSymlink, tar.TypeFifo:
		// (tar.Reader turns the old TypeRegA into TypeReg.)
	default:
		x.st.skippedUnsafe++
		return nil
	}
	pfd, base, err := x.parent(name)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	// Strip setuid/setgid: the rootfs is shared by every sandbox and the
	// sandboxes run with no_new_privs anyway.
	mode := uint32(hdr.Mode) & 0o1777

	switch hdr.Typeflag {
	case tar.TypeDir:
		err := unix.Mkdirat(pfd, base, mode)
		if errors.Is(err, unix.EEXIST) {
			var s unix.Stat_t
			if err := unix.Fstatat(pfd, base, &s, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return err
			}
			if s.Mode&unix.S_IFMT != unix.S_IFDIR {
				if err := unix.Unlinkat(pfd, base, 0); err != nil {
					return err
				}
				err = unix.Mkdirat(pfd, base, mode)
			} else {
				err = nil
			}
		}
		if err != nil {
			return err
		}
	case tar.TypeReg:
		if hdr.Size > x.lim.maxFileBytes {
			return fmt.Errorf("%w: file of %d bytes over the %d-byte cap", errTooLarge, hdr.Size, x.lim.maxFileBytes)
		}
		if x.st.bytes+hdr.Size > x.lim.maxTotalBytes {
			return fmt.Errorf("%w: over the %d-byte cap for a whole image", errTooLarge, x.lim.maxTotalBytes)
		}
		if err := x.unlink(pfd, base); err != nil {
			return err
		}
		fd, err := unix.Openat(pfd, base, unix.O_WRONLY|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return err
		}
		f := os.NewFile(uintptr(fd), name)
		n, err := io.Copy(f, io.LimitReader(r, hdr.Size))
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
		if n != hdr.Size {
			return fmt.Errorf("short file: %d of %d bytes", n, hdr.Size)
		}
		x.st.files++
		x.st.bytes += n
	case tar.TypeSymlink:
		// The target is stored as written: it is only ever resolved inside
		// the root (here with RESOLVE_IN_ROOT, in a sandbox as its "/").
		if err := x.unlink(pfd, base); err != nil {
			return err
		}
		if err := unix.Symlinkat(hdr.Linkname, pfd, base); err != nil {
			return err
		}
	case tar.TypeFifo:
		if err := x.unlink(pfd, base); err != nil {
			return err
		}
		if err := unix.Mknodat(pfd, base, unix.S_IFIFO|mode, 0); err != nil {
			return err
		}
	}
	return x.meta(pfd, base, hdr, mode)
}

// unlink removes whatever is at base, unless it is a directory (a later entry
// of the same name never replaces a directory with its contents).
func (x *extractor) unlink(pfd int, base string) error {
	err := unix.Unlinkat(pfd, base, 0)
	if err == nil || errors.Is(err, unix.ENOENT) {
		return nil
	}
	if errors.Is(err, unix.EISDIR) {
		return unix.Unlinkat(pfd, base, unix.AT_REMOVEDIR)
	}
	return err
}

func (x *extractor) meta(pfd int, base string, hdr *tar.Header, mode uint32) error {
	if x.chown {
		uid, gid := hdr.Uid, hdr.Gid
		if o := x.lim.owner; o != nil {
			uid, gid = o.UID, o.GID
		}
		if err := unix.Fchownat(pfd, base, uid, gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return err
		}
	}
	if hdr.Typeflag != tar.TypeSymlink {
		// chown clears setuid bits, so the mode goes after it.
		if err := unix.Fchmodat(pfd, base, mode, 0); err != nil {
			return err
		}
	}
	ts := []unix.Timespec{unix.NsecToTimespec(hdr.ModTime.UnixNano()), unix.NsecToTimespec(hdr.ModTime.UnixNano())}
	return unix.UtimesNanoAt(pfd, base, ts, unix.AT_SYMLINK_NOFOLLOW)
}

// link makes a hard link whose target is resolved inside the root, so a link
// can never reach a file outside it.
func (x *extractor) link(name string, hdr *tar.Header) error {
	target, ok := cleanName(hdr.Linkname)
	if !ok || target == "" {
		x.st.skippedUnsafe++
		return nil
	}
	tfd, tbase, err := x.parentNoCreate(target)
	if err != nil {
		return err
	}
	defer unix.Close(tfd)
	pfd, base, err := x.parent(name)
	if err != nil {
		return err
	}
	defer unix.Close(pfd)
	if err := x.unlink(pfd, base); err != nil {
		return err
	}
	// No AT_SYMLINK_FOLLOW: a link to a symlink links the symlink itself.
	return unix.Linkat(tfd, tbase, pfd, base, 0)
}

func (x *extractor) parentNoCreate(name string) (int, string, error) {
	dir, base := path.Split(name)
	fd, err := x.openInRoot(strings.TrimSuffix(dir, "/"))
	return fd, base, err
}
