// Package image resolves OCI image references for the reference gateway and
// unpacks them into a shared, read-only rootfs cache.
//
// An image is looked up first in a directory of OCI image layouts and image
// tarballs (docker save, podman save, OCI archives), then, when pulling is on,
// in its registry. go-containerregistry reads, pulls and flattens the layers;
// the extraction to disk is ours (extract.go), because layers are untrusted.
// Each image is unpacked once, under its config digest (the image ID, the same
// whatever format it came in), and shared by every sandbox that names it.
package image

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sys/unix"
)

// Config configures a Store.
type Config struct {
	// Dir holds OCI image layouts (directories with an index.json) and
	// image tarballs. Empty: no local images.
	Dir string
	// Pull lets images not found in Dir come from their registry.
	Pull bool
	// CacheDir holds the unpacked rootfs trees (required).
	CacheDir string
	// MaxFileBytes caps one file of an image (default 8 GiB).
	MaxFileBytes int64
	// MaxImageBytes caps the files of one image (default 64 GiB).
	MaxImageBytes int64
	// Owner, when set, owns every file of an unpacked image: the user the
	// sandboxes run as, so that, mapped to root in its user namespace, it
	// owns the image's files in its overlay as root owns them in a
	// container (apt-get, pip install). Nil: the owners the layers say.
	// The cache keeps one tree per owner.
	Owner *Owner
	// Logger (default: discard).
	Logger *slog.Logger
}

