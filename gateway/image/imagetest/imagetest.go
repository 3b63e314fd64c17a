// Package imagetest builds small, real OCI images for tests, from files of
// this machine: bash and a few tools with the shared libraries ldd lists,
// a marker file and an /etc/os-release of the test's choosing. No network.
package imagetest

import (
	"archive/tar"
	"bytes"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Spec describes a test image.
type Spec struct {
	Marker     string            // content of /marker
	OSRelease  string            // content of /etc/os-release
	Tools      []string          // more binaries besides bash (cat, sleep …), with their libraries
	Files      map[string]string // more files: path → content
	Env        []string
	WorkingDir string
	User       string
}

// Tools most tests want in an image.
var Tools = []string{"cat", "sleep", "yes", "head", "tail", "cut", "du", "ls", "id", "env", "rm", "mkdir", "touch", "true", "wc", "dd"}

// Build returns an image of two layers: the host binaries, then the
// spec's own files (so the flattening is exercised too).
func Build(t testing.TB, s Spec) v1.Image {
	t.Helper()
	files := map[string]string{} // path in image → host path
	links := map[string]string{}
	for _, d := range []string{"bin", "lib", "lib64", "sbin"} {
		if target, err := os.Readlink("/" + d); err == nil {
			links[d] = target // usrmerge: keep the host's layout
		}
	}
	for _, tool := range append([]string{"bash"}, s.Tools...) {
		p, err := exec.LookPath(tool)
		if err != nil {
			t.Fatalf("imagetest: %s: %v", tool, err)
		}
		addWithLibs(t, files, p)
	}
	if _, ok := links["bin"]; ok {
		// /bin/sh for anything that wants it.
		links["usr/bin/sh"] = "bash"
	} else {
		links["bin/sh"] = "bash"
	}
	base := Layer(t, hostFiles(t, files), links)

	own := map[string]string{
		"marker":         s.Marker,
		"etc/os-release": s.OSRelease,
		"etc/passwd":     "root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/bin/bash\nu1000:x:1000:1000::/home/u1000:/bin/bash\n",
		"etc/group":      "root:x:0:\nnogroup:x:65534:\nu1000:x:1000:\n",
	}
	for k, v := range s.Files {
		own[k] = v
	}
	top := Layer(t, own, nil)
	img, err := mutate.AppendLayers(empty.Image, base, top)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtimeArch()
	cf.Config.Env = s.Env
	cf.Config.WorkingDir = s.WorkingDir
	cf.Config.User = s.User
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func hostFiles(t testing.TB, files map[string]string) map[string]string {
	out := map[string]string{}
	for dst, src := range files {
		b, err := os.ReadFile(src)
		if err != nil {
			t.Fatal(err)
		}
		out[dst] = string(b)
	}
	return out
}

// addWithLibs adds a binary and every library ldd lists for it, at their
// real (symlink-resolved) paths.
func addWithLibs(t testing.TB, files map[string]string, bin string) {
	real, err := filepath.EvalSymlinks(bin)
	if err != nil {
		t.Fatal(err)
	}
	files[strings.TrimPrefix(real, "/")] = real
	if real != bin {
		// Keep the name it was found under (e.g. /usr/bin/true → real
		// coreutils binary elsewhere).
		files[strings.TrimPrefix(bin, "/")] = real
	}
	out, err := exec.Command("ldd", real).Output()
	if err != nil {
		return // static binary
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		var lib string
		switch {
		case len(f) >= 3 && f[1] == "=>":
			lib = f[2]
		case len(f) >= 1 && strings.HasPrefix(f[0], "/"):
			lib = f[0]
		}
		if lib == "" {
			continue
		}
		// The loader must also be reachable at the path the binary names
		// (/lib64/ld-linux…), which the usrmerge links give.
		r, err := filepath.EvalSymlinks(lib)
		if err != nil {
			continue
		}
		files[strings.TrimPrefix(r, "/")] = r
		if dir, _ := filepath.EvalSymlinks(filepath.Dir(lib)); dir != filepath.Dir(lib) || filepath.Base(lib) != filepath.Base(r) {
			files[strings.TrimPrefix(filepath.Join(dir, filepath.Base(lib)), "/")] = r
		}
	}
}

// Layer makes an uncompressed layer of regular files (path → content) and
// symlinks (path → target), with the parent directories.
func Layer(t testing.TB, files, symlinks map[string]string) v1.Layer {
	t.Helper()
	var entries []tar.Header
	dirs := map[string]bool{}
	addDirs := func(p string) {
		for d := filepath.Dir(p); d != "." && d != "/"; d = filepath.Dir(d) {
			dirs[d] = true
		}
	}
	for p := range files {
		addDirs(p)
	}
	for p := range symlinks {
		addDirs(p)
	}
	for d := range dirs {
		if _, isLink := symlinks[d]; isLink {
			continue
		}
		entries = append(entries, tar.Header{Name: d + "/", Typeflag: tar.TypeDir, Mode: 0o755})
	}
	for p, target := range symlinks {
		entries = append(entries, tar.Header{Name: p, Typeflag: tar.TypeSymlink, Linkname: target, Mode: 0o777})
	}
	for p, c := range files {
		entries = append(entries, tar.Header{Name: p, Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(c))})
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].Name < entries[j].Name })
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, h := range entries {
		h.ModTime = time.Unix(1700000000, 0)
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatal(err)
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := io.WriteString(tw, files[h.Name]); err != nil {
				t.Fatal(err)
			}
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return RawLayer(t, buf.Bytes())
}

// RawLayer makes a layer of a tar stream as is (hostile layers included).
func RawLayer(t testing.TB, tarBytes []byte) v1.Layer {
	t.Helper()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(tarBytes)), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// WriteTarball writes images as one docker-save archive, tagged.
func WriteTarball(t testing.TB, path string, images map[string]v1.Image) {
	t.Helper()
	m := map[name.Tag]v1.Image{}
	for tag, img := range images {
		tg, err := name.NewTag(tag)
		if err != nil {
			t.Fatal(err)
		}
		m[tg] = img
	}
	if err := tarball.MultiWriteToFile(path, m); err != nil {
		t.Fatal(err)
	}
}

// WriteLayout writes images into an OCI image layout, each named by the
// ref-name annotation as given (a full reference or a bare tag).
func WriteLayout(t testing.TB, dir string, images map[string]v1.Image) {
	t.Helper()
	lp, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	for ref, img := range images {
		if err := lp.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": ref})); err != nil {
			t.Fatal(err)
		}
	}
}

// Registry serves an in-process registry (pkg/registry) on a loopback
// httptest server and returns its host:port; go-containerregistry talks
// plain HTTP to loopback registries.
func Registry(t testing.TB) string {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(discardLogger())))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// Push pushes img to ref.
func Push(t testing.TB, ref string, img v1.Image) {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatal(err)
	}
}

func discardLogger() *log.Logger { return log.New(io.Discard, "", 0) }

func runtimeArch() string { return runtime.GOARCH }
