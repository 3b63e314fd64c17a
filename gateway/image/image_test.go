package image

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/boxq/boxq/gateway/image/imagetest"
	"github.com/google/go-cmp/cmp"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
)

func newStore(t *testing.T, cfg Config) *Store {
	t.Helper()
	if cfg.CacheDir == "" {
		cfg.CacheDir = t.TempDir()
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// runIn runs a bash command chrooted into the rootfs: the unpacked image
// really is a working root. Root only.
func runIn(t *testing.T, rootfs, script string) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("chroot needs root")
	}
	out, err := exec.Command("chroot", rootfs, "/bin/bash", "-c", script).CombinedOutput()
	if err != nil {
		t.Fatalf("chroot %s: %v: %s", rootfs, err, out)
	}
	return string(out)
}

func TestResolveTarballTwoImages(t *testing.T) {
	dir := t.TempDir()
	a := imagetest.Build(t, imagetest.Spec{Marker: "alpha", OSRelease: "ID=alpha\n", Env: []string{"PATH=/usr/bin:/bin", "GREETING=hi"}, WorkingDir: "/srv", User: "1000"})
	b := imagetest.Build(t, imagetest.Spec{Marker: "beta", OSRelease: "ID=beta\n", Tools: []string{"cat"}})
	imagetest.WriteTarball(t, filepath.Join(dir, "both.tar"), map[string]v1.Image{"example.com/alpha:1": a, "beta:2": b})

	s := newStore(t, Config{Dir: dir})
	ctx := context.Background()
	ia, err := s.Resolve(ctx, "example.com/alpha:1")
	if err != nil {
		t.Fatal(err)
	}
	ib, err := s.Resolve(ctx, "docker.io/library/beta:2") // the same name, spelt out
	if err != nil {
		t.Fatal(err)
	}
	if ia.Digest == ib.Digest || ia.Rootfs == ib.Rootfs {
		t.Fatalf("two images share a cache entry: %+v %+v", ia, ib)
	}
	if got := readFile(t, filepath.Join(ia.Rootfs, "marker")); got != "alpha" {
		t.Errorf("alpha marker = %q", got)
	}
	if got := runIn(t, ib.Rootfs, "cat /marker /etc/os-release"); got != "betaID=beta\n" {
		t.Errorf("beta in chroot = %q", got)
	}
	if diff := cmp.Diff([]string{"PATH=/usr/bin:/bin", "GREETING=hi"}, ia.Env); diff != "" {
		t.Errorf("Env (-want +got):\n%s", diff)
	}
	if ia.WorkingDir != "/srv" || ia.User != "1000" {
		t.Errorf("WorkingDir, User = %q, %q", ia.WorkingDir, ia.User)
	}
	if !strings.HasSuffix(ia.Source, "both.tar") {
		t.Errorf("Source = %q", ia.Source)
	}
	list, err := s.List()
	if err != nil {
		t.Fatal(err)
	}
	if len(list) != 2 {
		t.Fatalf("List = %+v, want 2 images", list)
	}
}

func TestResolveLayoutAndOCIArchive(t *testing.T) {
	dir := t.TempDir()
	img := imagetest.Build(t, imagetest.Spec{Marker: "layout", OSRelease: "ID=layout\n"})
	// A bare tag in a layout named "tools" means tools:<tag>.
	imagetest.WriteLayout(t, filepath.Join(dir, "tools"), map[string]v1.Image{"7": img})
	img2 := imagetest.Build(t, imagetest.Spec{Marker: "archive", OSRelease: "ID=archive\n"})
	lay := filepath.Join(t.TempDir(), "lay")
	imagetest.WriteLayout(t, lay, map[string]v1.Image{"ghcr.io/org/arch:v1": img2})
	if out, err := exec.Command("tar", "-C", lay, "-cf", filepath.Join(dir, "arch.oci.tar"), ".").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v: %s", err, out)
	}

	s := newStore(t, Config{Dir: dir})
	for ref, want := range map[string]string{"tools:7": "layout", "ghcr.io/org/arch:v1": "archive"} {
		im, err := s.Resolve(context.Background(), ref)
		if err != nil {
			t.Fatalf("%s: %v", ref, err)
		}
		if got := readFile(t, filepath.Join(im.Rootfs, "marker")); got != want {
			t.Errorf("%s marker = %q, want %q", ref, got, want)
		}
	}
	// By digest, too.
	dg, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Resolve(context.Background(), "tools@"+dg.String()); err != nil {
		t.Errorf("by digest: %v", err)
	}
}

