package local

import (
	"cmp"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
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
	tombs      map[tombKey]struct{} // execs evicted: their ids never run again
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

// tombKey stands for an evicted exec's id: a hash of fixed size, so that
// a tombstone costs the same whatever the id's length.
type tombKey [16]byte

func tombKeyOf(execID string) tombKey {
	sum := sha256.Sum256([]byte(execID))
	return tombKey(sum[:16])
}

// fsLayout is where a sandbox's files are: dir/fs is what a snapshot keeps.
func fsLayout(dir string) (fsDir string, dirs fsDirs) {
	fsDir = filepath.Join(dir, "fs")
	return fsDir, fsDirs{home: filepath.Join(fsDir, "root"), tmp: filepath.Join(fsDir, "tmp")}
}

// isolationMark is the file, next to root and tmp in a sandbox's fs dir
// (so out of its commands' reach under bubblewrap), that names the
// isolation its files were made under; a snapshot keeps it.
const isolationMark = "isolation"

// makeSandboxDir creates the directory tree of a new sandbox, starting
// from a copy of snapshot when it is not "" and exists; restored says
// whether it did. The snapshot stays as it is, so that a sandbox ended
// without one leaves the key's earlier state in place.
//
// A snapshot is never trusted: only its root and tmp directories are
// copied, by copyTree (no symlink followed, no special file, no setuid
// bit, everything owned by the sandbox user), and one that is not a
// directory (a symlink to the host, say, left by a command without
// isolation) is replaced by an empty one. A snapshot made under another
// isolation than the server's is logged.
func (s *Server) makeSandboxDir(dir, snapshot string, log *slog.Logger) (dirs fsDirs, restored bool, err error) {
	own := s.launcher.user
	if err := os.Mkdir(dir, 0o700); err != nil {
		return fsDirs{}, false, err
	}
	fsDir, dirs := fsLayout(dir)
	if err := os.Mkdir(fsDir, 0o700); err != nil {
		return fsDirs{}, false, err
	}
	for _, d := range []string{dir, fsDir} {
		if err := own.traversable(d); err != nil {
			return fsDirs{}, false, err
		}
	}
	if snapshot != "" {
		switch _, err := os.Stat(snapshot); {
		case err == nil:
			restored = true
		case !errors.Is(err, fs.ErrNotExist):
			return fsDirs{}, false, fmt.Errorf("restore snapshot: %w", err)
		}
	}
	if restored {
		mark, _ := os.ReadFile(filepath.Join(snapshot, isolationMark))
		if made := Isolation(strings.TrimSpace(string(mark))); made != s.launcher.mode {
			log.Warn("restoring a snapshot made under another isolation: its files are copied as untrusted", "made_under", cmp.Or(string(made), "unknown"), "isolation", s.launcher.mode)
		}
		// upper: an image sandbox's overlay upper layer (runtime.go).
		for _, d := range []string{dirs.home, dirs.tmp, filepath.Join(fsDir, "upper")} {
			src := filepath.Join(snapshot, filepath.Base(d))
			fi, err := os.Lstat(src)
			switch {
			case errors.Is(err, fs.ErrNotExist):
				continue // made below
			case err != nil:
				return fsDirs{}, false, fmt.Errorf("restore snapshot: %w", err)
			case !fi.IsDir():
				log.Warn("snapshot entry is not a directory: replaced by an empty one", "path", src, "mode", fi.Mode().String())
				continue
			}
			if err := copyTree(src, d, own); err != nil {
				return fsDirs{}, false, fmt.Errorf("restore snapshot: %w", err)
			}
			// A command may have taken its own rights on its home or /tmp
			// away (chmod 000 ~): bubblewrap, unprivileged, could then not
			// start bash in /root, the default cwd, ever again for the key.
			// Its owner's r-x are what a cwd needs; a read-only home (the
			// 555 of a chmod -R a-w) stays read-only.
			fi, err = os.Lstat(d)
			if err == nil {
				err = os.Chmod(d, fi.Mode()&(fs.ModePerm|fs.ModeSticky)|0o500)
			}
			if err != nil {
				return fsDirs{}, false, fmt.Errorf("restore snapshot: %w", err)
			}
		}
	}
	for _, d := range []string{dirs.home, dirs.tmp} {
		switch err := os.Mkdir(d, 0o700); {
		case errors.Is(err, fs.ErrExist):
			continue // restored
		case err != nil:
			return fsDirs{}, false, err
		}
		if err := own.give(d); err != nil {
			return fsDirs{}, false, err
		}
		if d == dirs.tmp {
			// A /tmp as the commands expect it; Mkdir's mode is cut by umask.
			if err := os.Chmod(dirs.tmp, 0o1777); err != nil {
				return fsDirs{}, false, err
			}
		}
	}
	if err := os.WriteFile(filepath.Join(fsDir, isolationMark), []byte(s.launcher.mode+"\n"), 0o600); err != nil {
		return fsDirs{}, false, err
	}
	return dirs, restored, nil
}

// traversable gives dir to the sandbox user's group, search only (0710),
// so that bubblewrap, run as that user, can reach the sandbox's own dirs
// under it and list nothing. A nil owner does nothing.
func (o *owner) traversable(dir string) error {
	if o == nil {
		return nil
	}
	if err := os.Lchown(dir, -1, o.gid); err != nil {
		return err
	}
	return os.Chmod(dir, 0o710)
}

// canSearchAbove reports whether o may search every directory above dir
// (by its permission bits; ACLs are not looked at).
func (o *owner) canSearchAbove(dir string) bool {
	for p := filepath.Dir(dir); ; p = filepath.Dir(p) {
		fi, err := os.Stat(p)
		if err != nil {
			return false
		}
		st, ok := fi.Sys().(*syscall.Stat_t)
		if !ok {
			return false
		}
		var bit fs.FileMode = 0o001
		switch {
		case int(st.Uid) == o.uid:
			bit = 0o100
		case int(st.Gid) == o.gid:
			bit = 0o010
		}
		if fi.Mode().Perm()&bit == 0 {
			return false
		}
		if p == "/" {
			return true
		}
	}
}

// uidOr is o's uid, or def when o is nil.
func (o *owner) uidOr(def int) int {
	if o == nil {
		return def
	}
	return o.uid
}

// give makes dir the sandbox user's. A nil owner does nothing.
func (o *owner) give(dir string) error {
	if o == nil {
		return nil
	}
	return os.Lchown(dir, o.uid, o.gid)
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
