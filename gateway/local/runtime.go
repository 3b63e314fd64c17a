package local

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/gateway/image"
	"github.com/boxq/boxq/gateway/limits"
)

// resources are what a sandbox can get beyond its directory: an image as
// its root, cgroup limits, a size-limited disk. Built once by New.
type resources struct {
	images   *image.Store       // nil: no image source configured
	cgroups  *limits.Controller // nil: limits off
	canMount error              // why the gateway cannot mount (disks, overlays), or nil
	holds    limits.Holds       // what the gateway can enforce at all
}

// sandboxRuntime is one sandbox's share of the resources.
type sandboxRuntime struct {
	requested string       // the image the create named ("" none)
	image     *image.Image // the image applied; nil: the host's root
	imageNote string       // why no image was applied, when none was
	disk      string       // dir/disk: holds fs (home, tmp, overlay upper) and work
	diskMiB   int          // the tmpfs size mounted at disk; 0: a plain directory
	rootfs    string       // the overlay, the sandbox's "/"; "" for the host's root
	group     *limits.Group
	memoryMiB int
	holds     limits.Holds
}

// setupResources prepares images and limits and says, once, what holds.
func (s *Server) setupResources() error {
	r := &resources{}
	s.res = r
	r.canMount = limits.CanMount(s.runDir)
	if r.canMount == nil {
		r.holds.Disk = true
	} else {
		s.log.Warn("limits: diskMiB not enforced: the gateway cannot mount a per-sandbox filesystem (it needs root)", "error", r.canMount)
	}
	if !s.cfg.NoCgroups {
		shim := s.cfg.CgroupShim
		if shim == "" {
			// An embedded gateway (worker -dev) is in a binary whose main
			// does not run limits.RunShim: the v1 shim is sh's or none.
			shim = "-"
		}
		c, err := limits.Detect(limits.Config{ShimPath: shim, NoFavorDynMods: s.cfg.NoFavorDynMods, Logger: s.log})
		if err != nil {
			return fmt.Errorf("local: limits: %w", err)
		}
		var shimErr error
		if c.Mode() == limits.ModeV1 {
			// The shim runs with the exec's credentials: the sandbox
			// user's, when there is one.
			var cred *syscall.Credential
			if u := s.launcher.user; u != nil {
				cred = &syscall.Credential{Uid: uint32(u.uid), Gid: uint32(u.gid), Groups: []uint32{}}
			}
			shimErr = c.ProbeShim(cred)
		}
		switch {
		case c.Mode() == limits.ModeNone:
			_ = c.Close()
		case shimErr != nil:
			_ = c.Close()
			s.log.Warn("limits: memoryMiB, cpu and pids not enforced: the sandbox user can run neither /bin/sh nor the gateway's binary, one of which the cgroup v1 shim runs in: make one of them and its directories readable and executable by all",
				"error", shimErr)
		default:
			r.cgroups = c
			h := c.Holds()
			r.holds.Memory, r.holds.CPU, r.holds.Pids = h.Memory, h.CPU, h.Pids
		}
		for _, why := range c.Why() {
			s.log.Warn("limits: " + why)
		}
	}
	if s.cfg.ImagesDir != "" || s.cfg.Pull {
		if s.launcher.mode != IsolationBwrap {
			return errors.New("local: images need bubblewrap isolation (the image is the sandbox's root)")
		}
		if r.canMount != nil {
			return fmt.Errorf("local: images need a per-sandbox overlay mount, and the gateway cannot mount (run it as root): %w", r.canMount)
		}
		cache := s.cfg.ImageCacheDir
		if cache == "" {
			cache = filepath.Join(s.stateDir, "images")
		}
		var own *image.Owner
		if u := s.launcher.user; u != nil {
			// The sandbox user owns the image's files, as root owns them
			// in a container: it is root in its user namespace (imageRun).
			own = &image.Owner{UID: u.uid, GID: u.gid}
		}
		st, err := image.New(image.Config{Dir: s.cfg.ImagesDir, Pull: s.cfg.Pull, CacheDir: cache, Logger: s.log, Owner: own})
		if err != nil {
			return fmt.Errorf("local: %w", err)
		}
		r.images = st
	}
	mode, shim := limits.ModeNone, ""
	if r.cgroups != nil {
		mode = r.cgroups.Mode()
		if mode == limits.ModeV1 {
			shim = r.cgroups.Shim()
		}
	}
	imgs := "none (the host's root, read-only)"
	if r.images != nil {
		imgs = r.images.Sources()
	}
	s.log.Info("sandbox resources", "images", imgs, "image_default", s.cfg.ImageDefault,
		"image_fallback_host", s.cfg.ImageFallbackHost, "cgroups", mode, "cgroup_shim", shim,
		"memory", r.holds.Memory, "cpu", r.holds.CPU, "pids", r.holds.Pids, "max_pids", s.cfg.MaxPids, "disk", r.holds.Disk)
	return nil
}