func TestResolvePull(t *testing.T) {
	host := imagetest.Registry(t)
	img := imagetest.Build(t, imagetest.Spec{Marker: "pulled", OSRelease: "ID=pulled\n"})
	imagetest.Push(t, host+"/team/py:3.11", img)

	off := newStore(t, Config{})
	_, err := off.Resolve(context.Background(), host+"/team/py:3.11")
	var re *ResolveError
	if !errors.As(err, &re) || !strings.Contains(err.Error(), "-pull is off") {
		t.Fatalf("pull off: err = %v, want a ResolveError saying -pull is off", err)
	}

	s := newStore(t, Config{Pull: true})
	im, err := s.Resolve(context.Background(), host+"/team/py:3.11")
	if err != nil {
		t.Fatal(err)
	}
	if got := readFile(t, filepath.Join(im.Rootfs, "marker")); got != "pulled" {
		t.Errorf("marker = %q", got)
	}
	_, err = s.Resolve(context.Background(), host+"/team/py:nope")
	if !errors.As(err, &re) || !strings.Contains(err.Error(), "registry "+host) {
		t.Fatalf("missing tag: err = %v, want a ResolveError naming the registry", err)
	}
}

func TestResolveNotFoundSaysWhere(t *testing.T) {
	dir := t.TempDir()
	imagetest.WriteTarball(t, filepath.Join(dir, "a.tar"), map[string]v1.Image{"alpha:1": imagetest.Build(t, imagetest.Spec{Marker: "a"})})
	s := newStore(t, Config{Dir: dir})
	_, err := s.Resolve(context.Background(), "python:3.11")
	var re *ResolveError
	if !errors.As(err, &re) {
		t.Fatalf("err = %v, want a *ResolveError", err)
	}
	for _, want := range []string{`"python:3.11"`, "-images " + dir, "index.docker.io/library/alpha:1", "-pull is off"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if _, err := s.Resolve(context.Background(), "Not A Ref!"); !errors.As(err, &re) {
		t.Errorf("bad reference: err = %v, want a *ResolveError", err)
	}
}

func TestConcurrentFirstUseUnpacksOnce(t *testing.T) {
	dir := t.TempDir()
	imagetest.WriteTarball(t, filepath.Join(dir, "a.tar"), map[string]v1.Image{"alpha:1": imagetest.Build(t, imagetest.Spec{Marker: "a"})})
	s := newStore(t, Config{Dir: dir})
	var wg sync.WaitGroup
	roots := make([]string, 10)
	errs := make([]error, 10)
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			im, err := s.Resolve(context.Background(), "alpha:1")
			errs[i] = err
			if err == nil {
				roots[i] = im.Rootfs
			}
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("resolve %d: %v", i, err)
		}
		if roots[i] != roots[0] {
			t.Fatalf("rootfs %d = %s, want %s", i, roots[i], roots[0])
		}
	}
	if s.unpacks != 1 {
		t.Errorf("unpacked %d times, want 1", s.unpacks)
	}
	// A second store on the same cache (a restarted gateway) reuses it.
	s2 := newStore(t, Config{Dir: dir, CacheDir: s.cfg.CacheDir})
	if _, err := s2.Resolve(context.Background(), "alpha:1"); err != nil {
		t.Fatal(err)
	}
	if s2.unpacks != 0 {
		t.Errorf("restarted store unpacked %d times, want 0", s2.unpacks)
	}
}

