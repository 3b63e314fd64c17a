package local

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/google/uuid"
)

// sandbox is one live sandbox: a directory tree of its own and its execs.
type sandbox struct {
	id         string
	idemKey    string // the x-idempotency-key of its create, if any
	logicalKey string
	persistent bool
	cwd        string // the default cwd of its execs, as it sees it
	dir        string // StateDir/sandboxes/<id>
	dirs       fsDirs // dir/fs/root and dir/fs/tmp
	createdAt  time.Time
	lifetime   time.Duration
	idle       time.Duration
	log        *slog.Logger
	rt         *sandboxRuntime // image, disk, cgroup; released by finishEnd

	mu         sync.Mutex
	execs      map[string]*execution
	running    int
	lastActive time.Time // the last exec start or end, or the create
	ending     bool      // terminate has begun: no new execs
}

// expiry says why the sandbox is over at now ("lifetime" or "idle"), or "".
func (sb *sandbox) expiry(now time.Time) string {
	sb.mu.Lock()
	defer sb.mu.Unlock()
	switch {
	case now.Sub(sb.createdAt) >= sb.lifetime:
		return "lifetime"
	case sb.running == 0 && now.Sub(sb.lastActive) >= sb.idle:
		return "idle"
	}
	return ""
}

// nextExpiry is the earliest time the sandbox may expire, for Retry-After.
func (sb *sandbox) nextExpiry() time.Time {
	sb.mu.Lock()
	defer sb.mu.Unlock()
	t := sb.createdAt.Add(sb.lifetime)
	if sb.running == 0 {
		if idle := sb.lastActive.Add(sb.idle); idle.Before(t) {
			t = idle
		}
	}
	return t
}

// fsLayout is where a sandbox's files are: dir/fs is what a snapshot keeps.
func fsLayout(dir string) (fsDir string, dirs fsDirs) {
	fsDir = filepath.Join(dir, "fs")
	return fsDir, fsDirs{home: filepath.Join(fsDir, "root"), tmp: filepath.Join(fsDir, "tmp")}
}

// makeSandboxDir creates the directory tree of a new sandbox, starting
// from a copy of snapshot when it is not "" and exists; restored says
// whether it did. The snapshot stays as it is, so that a sandbox ended
// without one leaves the key's earlier state in place.
func makeSandboxDir(dir, snapshot string) (dirs fsDirs, restored bool, err error) {
	if err := os.Mkdir(dir, 0o700); err != nil {
		return fsDirs{}, false, err
	}
	fsDir, dirs := fsLayout(dir)
	if snapshot != "" {
		switch _, err := os.Stat(snapshot); {
		case err == nil:
			if err := copyTree(snapshot, fsDir); err != nil {
				return fsDirs{}, false, fmt.Errorf("restore snapshot: %w", err)
			}
			restored = true
		case !errors.Is(err, fs.ErrNotExist):
			return fsDirs{}, false, fmt.Errorf("restore snapshot: %w", err)
		}
	}
	if !restored {
		if err := os.Mkdir(fsDir, 0o700); err != nil {
			return fsDirs{}, false, err
		}
	}
	// A snapshot may lack either (someone removed it by hand): make sure.
	if err := os.MkdirAll(dirs.home, 0o700); err != nil {
		return fsDirs{}, false, err
	}
	if err := os.MkdirAll(dirs.tmp, 0o700); err != nil {
		return fsDirs{}, false, err
	}
	if !restored {
		// A /tmp as the commands expect it; Mkdir's mode is cut by umask.
		if err := os.Chmod(dirs.tmp, 0o1777); err != nil {
			return fsDirs{}, false, err
		}
	}
	return dirs, restored, nil
}

// safeName turns a logical key into a directory name: the key's harmless
// characters, for people reading the state dir, and a hash of the whole
// key, so that two keys never share a name and no key escapes the dir.
func safeName(key string) string {
	var b strings.Builder
	for _, r := range key {
		if b.Len() >= 40 {
			break
		}
		switch {
		case r >= 'a' && r <= 'z', r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '-', r == '_':
			b.WriteRune(r)
		default:
			b.WriteByte('_')
		}
	}
	sum := sha256.Sum256([]byte(key))
	return b.String() + "-" + hex.EncodeToString(sum[:8])
}

// copyTree copies the directory src to dst (which must not exist):
// directories, regular files and symbolic links, with their modes and
// the files' modification times. Other kinds of files (sockets, fifos,
// devices) are skipped: they do not survive a snapshot.
func copyTree(src, dst string) error {
	type dirMode struct {
		path string
		mode fs.FileMode
	}
	var dirs []dirMode
	err := filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch mode := info.Mode(); {
		case mode.IsDir():
			// Writable until its contents are in; its own mode comes last.
			if err := os.Mkdir(target, 0o700); err != nil {
				return err
			}
			dirs = append(dirs, dirMode{target, mode.Perm() | mode&(fs.ModeSticky|fs.ModeSetgid|fs.ModeSetuid)})
			copyOpaque(path, target)
		case mode.IsRegular():
			if err := copyFile(path, target, info); err != nil {
				return err
			}
		case isWhiteout(info):
			// A file of the image that the sandbox deleted (runtime.go).
			if err := makeWhiteout(target); err != nil {
				return err
			}
		case mode&fs.ModeSymlink != 0:
			link, err := os.Readlink(path)
			if err != nil {
				return err
			}
			if err := os.Symlink(link, target); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := os.Chmod(dirs[i].path, dirs[i].mode); err != nil {
			return err
		}
	}
	return nil
}

func copyFile(src, dst string, info fs.FileInfo) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	if err := os.Chmod(dst, info.Mode().Perm()|info.Mode()&(fs.ModeSticky|fs.ModeSetgid|fs.ModeSetuid)); err != nil {
		return err
	}
	return os.Chtimes(dst, info.ModTime(), info.ModTime())
}

// keyedMutex is a mutex per key, held by the snapshot operations of one
// logical key so that a save and a restore never interleave.
type keyedMutex struct {
	mu sync.Mutex
	m  map[string]*keyedEntry
}

type keyedEntry struct {
	mu   sync.Mutex
	refs int
}

// lock locks key and returns its unlock.
func (k *keyedMutex) lock(key string) (unlock func()) {
	k.mu.Lock()
	if k.m == nil {
		k.m = make(map[string]*keyedEntry)
	}
	e := k.m[key]
	if e == nil {
		e = &keyedEntry{}
		k.m[key] = e
	}
	e.refs++
	k.mu.Unlock()

	e.mu.Lock()
	return func() {
		e.mu.Unlock()
		k.mu.Lock()
		e.refs--
		if e.refs == 0 {
			delete(k.m, key)
		}
		k.mu.Unlock()
	}
}

// newID returns a new sandbox id.
func newID() string { return "sb-" + uuid.NewString() }