// closeResources removes the gateway's parent cgroups.
func (s *Server) closeResources() {
	if s.res != nil && s.res.cgroups != nil {
		if err := s.res.cgroups.Close(); err != nil {
			s.log.Warn("limits: remove cgroups", "error", err)
		}
	}
}

// resolveImage decides the image of a create: a 400 for an image that
// cannot be resolved, unless the host's root is the configured fallback.
func (s *Server) resolveImage(requested string) (*image.Image, string, error) {
	name := requested
	if name == "" {
		name = s.cfg.ImageDefault
	}
	switch {
	case s.res.images == nil:
		return nil, "no image source configured (-images, -pull): the host's root", nil
	case name == "":
		return nil, "no image named and no -image-default: the host's root", nil
	}
	// Not the client's context: others may be waiting on the same unpack.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	img, err := s.res.images.Resolve(ctx, name)
	var re *image.ResolveError
	switch {
	case err == nil:
		return img, "", nil
	case errors.As(err, &re) && s.cfg.ImageFallbackHost:
		return nil, err.Error() + "; -image-fallback host: the host's root", nil
	case errors.As(err, &re), errors.Is(err, image.ErrBadImage):
		// Permanent: boxq ends the job with this message, no retry.
		return nil, "", &apiError{status: http.StatusBadRequest, msg: err.Error()}
	}
	return nil, "", fmt.Errorf("image %q: %w", name, err)
}