// hostileTar writes tar entries as given, names and all.
func hostileTar(t *testing.T, entries ...tarEntry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		h.ModTime = time.Unix(1700000000, 0)
		if h.Mode == 0 {
			h.Mode = 0o644
		}
		if h.Typeflag == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if e.body != "" {
			if _, err := tw.Write([]byte(e.body)); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

type tarEntry struct {
	hdr  tar.Header
	body string
}

func reg(name, body string) tarEntry {
	return tarEntry{hdr: tar.Header{Name: name, Typeflag: tar.TypeReg}, body: body}
}

func TestExtractHostileLayers(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("device nodes and ownership need root")
	}
	outside := t.TempDir() // stands for the host
	secret := filepath.Join(outside, "secret")
	if err := os.WriteFile(secret, []byte("host secret"), 0o600); err != nil {
		t.Fatal(err)
	}
	rel := func(p string) string { return "../../../../../../../.." + p }

	tests := []struct {
		name    string
		layers  [][]tarEntry
		wantErr string // "" : extraction succeeds
		check   func(t *testing.T, root string)
	}{
		{
			// mutate.Extract refuses them; the error must not be lost.
			name:    "dotdot paths fail the image",
			layers:  [][]tarEntry{{reg("ok", "fine")}, {reg(rel(outside)+"/dotdot", "x")}},
			wantErr: "unsafe tar path",
			check: func(t *testing.T, root string) {
				mustNotExist(t, filepath.Join(outside, "dotdot"))
			},
		},
		{
			name:   "absolute paths land inside",
			layers: [][]tarEntry{{reg(outside+"/abs", "x")}},
			check: func(t *testing.T, root string) {
				mustNotExist(t, filepath.Join(outside, "abs"))
				mustRead(t, filepath.Join(root, outside, "abs"), "x")
			},
		},
		{
			name: "write through an absolute symlink stays inside",
			layers: [][]tarEntry{{
				{hdr: tar.Header{Name: "esc", Typeflag: tar.TypeSymlink, Linkname: outside}},
				{hdr: tar.Header{Name: "tmpdir", Typeflag: tar.TypeDir, Mode: 0o755}},
			}, {
				reg("esc/pwned", "x"),
			}},
			wantErr: "esc",
			check: func(t *testing.T, root string) {
				mustNotExist(t, filepath.Join(outside, "pwned"))
			},
		},
		{
			name: "write through a relative symlink climbing out stays inside",
			layers: [][]tarEntry{{
				{hdr: tar.Header{Name: "d/", Typeflag: tar.TypeDir, Mode: 0o755}},
				{hdr: tar.Header{Name: "d/up", Typeflag: tar.TypeSymlink, Linkname: rel(outside)}},
			}, {
				reg("d/up/secret", "overwritten"),
			}},
			// mutate.Extract drops the escaping link; the write makes a
			// directory of its own.
			check: func(t *testing.T, root string) {
				mustRead(t, secret, "host secret")
				mustRead(t, filepath.Join(root, "d/up/secret"), "overwritten")
			},
		},
		{
			name: "symlink to a file outside, then a write to it",
			layers: [][]tarEntry{{
				{hdr: tar.Header{Name: "s", Typeflag: tar.TypeSymlink, Linkname: secret}},
			}, {
				reg("s", "overwritten"),
			}},
			check: func(t *testing.T, root string) {
				mustRead(t, secret, "host secret")
				mustRead(t, filepath.Join(root, "s"), "overwritten")
			},
		},
		{
			name: "hard links out resolve inside",
			layers: [][]tarEntry{{
				{hdr: tar.Header{Name: "h1", Typeflag: tar.TypeLink, Linkname: secret}},
				{hdr: tar.Header{Name: "h2", Typeflag: tar.TypeLink, Linkname: rel(secret)}},
			}},
			wantErr: "hard link",
			check: func(t *testing.T, root string) {
				for _, n := range []string{"h1", "h2"} {
					if fi, err := os.Stat(filepath.Join(root, n)); err == nil {
						hi, _ := os.Stat(secret)
						if os.SameFile(fi, hi) {
							t.Errorf("%s is the host's file", n)
						}
					}
				}
			},
		},
		{
			name: "hard link to an in-image file works, even before its target",
			layers: [][]tarEntry{{
				reg("target", "same"),
			}, {
				{hdr: tar.Header{Name: "alias", Typeflag: tar.TypeLink, Linkname: "/target"}},
			}},
			check: func(t *testing.T, root string) {
				a, _ := os.Stat(filepath.Join(root, "alias"))
				b, _ := os.Stat(filepath.Join(root, "target"))
				if a == nil || b == nil || !os.SameFile(a, b) {
					t.Errorf("alias is not a hard link of target")
				}
			},
		},
		{
			name: "device nodes are skipped, setuid stripped",
			layers: [][]tarEntry{{
				{hdr: tar.Header{Name: "mem", Typeflag: tar.TypeChar, Devmajor: 1, Devminor: 1}},
				{hdr: tar.Header{Name: "sda", Typeflag: tar.TypeBlock, Devmajor: 8}},
				{hdr: tar.Header{Name: "suid", Typeflag: tar.TypeReg, Mode: 0o4755}, body: "x"},
			}},
			check: func(t *testing.T, root string) {
				mustNotExist(t, filepath.Join(root, "mem"))
				mustNotExist(t, filepath.Join(root, "sda"))
				fi, err := os.Stat(filepath.Join(root, "suid"))
				if err != nil || fi.Mode()&os.ModeSetuid != 0 || fi.Mode().Perm() != 0o755 {
					t.Errorf("suid file: %v %v", fi, err)
				}
			},
		},
		{
			name: "whiteouts remove lower files and leave no marker",
			layers: [][]tarEntry{{
				reg("gone", "x"), reg("dir/a", "x"), reg("kept", "y"),
			}, {
				reg(".wh.gone", ""), reg("dir/.wh..wh..opq", ""), reg("dir/b", "new"),
			}},
			check: func(t *testing.T, root string) {
				mustNotExist(t, filepath.Join(root, "gone"))
				mustNotExist(t, filepath.Join(root, ".wh.gone"))
				mustNotExist(t, filepath.Join(root, "dir/a"))
				mustNotExist(t, filepath.Join(root, "dir/.wh..wh..opq"))
				mustRead(t, filepath.Join(root, "dir/b"), "new")
				mustRead(t, filepath.Join(root, "kept"), "y")
			},
		},
		{
			name:    "a file over the size cap fails the image",
			layers:  [][]tarEntry{{reg("big", strings.Repeat("x", 5000))}},
			wantErr: "over the 4096-byte cap",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			img := empty.Image
			for _, l := range tt.layers {
				var err error
				img, err = mutate.AppendLayers(img, imagetest.RawLayer(t, hostileTar(t, l...)))
				if err != nil {
					t.Fatal(err)
				}
			}
			root := t.TempDir()
			rc := mutate.Extract(img)
			defer rc.Close()
			_, err := extract(rc, root, extractLimits{maxFileBytes: 4096, maxTotalBytes: 1 << 20})
			switch {
			case tt.wantErr == "" && err != nil:
				t.Fatalf("extract: %v", err)
			case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
				t.Fatalf("extract: err = %v, want one mentioning %q", err, tt.wantErr)
			case err != nil && environmental(err):
				t.Errorf("extract: %v counts as the machine's fault, want the image's", err)
			}
			if tt.check != nil {
				tt.check(t, root)
			}
			mustRead(t, secret, "host secret")
		})
	}
}

