package image

import (
	"archive/tar"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"golang.org/x/sys/unix"
)

// Names inside layouts and archives: OCI's own annotation (a full reference,
// or only a tag) and containerd's (always a full reference).
const (
	annotationRefName   = "org.opencontainers.image.ref.name"
	annotationContainer = "io.containerd.image.name"
)

// candidate is one image found in Dir.
type candidate struct {
	names  []string // fully qualified, as name.Reference.Name() prints them
	digest string   // manifest digest, for name@sha256:… references ("" for archives)
	open   func() (v1.Image, error)
	where  string
}

// scanned memoises the scan of one entry of Dir: reading a big tarball's
// manifest means reading through it.
type scanned struct {
	size  int64
	mtime time.Time
	cands []candidate
	err   error
}

// findInDir returns the image of Dir that ref names, or nil and the names
// that were there.
func (s *Store) findInDir(ref name.Reference) (v1.Image, string, []string, error) {
	ents, err := os.ReadDir(s.cfg.Dir)
	if err != nil {
		return nil, "", nil, fmt.Errorf("read -images dir: %w", err)
	}
	want := ref.Name()
	dg, isDigest := ref.(name.Digest)
	var seen []string
	for _, e := range ents {
		p := filepath.Join(s.cfg.Dir, e.Name())
		cands, err := s.scan(p)
		if err != nil {
			s.cfg.Logger.Warn("images dir: skipping an unreadable entry", "path", p, "err", err)
			continue
		}
		for _, c := range cands {
			if isDigest && c.digest != "" && c.digest == dg.DigestStr() {
				img, err := c.open()
				return img, c.where, nil, err
			}
			for _, n := range c.names {
				if n == want {
					img, err := c.open()
					return img, c.where, nil, err
				}
			}
			seen = append(seen, c.names...)
		}
	}
	return nil, "", seen, nil
}

func (s *Store) scan(p string) ([]candidate, error) {
	fi, err := os.Stat(p)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	m, ok := s.scanMemo[p]
	s.mu.Unlock()
	if ok && m.size == fi.Size() && m.mtime.Equal(fi.ModTime()) {
		return m.cands, m.err
	}
	var cands []candidate
	base := strings.TrimSuffix(filepath.Base(p), filepath.Ext(p))
	switch {
	case fi.IsDir():
		cands, err = scanLayout(p, base)
	case fi.Mode().IsRegular():
		cands, err = s.scanTarball(p, base, fi)
	default:
		return nil, nil
	}
	s.mu.Lock()
	s.scanMemo[p] = scanned{size: fi.Size(), mtime: fi.ModTime(), cands: cands, err: err}
	s.mu.Unlock()
	return cands, err
}