// prepareRuntime gives a new sandbox its disk, its image root and its
// cgroup. dirs is where makeSandboxDir put its files (dir/fs); the returned
// dirs are where they are now.
func (s *Server) prepareRuntime(id, dir string, req createSpec, img *image.Image, note string, dirs fsDirs) (*sandboxRuntime, fsDirs, error) {
	rt := &sandboxRuntime{requested: req.image, image: img, imageNote: note, memoryMiB: req.memoryMiB}
	res := s.res
	if img != nil || (req.diskMiB > 0 && res.canMount == nil) {
		rt.disk = filepath.Join(dir, "disk")
		// Traversable: bwrap, as the sandbox user, binds what is in it.
		if err := os.Mkdir(rt.disk, 0o711); err != nil {
			return rt, dirs, err
		}
		if req.diskMiB > 0 && res.canMount == nil {
			if err := limits.MountTmpfs(rt.disk, req.diskMiB); err != nil {
				return rt, dirs, err
			}
			rt.diskMiB = req.diskMiB
			rt.holds.Disk = true
		}
		// The sandbox's files move onto its disk: a copy onto a tmpfs (a
		// restored snapshot must fit), a rename otherwise.
		fsDir, _ := fsLayout(dir)
		onDisk := filepath.Join(rt.disk, "fs")
		if rt.diskMiB > 0 {
			if err := copyTree(fsDir, onDisk, s.launcher.user); err != nil {
				return rt, dirs, fmt.Errorf("sandbox files onto its %d MiB disk: %w", rt.diskMiB, err)
			}
			if err := removeTree(fsDir); err != nil {
				return rt, dirs, err
			}
		} else if err := os.Rename(fsDir, onDisk); err != nil {
			return rt, dirs, err
		}
		dirs = fsDirs{home: filepath.Join(onDisk, "root"), tmp: filepath.Join(onDisk, "tmp")}
	}
	if img != nil {
		upper := filepath.Join(rt.disk, "fs", "upper")
		work := filepath.Join(rt.disk, "work")
		rt.rootfs = filepath.Join(dir, "rootfs")
		for _, d := range []string{upper, work, rt.rootfs} {
			if err := os.MkdirAll(d, 0o755); err != nil {
				return rt, dirs, err
			}
		}
		if u := s.launcher.user; u != nil {
			// The overlay's root directory is its upper one's: the sandbox
			// user's, like the rest of the image.
			if err := os.Lchown(upper, u.uid, u.gid); err != nil {
				return rt, dirs, err
			}
		}
		if err := limits.MountOverlay(img.Rootfs, upper, work, rt.rootfs); err != nil {
			rt.rootfs = ""
			return rt, dirs, err
		}
		// bwrap binds /root and /tmp onto the image's: they must exist.
		for _, d := range []string{sandboxHome, sandboxTmp} {
			if err := os.MkdirAll(filepath.Join(rt.rootfs, d), 0o755); err != nil {
				return rt, dirs, err
			}
		}
		// A container runtime makes a WorkingDir the image lacks; without
		// it every exec's chdir would fail. (Only when it is the cwd: one
		// a restored sandbox deleted stays deleted otherwise.)
		if img.WorkingDir != "" && req.cwd == img.WorkingDir {
			if err := mkdirInRoot(rt.rootfs, img.WorkingDir, s.launcher.user); err != nil {
				return rt, dirs, &apiError{status: http.StatusBadRequest, msg: fmt.Sprintf("image %q: WorkingDir %q: %v", req.image, img.WorkingDir, err)}
			}
		}
		uid, gid, err := imageUser(img.Rootfs, img.User)
		if err != nil {
			return rt, dirs, &apiError{status: http.StatusBadRequest, msg: fmt.Sprintf("image %q: %v", req.image, err)}
		}
		dirs.image = &imageRun{root: rt.rootfs, env: img.Env, uid: uid, gid: gid, mapUser: s.launcher.user != nil}
	}
	spec := limits.Spec{MemoryMiB: req.memoryMiB, CPU: req.cpu, Pids: s.cfg.MaxPids}
	if spec.MemoryMiB > 0 {
		// The disk's tmpfs pages are charged to the memory cgroup of the
		// process writing them, stay charged after it exits, and cannot be
		// reclaimed (no swap). Within memoryMiB alone, a disk filled past it
		// would be an OOM kill instead of ENOSPC, and every later command
		// of the sandbox (bash itself) would be killed too. The group gets
		// room for a full disk on top of memoryMiB.
		spec.MemoryMiB += rt.diskMiB
	}
	if res.cgroups != nil && (spec.MemoryMiB > 0 || spec.CPU > 0 || spec.Pids > 0) {
		g, err := res.cgroups.New(id, spec)
		if err != nil {
			return rt, dirs, err
		}
		rt.group = g
		if u := s.launcher.user; u != nil {
			// The cgroup v1 shim runs as the sandbox user.
			if err := g.Allow(u.uid, u.gid); err != nil {
				return rt, dirs, err
			}
		}
		h := g.Holds()
		rt.holds.Memory, rt.holds.CPU, rt.holds.Pids = h.Memory, h.CPU, h.Pids
		dirs.group = g
	}
	return rt, dirs, nil
}