func (c *Config) validate() error {
	if c.CacheDir == "" {
		return errors.New("image: CacheDir is required")
	}
	if c.MaxFileBytes < 0 || c.MaxImageBytes < 0 {
		return errors.New("image: size caps must not be negative")
	}
	if c.MaxFileBytes == 0 {
		c.MaxFileBytes = 8 << 30
	}
	if c.MaxImageBytes == 0 {
		c.MaxImageBytes = 64 << 30
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// Owner is a user and group on the host.
type Owner struct{ UID, GID int }

// Image is a resolved, unpacked image.
type Image struct {
	Ref    string // as asked for
	Digest string // config digest ("sha256:…"): the cache key
	Source string // where it was found: a file or directory of Dir, or "registry"
	Rootfs string // the unpacked tree; never write to it
	// From the image config; a runtime applies them.
	Env        []string
	WorkingDir string
	User       string
}

// Info describes one cached image, for GET /v1/images.
type Info struct {
	Digest     string    `json:"digest"`
	Refs       []string  `json:"refs"`
	Source     string    `json:"source"`
	Bytes      int64     `json:"bytes"`
	UnpackedAt time.Time `json:"unpackedAt"`
}

// ResolveError says an image could not be resolved, and where it was looked
// for. The gateway answers it with a 400: it is not worth a retry.
type ResolveError struct {
	Ref    string
	Looked []string
	Err    error
}

func (e *ResolveError) Error() string {
	msg := fmt.Sprintf("image %q not found: looked in %s", e.Ref, strings.Join(e.Looked, "; "))
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	return msg
}

func (e *ResolveError) Unwrap() error { return e.Err }

// ErrBadImage marks an image that cannot be unpacked because of what it
// holds (a path out of the root, a file over the size cap, a broken layer):
// trying again cannot help. Other unpack errors (a full cache disk) can pass.
var ErrBadImage = errors.New("bad image")

// Store resolves and caches images. Safe for concurrent use.
type Store struct {
	cfg Config

	mu       sync.Mutex
	inflight map[string]*unpack // by digest
	scanMemo map[string]scanned // by path, for Dir
	unpacks  int                // extractions done, for tests

}

type unpack struct {
	done chan struct{}
	info Info
	err  error
}

// New makes a Store and its cache directory.
func New(cfg Config) (*Store, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	for _, d := range []string{"rootfs", "tmp"} {
		if err := os.MkdirAll(filepath.Join(cfg.CacheDir, d), 0o755); err != nil {
			return nil, fmt.Errorf("image: cache dir: %w", err)
		}
	}
	// Leftovers of an unpack interrupted by a crash. Not an unpack under
	// way in another process sharing the cache: it holds a lock on its
	// directory (unpackCached), which a crash releases.
	if ents, err := os.ReadDir(filepath.Join(cfg.CacheDir, "tmp")); err == nil {
		for _, e := range ents {
			p := filepath.Join(cfg.CacheDir, "tmp", e.Name())
			fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
			if err == nil {
				if unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB) != nil {
					unix.Close(fd)
					continue
				}
			}
			_ = os.RemoveAll(p)
			if err == nil {
				unix.Close(fd)
			}
		}
	}
	return &Store{cfg: cfg, inflight: map[string]*unpack{}, scanMemo: map[string]scanned{}}, nil
}

// Sources says where images come from, for the gateway's start-up line.
func (s *Store) Sources() string {
	var parts []string
	if s.cfg.Dir != "" {
		parts = append(parts, "-images "+s.cfg.Dir)
	}
	if s.cfg.Pull {
		parts = append(parts, "registries (-pull)")
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}

// Resolve finds ref, unpacks it if it is not cached yet, and returns it.
// Concurrent first uses of one image unpack it once.
func (s *Store) Resolve(ctx context.Context, ref string) (*Image, error) {
	parsed, err := name.ParseReference(ref)
	if err != nil {
		return nil, &ResolveError{Ref: ref, Looked: []string{"nowhere (not a valid image reference)"}, Err: err}
	}
	img, source, looked, err := s.find(ctx, parsed)
	if err != nil {
		return nil, &ResolveError{Ref: ref, Looked: looked, Err: err}
	}
	if img == nil {
		return nil, &ResolveError{Ref: ref, Looked: looked}
	}
	cfgName, err := img.ConfigName()
	if err != nil {
		return nil, fmt.Errorf("image %q: config digest: %w", ref, err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image %q: config: %w", ref, err)
	}
	info, err := s.unpackOnce(ctx, cfgName.String(), img, ref, source)
	if err != nil {
		return nil, fmt.Errorf("image %q from %s: %w", ref, source, err)
	}
	return &Image{
		Ref: ref, Digest: info.Digest, Source: source,
		Rootfs:     s.rootfsDir(info.Digest),
		Env:        cf.Config.Env,
		WorkingDir: cf.Config.WorkingDir,
		User:       cf.Config.User,
	}, nil
}

// find looks in Dir, then in the registry.
func (s *Store) find(ctx context.Context, ref name.Reference) (v1.Image, string, []string, error) {
	var looked []string
	if s.cfg.Dir != "" {
		img, src, names, err := s.findInDir(ref)
		if err != nil {
			return nil, "", append(looked, "-images "+s.cfg.Dir), err
		}
		if img != nil {
			return img, src, nil, nil
		}
		desc := "-images " + s.cfg.Dir + " (none of: " + strings.Join(names, ", ") + ")"
		if len(names) == 0 {
			desc = "-images " + s.cfg.Dir + " (no images there)"
		}
		looked = append(looked, desc)
	} else {
		looked = append(looked, "no -images directory")
	}
	if !s.cfg.Pull {
		return nil, "", append(looked, "not pulled (-pull is off)"), nil
	}
	img, err := remote.Image(ref,
		remote.WithContext(ctx),
		remote.WithAuthFromKeychain(authn.DefaultKeychain),
		remote.WithPlatform(v1.Platform{OS: "linux", Architecture: runtime.GOARCH}),
	)
	looked = append(looked, "registry "+ref.Context().RegistryStr())
	if err != nil {
		return nil, "", looked, err
	}
	return img, "registry " + ref.Context().RegistryStr(), nil, nil
}

func (s *Store) rootfsDir(digest string) string {
	name := strings.ReplaceAll(digest, ":", "-")
	if o := s.cfg.Owner; o != nil {
		name += fmt.Sprintf("-u%d-g%d", o.UID, o.GID)
	}
	return filepath.Join(s.cfg.CacheDir, "rootfs", name)
}

func (s *Store) unpackOnce(ctx context.Context, digest string, img v1.Image, ref, source string) (Info, error) {
	s.mu.Lock()
	if u, ok := s.inflight[digest]; ok {
		s.mu.Unlock()
		select {
		case <-u.done:
		case <-ctx.Done():
			return Info{}, ctx.Err()
		}
		if u.err != nil {
			return Info{}, u.err
		}
		s.addRef(digest, ref)
		return u.info, nil
	}
	u := &unpack{done: make(chan struct{})}
	s.inflight[digest] = u
	s.mu.Unlock()

	u.info, u.err = s.unpackCached(digest, img, ref, source)
	if u.err != nil {
		// Let a later create try again (a fixed file, a registry back up).
		s.mu.Lock()
		delete(s.inflight, digest)
		s.mu.Unlock()
	}
	close(u.done)
	return u.info, u.err
}

// unpackCached returns the cache entry, unpacking it if it is not on disk
// (another gateway process may have made it: the rename is atomic).
func (s *Store) unpackCached(digest string, img v1.Image, ref, source string) (Info, error) {
	final := s.rootfsDir(digest)
	if info, err := s.readInfo(digest); err == nil {
		if _, err := os.Stat(final); err == nil {
			s.addRef(digest, ref)
			return info, nil
		}
	}
	rnd := make([]byte, 6)
	_, _ = rand.Read(rnd)
	tmp := filepath.Join(s.cfg.CacheDir, "tmp", filepath.Base(final)+"-"+hex.EncodeToString(rnd))
	if err := os.Mkdir(tmp, 0o755); err != nil {
		return Info{}, fmt.Errorf("unpack: %w", err)
	}
	defer os.RemoveAll(tmp)
	// Held until the tree is renamed into place: another gateway starting
	// on this cache (New) must not take it for a crash's leftover.
	lock, err := unix.Open(tmp, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return Info{}, fmt.Errorf("unpack: %w", err)
	}
	defer unix.Close(lock)
	if err := unix.Flock(lock, unix.LOCK_EX); err != nil {
		return Info{}, fmt.Errorf("unpack: lock %s: %w", tmp, err)
	}
	// (Removed as a leftover between its Mkdir and the lock: not ours.)
	var held, now unix.Stat_t
	if err := unix.Fstat(lock, &held); err != nil || unix.Stat(tmp, &now) != nil || held.Ino != now.Ino || held.Dev != now.Dev {
		return Info{}, fmt.Errorf("unpack: %s was removed by another gateway starting on the cache", tmp)
	}

	s.mu.Lock()
	s.unpacks++
	s.mu.Unlock()
	start := time.Now()
	rc := mutate.Extract(img)
	st, err := extract(rc, tmp, extractLimits{maxFileBytes: s.cfg.MaxFileBytes, maxTotalBytes: s.cfg.MaxImageBytes, owner: s.cfg.Owner})
	rc.Close()
	if err != nil {
		if !environmental(err) {
			err = fmt.Errorf("%w: %w", ErrBadImage, err)
		}
		return Info{}, fmt.Errorf("unpack: %w", err)
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return Info{}, fmt.Errorf("unpack: %w", err)
	}
	if o := s.cfg.Owner; o != nil {
		if err := os.Lchown(tmp, o.UID, o.GID); err != nil {
			return Info{}, fmt.Errorf("unpack: %w", err)
		}
	}
	if err := os.Rename(tmp, final); err != nil && !errors.Is(err, os.ErrExist) && !errors.Is(err, unix.ENOTEMPTY) {
		return Info{}, fmt.Errorf("unpack: %w", err)
	}
	info := Info{Digest: digest, Refs: []string{ref}, Source: source, Bytes: st.bytes, UnpackedAt: time.Now().UTC()}
	if old, err := s.readInfo(digest); err == nil {
		info = old // another process won the rename
		info.Refs = appendNew(info.Refs, ref)
	}
	if err := s.writeInfo(info); err != nil {
		return Info{}, err
	}
	s.cfg.Logger.Info("image unpacked", "image", ref, "digest", digest, "source", source,
		"files", st.files, "bytes", st.bytes, "skipped_devices", st.skippedDevices,
		"skipped_unsafe", st.skippedUnsafe, "took", time.Since(start).Round(time.Millisecond))
	return info, nil
}

func (s *Store) infoPath(digest string) string { return s.rootfsDir(digest) + ".json" }

func (s *Store) readInfo(digest string) (Info, error) {
	var info Info
	b, err := os.ReadFile(s.infoPath(digest))
	if err != nil {
		return info, err
	}
	return info, json.Unmarshal(b, &info)
}

func (s *Store) writeInfo(info Info) error {
	b, err := json.Marshal(info)
	if err != nil {
		return err
	}
	tmp := s.infoPath(info.Digest) + ".tmp"
	if err := os.WriteFile(tmp, b, 0o644); err != nil {
		return fmt.Errorf("image cache: %w", err)
	}
	return os.Rename(tmp, s.infoPath(info.Digest))
}

// addRef records one more name for a cached image.
func (s *Store) addRef(digest, ref string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	info, err := s.readInfo(digest)
	if err != nil || contains(info.Refs, ref) {
		return
	}
	info.Refs = append(info.Refs, ref)
	if err := s.writeInfo(info); err != nil {
		s.cfg.Logger.Warn("image cache: record name", "image", ref, "err", err)
	}
}

// List returns the cached images, by digest.
func (s *Store) List() ([]Info, error) {
	ents, err := os.ReadDir(filepath.Join(s.cfg.CacheDir, "rootfs"))
	if err != nil {
		return nil, fmt.Errorf("image cache: %w", err)
	}
	out := []Info{}
	for _, e := range ents {
		if !strings.HasSuffix(e.Name(), ".json") {
			continue
		}
		var info Info
		b, err := os.ReadFile(filepath.Join(s.cfg.CacheDir, "rootfs", e.Name()))
		if err != nil || json.Unmarshal(b, &info) != nil || s.infoPath(info.Digest) != filepath.Join(s.cfg.CacheDir, "rootfs", e.Name()) {
			continue // unreadable, or another owner's tree
		}
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Digest < out[j].Digest })
	return out, nil
}

func contains(xs []string, x string) bool {
	for _, y := range xs {
		if y == x {
			return true
		}
	}
	return false
}

func appendNew(xs []string, x string) []string {
	if contains(xs, x) {
		return xs
	}
	return append(xs, x)
}

// environmental says whether an unpack failed because of the machine (space,
// I/O, a read-only cache, a registry or network failure while streaming
// layers) rather than the image's contents.
func environmental(err error) bool {
	for _, e := range []error{unix.ENOSPC, unix.EDQUOT, unix.EIO, unix.EROFS, unix.ENOMEM, unix.EMFILE, unix.ENFILE} {
		if errors.Is(err, e) {
			return true
		}
	}
	// (Not net.Error: syscall.Errno implements it.)
	var oe *net.OpError
	var ue *url.Error
	return errors.As(err, &oe) || errors.As(err, &ue) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded)
}