func mustNotExist(t *testing.T, p string) {
	t.Helper()
	if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s exists (err %v)", p, err)
	}
}

func mustRead(t *testing.T, p, want string) {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil || string(b) != want {
		t.Errorf("%s = %q, %v; want %q", p, b, err, want)
	}
}

// TestExtractRawSymlinkEscape feeds extract a stream mutate.Extract would
// have cleaned: our own resolution must hold without it.
func TestExtractRawSymlinkEscape(t *testing.T) {
	outside := t.TempDir()
	root := t.TempDir()
	raw := hostileTar(t,
		tarEntry{hdr: tar.Header{Name: "up", Typeflag: tar.TypeSymlink, Linkname: "../../../../../../../.." + outside}},
		reg("up/pwned", "x"),
		tarEntry{hdr: tar.Header{Name: "hl", Typeflag: tar.TypeLink, Linkname: "up/../../../../../../etc/passwd"}},
	)
	_, err := extract(bytes.NewReader(raw), root, extractLimits{maxFileBytes: 1 << 20, maxTotalBytes: 1 << 20})
	if err == nil {
		t.Fatal("extract succeeded writing through an escaping symlink")
	}
	mustNotExist(t, filepath.Join(outside, "pwned"))
	mustNotExist(t, filepath.Join(root, "hl"))
}