// releaseRuntime undoes prepareRuntime once the sandbox's execs are over:
// its processes die, its overlay and disk are unmounted, and its files go
// back to dir/fs (copied off a tmpfs only when they are to be kept as a
// snapshot), where finishEnd expects them.
func (s *Server) releaseRuntime(sb *sandbox, keep bool) error {
	rt := sb.rt
	if rt == nil {
		return nil
	}
	var errs []error
	if rt.group != nil {
		errs = append(errs, rt.group.Remove())
	}
	if rt.rootfs != "" {
		errs = append(errs, limits.Unmount(rt.rootfs))
	}
	if rt.disk != "" {
		fsDir, _ := fsLayout(sb.dir)
		onDisk := filepath.Join(rt.disk, "fs")
		switch {
		case rt.diskMiB > 0 && keep:
			errs = append(errs, copyTree(onDisk, fsDir, s.launcher.user))
		case rt.diskMiB == 0:
			errs = append(errs, os.Rename(onDisk, fsDir))
		}
		if rt.diskMiB > 0 {
			errs = append(errs, limits.Unmount(rt.disk))
		}
	}
	return errors.Join(errs...)
}

// describe fills the image and limits of GET /v1/sandboxes.
func (rt *sandboxRuntime) describe(info *gateway.SandboxInfo) {
	if rt == nil {
		return
	}
	info.Image = rt.requested
	if rt.image != nil {
		info.ImageApplied = true
		info.ImageDigest = rt.image.Digest
	} else {
		info.ImageNote = rt.imageNote
	}
	info.Limits = &gateway.SandboxLimits{Memory: rt.holds.Memory, CPU: rt.holds.CPU, Pids: rt.holds.Pids, Disk: rt.holds.Disk}
}

// oomNote is the line added to an exec's output when the kernel killed a
// process of the sandbox for memory during it.
func (rt *sandboxRuntime) oomNote(before int) string {
	if rt == nil || rt.group == nil || rt.group.OOMKills() <= before {
		return ""
	}
	return fmt.Sprintf("\ngateway: the sandbox hit its memory limit (memoryMiB %d): a process was killed\n", rt.memoryMiB)
}

func (rt *sandboxRuntime) oomKills() int {
	if rt == nil || rt.group == nil {
		return 0
	}
	return rt.group.OOMKills()
}

func (s *Server) handleImages(w http.ResponseWriter, r *http.Request) {
	resp := gateway.ImagesResponse{Images: []gateway.ImageInfo{}}
	if s.res.images != nil {
		list, err := s.res.images.List()
		if err != nil {
			s.writeError(w, r, err)
			return
		}
		for _, i := range list {
			resp.Images = append(resp.Images, gateway.ImageInfo{Digest: i.Digest, Refs: i.Refs, Source: i.Source, Bytes: i.Bytes, UnpackedAt: i.UnpackedAt.Format(time.RFC3339Nano)})
		}
	}
	writeJSON(w, http.StatusOK, resp)
}