// scanLayout lists the images of an OCI image layout. A bare tag in the ref
// name annotation ("3.11") is taken as a tag of the layout's own name
// ("python-3.11/" holding "3.11" is not guessed at: name the layout "python").
func scanLayout(dir, base string) ([]candidate, error) {
	if _, err := os.Stat(filepath.Join(dir, "index.json")); err != nil {
		return nil, nil // not a layout
	}
	lp, err := layout.FromPath(dir)
	if err != nil {
		return nil, err
	}
	idx, err := lp.ImageIndex()
	if err != nil {
		return nil, err
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	var out []candidate
	for _, desc := range im.Manifests {
		var names []string
		for _, k := range []string{annotationContainer, annotationRefName} {
			if n := normalize(desc.Annotations[k], base); n != "" && !contains(names, n) {
				names = append(names, n)
			}
		}
		h := desc.Digest
		c := candidate{names: names, digest: h.String(), where: dir}
		if desc.MediaType.IsIndex() {
			c.open = func() (v1.Image, error) { return platformImage(idx, h) }
		} else {
			c.open = func() (v1.Image, error) { return idx.Image(h) }
		}
		out = append(out, c)
	}
	return out, nil
}

// platformImage picks this machine's image of a multi-platform index.
func platformImage(parent v1.ImageIndex, h v1.Hash) (v1.Image, error) {
	idx, err := parent.ImageIndex(h)
	if err != nil {
		return nil, err
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	for _, d := range im.Manifests {
		if d.Platform != nil && d.Platform.OS == "linux" && d.Platform.Architecture == runtime.GOARCH {
			return idx.Image(d.Digest)
		}
	}
	return nil, fmt.Errorf("no linux/%s image in index %s", runtime.GOARCH, h)
}

// normalize turns an annotation into a fully qualified name.
func normalize(n, base string) string {
	if n == "" {
		return ""
	}
	if !strings.ContainsAny(n, "/:@") {
		n = base + ":" + n
	}
	r, err := name.ParseReference(n)
	if err != nil {
		return ""
	}
	return r.Name()
}

// scanTarball reads a docker/podman save archive (manifest.json with
// RepoTags) or an OCI archive (an OCI layout in a tar).
func (s *Store) scanTarball(p, base string, fi os.FileInfo) ([]candidate, error) {
	members, err := tarMembers(p, "manifest.json", "index.json")
	if err != nil {
		return nil, err
	}
	opener := func() (io.ReadCloser, error) { return os.Open(p) }
	if members["manifest.json"] {
		m, err := tarball.LoadManifest(opener)
		if err != nil {
			return nil, err
		}
		var out []candidate
		for _, d := range m {
			c := candidate{where: p}
			var tag *name.Tag
			for _, rt := range d.RepoTags {
				t, err := name.NewTag(rt)
				if err != nil {
					continue
				}
				if tag == nil {
					tag = &t
				}
				c.names = append(c.names, t.Name())
			}
			if tag == nil && len(m) > 1 {
				continue // an untagged image among several cannot be told apart
			}
			c.open = func() (v1.Image, error) { return tarball.Image(opener, tag) }
			out = append(out, c)
		}
		// No digest: an archive holds no registry manifest, and the one
		// go-containerregistry would compute (compressing every layer)
		// matches no registry's. A name@sha256:… reference is matched
		// by layouts, else pulled.
		return out, nil
	}
	if members["index.json"] {
		// An OCI archive: unpack the layout once, next to the cache, keyed
		// by the archive's path, size and time.
		key := sha256.Sum256(fmt.Appendf(nil, "%s\x00%d\x00%d", p, fi.Size(), fi.ModTime().UnixNano()))
		dir := filepath.Join(s.cfg.CacheDir, "archives", hex.EncodeToString(key[:12]))
		if _, err := os.Stat(filepath.Join(dir, "index.json")); err != nil {
			if err := untarLayout(p, dir, s.cfg.MaxImageBytes); err != nil {
				return nil, err
			}
		}
		cands, err := scanLayout(dir, base)
		for i := range cands {
			cands[i].where = p
		}
		return cands, err
	}
	return nil, nil // some other file
}

// tarMembers reports which of names are members of the tar at p.
func tarMembers(p string, names ...string) (map[string]bool, error) {
	f, err := os.Open(p)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	found := map[string]bool{}
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return found, nil
		}
		if err != nil {
			return nil, fmt.Errorf("%s: not an image tarball: %w", p, err)
		}
		n := strings.TrimPrefix(h.Name, "./")
		if contains(names, n) {
			found[n] = true
		}
	}
}

// untarLayout unpacks an OCI archive: only directories and regular files,
// which is all a layout holds.
func untarLayout(p, dir string, maxBytes int64) error {
	rnd := make([]byte, 6)
	_, _ = rand.Read(rnd)
	tmp := dir + ".tmp-" + hex.EncodeToString(rnd)
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	f, err := os.Open(p)
	if err != nil {
		return err
	}
	defer f.Close()
	var total int64
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		rel, ok := cleanName(h.Name)
		if !ok || rel == "" {
			continue
		}
		dst := filepath.Join(tmp, rel)
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(dst, 0o755); err != nil {
				return err
			}
		case tar.TypeReg:
			total += h.Size
			if total > maxBytes {
				return fmt.Errorf("%s: %w", p, errTooLarge)
			}
			if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
				return err
			}
			out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
			if err != nil {
				return err
			}
			_, err = io.Copy(out, io.LimitReader(tr, h.Size))
			if cerr := out.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
		}
	}
	// A concurrent scan may have won: its copy is as good as ours.
	if err := os.Rename(tmp, dir); err != nil && !errors.Is(err, os.ErrExist) && !errors.Is(err, unix.ENOTEMPTY) {
		return err
	}
	return nil
}