// TestOwner: with an Owner, every file of the unpacked image is that
// user's, in a tree of its own.
func TestOwner(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown needs root")
	}
	dir := t.TempDir()
	imagetest.WriteTarball(t, filepath.Join(dir, "a.tar"), map[string]v1.Image{"alpha:1": imagetest.Build(t, imagetest.Spec{Marker: "a"})})
	cache := t.TempDir()
	plain := newStore(t, Config{Dir: dir, CacheDir: cache})
	owned := newStore(t, Config{Dir: dir, CacheDir: cache, Owner: &Owner{UID: 10001, GID: 10002}})
	pi, err := plain.Resolve(context.Background(), "alpha:1")
	if err != nil {
		t.Fatal(err)
	}
	oi, err := owned.Resolve(context.Background(), "alpha:1")
	if err != nil {
		t.Fatal(err)
	}
	if pi.Rootfs == oi.Rootfs {
		t.Fatalf("one tree for two owners: %s", pi.Rootfs)
	}
	for root, want := range map[string][2]uint32{pi.Rootfs: {0, 0}, oi.Rootfs: {10001, 10002}} {
		err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			var st syscall.Stat_t
			if err := syscall.Lstat(p, &st); err != nil {
				return err
			}
			if st.Uid != want[0] || st.Gid != want[1] {
				t.Errorf("%s: owner %d:%d, want %d:%d", p, st.Uid, st.Gid, want[0], want[1])
				return filepath.SkipAll
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range []*Store{plain, owned} {
		if l, err := s.List(); err != nil || len(l) != 1 {
			t.Errorf("List = %+v, %v; want its one tree", l, err)
		}
	}
}

// gatedImage holds its layers' contents back until gate is closed: an
// unpack caught in the middle.
type gatedImage struct {
	v1.Image
	gate chan struct{}
}

type gatedLayer struct {
	v1.Layer
	gate chan struct{}
}

func (g gatedImage) Layers() ([]v1.Layer, error) {
	ls, err := g.Image.Layers()
	out := make([]v1.Layer, len(ls))
	for i, l := range ls {
		out[i] = gatedLayer{l, g.gate}
	}
	return out, err
}

func (g gatedLayer) Uncompressed() (io.ReadCloser, error) {
	<-g.gate
	return g.Layer.Uncompressed()
}

// TestStartingStoreKeepsAnUnpackUnderWay: a second gateway starting on a
// shared cache clears what crashed unpacks left, not an unpack under way.
func TestStartingStoreKeepsAnUnpackUnderWay(t *testing.T) {
	cache := t.TempDir()
	s := newStore(t, Config{CacheDir: cache})
	img := imagetest.Build(t, imagetest.Spec{Marker: "a"})
	digest, err := img.ConfigName()
	if err != nil {
		t.Fatal(err)
	}
	crashed := filepath.Join(cache, "tmp", "crashed-leftover")
	if err := os.MkdirAll(filepath.Join(crashed, "usr"), 0o755); err != nil {
		t.Fatal(err)
	}
	gate := make(chan struct{})
	done := make(chan error, 1)
	go func() {
		_, err := s.unpackCached(digest.String(), gatedImage{img, gate}, "alpha:1", "test")
		done <- err
	}()
	// Wait for the unpack's own directory to appear next to the leftover.
	for {
		ents, _ := os.ReadDir(filepath.Join(cache, "tmp"))
		if len(ents) == 2 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	newStore(t, Config{CacheDir: cache}) // another gateway starts
	close(gate)
	if err := <-done; err != nil {
		t.Fatalf("the unpack under way failed when another store started on its cache: %v", err)
	}
	if got := readFile(t, filepath.Join(s.rootfsDir(digest.String()), "marker")); got != "a" {
		t.Errorf("marker %q", got)
	}
	mustNotExist(t, crashed)
}

// TestOwnerOfImplicitDirs: a layer may list a file without its parent
// directories; those made for it are the Owner's too (else the sandbox, root
// in its user namespace only over the Owner's files, could not write there).
func TestOwnerOfImplicitDirs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("chown needs root")
	}
	img, err := mutate.AppendLayers(empty.Image, imagetest.RawLayer(t, hostileTar(t, reg("usr/lib/python3/site.py", "x"))))
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	imagetest.WriteTarball(t, filepath.Join(dir, "a.tar"), map[string]v1.Image{"implicit:1": img})
	s := newStore(t, Config{Dir: dir, Owner: &Owner{UID: 10001, GID: 10002}})
	im, err := s.Resolve(context.Background(), "implicit:1")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{"usr", "usr/lib", "usr/lib/python3", "usr/lib/python3/site.py"} {
		var st syscall.Stat_t
		if err := syscall.Lstat(filepath.Join(im.Rootfs, p), &st); err != nil {
			t.Fatal(err)
		}
		if st.Uid != 10001 || st.Gid != 10002 {
			t.Errorf("%s: owner %d:%d, want 10001:10002", p, st.Uid, st.Gid)
		}
	}
}