// mkdirInRoot makes dir and its missing parents in an image sandbox's root,
// every part resolved inside root as the sandbox would see it
// (RESOLVE_IN_ROOT): an image's symlinks cannot lead the gateway, root on the
// host, out of it. New directories are own's (root in the sandbox).
func mkdirInRoot(root, dir string, own *owner) error {
	rfd, err := unix.Open(root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(rfd)
	in := func(p string) (int, error) {
		return unix.Openat2(rfd, p, &unix.OpenHow{Flags: unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC, Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS})
	}
	parts := strings.Split(strings.Trim(path.Clean("/"+dir), "/"), "/")
	for i, part := range parts {
		if part == "" {
			continue
		}
		fd, err := in(strings.Join(parts[:i+1], "/"))
		if err == nil {
			unix.Close(fd)
			continue
		}
		if !errors.Is(err, unix.ENOENT) {
			return err
		}
		pfd, err := in(strings.Join(parts[:i], "/") + "/.")
		if err != nil {
			return err
		}
		err = unix.Mkdirat(pfd, part, 0o755)
		if err == nil && own != nil {
			err = unix.Fchownat(pfd, part, own.uid, own.gid, unix.AT_SYMLINK_NOFOLLOW)
		}
		unix.Close(pfd)
		if err != nil {
			return err // EEXIST: a dangling symlink in the way
		}
	}
	return nil
}

// imageRun is how an exec runs in an image: its root and the config a
// container runtime would apply.
type imageRun struct {
	root     string
	env      []string
	uid, gid int
	// mapUser: bwrap runs as the (unprivileged) sandbox user, who owns the
	// image's files; inside, it is the image's user, root by default.
	mapUser bool
}

// imageUser resolves an image's User ("", "name", "uid", "name:group",
// "uid:gid") as a container runtime does, through the image's own
// /etc/passwd and /etc/group.
func imageUser(rootfs, user string) (int, int, error) {
	if user == "" {
		return 0, 0, nil
	}
	u, g, hasGroup := strings.Cut(user, ":")
	uid, gid := -1, -1
	if n, err := strconv.Atoi(u); err == nil {
		uid = n
	}
	passwd := readColonFile(filepath.Join(rootfs, "etc/passwd"))
	for _, f := range passwd {
		if len(f) >= 4 && (f[0] == u || (uid >= 0 && f[2] == u)) {
			uid, _ = strconv.Atoi(f[2])
			gid, _ = strconv.Atoi(f[3])
			break
		}
	}
	if uid < 0 {
		return 0, 0, fmt.Errorf("user %q is not in the image's /etc/passwd", u)
	}
	if gid < 0 {
		gid = uid
	}
	if hasGroup {
		gid = -1
		if n, err := strconv.Atoi(g); err == nil {
			gid = n
		}
		for _, f := range readColonFile(filepath.Join(rootfs, "etc/group")) {
			if len(f) >= 3 && f[0] == g {
				gid, _ = strconv.Atoi(f[2])
			}
		}
		if gid < 0 {
			return 0, 0, fmt.Errorf("group %q is not in the image's /etc/group", g)
		}
	}
	return uid, gid, nil
}

// readColonFile reads /etc/passwd-like lines of an image, p being
// ROOTFS/etc/NAME: a symlink out of the rootfs (etc -> /etc) is refused.
func readColonFile(p string) [][]string {
	root := filepath.Dir(filepath.Dir(p))
	if real, err := filepath.EvalSymlinks(p); err != nil || !strings.HasPrefix(real, root+"/") {
		return nil
	}
	f, err := os.Open(p)
	if err != nil {
		return nil
	}
	defer f.Close()
	var out [][]string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		out = append(out, strings.Split(sc.Text(), ":"))
	}
	return out
}

// bwrapArgs applies the image's config: its environment after the
// gateway's (so its PATH wins), and its user.
func (r *imageRun) bwrapArgs() []string {
	var args []string
	for _, kv := range r.env {
		k, v, ok := strings.Cut(kv, "=")
		if ok && k != "" {
			args = append(args, "--setenv", k, v)
		}
	}
	if r.mapUser || r.uid != 0 || r.gid != 0 {
		args = append(args, "--unshare-user", "--uid", strconv.Itoa(r.uid), "--gid", strconv.Itoa(r.gid))
	}
	return args
}

// An overlay's upper layer records a deleted file of the image as a
// whiteout (a character device 0:0) and a directory that replaced one of
// the image as opaque (an xattr). A snapshot of an image sandbox keeps its
// upper layer, so copies of it (copyTree) keep both, or deleted files would
// come back from the image.

// copyOpaque copies the overlay's opaque mark of a directory, if any,
// from the directory src to the directory dst (descriptors: only root can
// read or write trusted.* attributes; otherwise nothing).
func copyOpaque(src, dst int) {
	const attr = "trusted.overlay.opaque"
	buf := make([]byte, 8)
	n, err := unix.Fgetxattr(src, attr, buf)
	if err != nil || n <= 0 {
		return
	}
	_ = unix.Fsetxattr(dst, attr, buf[:n], 0)
}
