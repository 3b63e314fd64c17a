package local

import (
	"archive/tar"
	"bytes"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/gateway/image/imagetest"
	"github.com/boxq/boxq/gateway/limits"
)

// requireRoot skips where the gateway cannot mount (images, disks) or make
// cgroups: those need root. CI runs as root with BOXQ_REQUIRE_BWRAP=1.
func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("BOXQ_REQUIRE_BWRAP") != "" {
			t.Fatal("BOXQ_REQUIRE_BWRAP is set but the tests do not run as root: images and limits need it")
		}
		t.Skip("images and limits need root")
	}
	requireBwrap(t)
}

// testImages writes two images into a fresh -images directory: alpha (a
// WorkingDir, an Env) and beta, each with its marker and os-release; and
// gamma, whose User is 1000.
func testImages(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	alpha := imagetest.Build(t, imagetest.Spec{
		Marker: "alpha", OSRelease: "ID=alpha\n", Tools: imagetest.Tools,
		Files:      map[string]string{"srv/app/README": "app"},
		Env:        []string{"PATH=/usr/local/bin:/usr/bin:/bin", "GREETING=hello from alpha"},
		WorkingDir: "/srv/app",
	})
	beta := imagetest.Build(t, imagetest.Spec{Marker: "beta", OSRelease: "ID=beta\n", Tools: imagetest.Tools})
	gamma := imagetest.Build(t, imagetest.Spec{Marker: "gamma", OSRelease: "ID=gamma\n", Tools: imagetest.Tools, User: "1000"})
	imagetest.WriteTarball(t, filepath.Join(dir, "test.tar"), map[string]v1.Image{"alpha:1": alpha, "beta:1": beta, "gamma:1": gamma})
	return dir
}

func (g *testGateway) list(t *testing.T) map[string]gateway.SandboxInfo {
	t.Helper()
	var lr gateway.ListResponse
	decode(t, "list", g.do(t, "GET", "/v1/sandboxes", nil), http.StatusOK, &lr)
	out := map[string]gateway.SandboxInfo{}
	for _, s := range lr.Sandboxes {
		out[s.ID] = s
	}
	return out
}

func TestImageIsTheSandboxRoot(t *testing.T) {
	requireRoot(t)
	g := newGateway(t, Config{Isolation: IsolationBwrap, ImagesDir: testImages(t)})

	a := g.create(t, gateway.CreateRequest{Image: "alpha:1", Cwd: "/root"}, "")
	b := g.create(t, gateway.CreateRequest{Image: "beta:1"}, "")
	// WorkingDir and Env apply; the image's files are the root.
	if got := g.mustRun(t, a, `pwd; echo "$GREETING"; cat /marker /etc/os-release; echo "$PATH"`); got != "/srv/app\nhello from alpha\nalphaID=alpha\n/usr/local/bin:/usr/bin:/bin\n" {
		t.Errorf("alpha sandbox: %q", got)
	}
	if got := g.mustRun(t, b, `pwd; cat /marker /etc/os-release`); got != "/root\nbetaID=beta\n" {
		t.Errorf("beta sandbox: %q", got)
	}
	// An exec's cwd wins over WorkingDir.
	if st := g.exec(t, a, gateway.StartRequest{Command: "pwd", Cwd: "/tmp"}); st.Output != "/tmp\n" {
		t.Errorf("cwd /tmp: %q", st.Output)
	}
	// Writes outside /root and /tmp work, and stay the sandbox's own.
	g.mustRun(t, a, `echo mine > /usr/lib/added && mkdir -p /opt/x && rm /marker`)
	a2 := g.create(t, gateway.CreateRequest{Image: "alpha:1"}, "")
	if got := g.mustRun(t, a2, `cat /marker; ls /usr/lib/added 2>&1 | wc -l; test -e /usr/lib/added && echo leaked || echo clean`); got != "alpha1\nclean\n" {
		t.Errorf("a second alpha sandbox sees: %q", got)
	}
	// The shared cache is untouched.
	var imgs gateway.ImagesResponse
	decode(t, "images", g.do(t, "GET", "/v1/images", nil), http.StatusOK, &imgs)
	if len(imgs.Images) != 2 {
		t.Fatalf("GET /v1/images: %+v, want alpha and beta", imgs)
	}
	for _, im := range imgs.Images {
		// (One tree per owner: "<digest>-u<uid>-g<gid>" for a sandbox user.)
		matches, _ := filepath.Glob(filepath.Join(g.srv.StateDir(), "images", "rootfs", strings.ReplaceAll(im.Digest, ":", "-")+"*"))
		var roots []string
		for _, m := range matches {
			if !strings.HasSuffix(m, ".json") {
				roots = append(roots, m)
			}
		}
		if len(roots) != 1 {
			t.Fatalf("cached trees of %v: %q", im.Refs, roots)
		}
		root := roots[0]
		if _, err := os.Stat(filepath.Join(root, "marker")); err != nil {
			t.Errorf("cached rootfs of %v lost its marker: %v", im.Refs, err)
		}
		if _, err := os.Stat(filepath.Join(root, "usr/lib/added")); err == nil {
			t.Errorf("a sandbox wrote into the cached rootfs of %v", im.Refs)
		}
	}
	info := g.list(t)[a]
	if !info.ImageApplied || info.Image != "alpha:1" || !strings.HasPrefix(info.ImageDigest, "sha256:") {
		t.Errorf("list entry of alpha sandbox: %+v", info)
	}
}

func TestImageUser(t *testing.T) {
	requireRoot(t)
	g := newGateway(t, Config{Isolation: IsolationBwrap, ImagesDir: testImages(t)})
	sb := g.create(t, gateway.CreateRequest{Image: "gamma:1"}, "")
	if got := g.mustRun(t, sb, `id -u; id -g; cat /marker`); got != "1000\n1000\ngamma" {
		t.Errorf("gamma (User 1000): %q", got)
	}
}

func TestImageUnresolvable(t *testing.T) {
	requireRoot(t)
	dir := testImages(t)
	g := newGateway(t, Config{Isolation: IsolationBwrap, ImagesDir: dir})
	r := g.do(t, "POST", "/v1/sandboxes", gateway.CreateRequest{Image: "python:3.11"})
	if r.status != http.StatusBadRequest {
		t.Fatalf("create with an unknown image: status %d (%s), want 400", r.status, r.body)
	}
	for _, want := range []string{`"python:3.11"`, "-images " + dir, "alpha:1", "-pull is off"} {
		if !strings.Contains(r.errorMessage(), want) {
			t.Errorf("error %q does not say %q", r.errorMessage(), want)
		}
	}

	// With the host as fallback: a sandbox on the host's root, which the
	// list says.
	g = newGateway(t, Config{Isolation: IsolationBwrap, ImagesDir: dir, ImageFallbackHost: true})
	sb := g.create(t, gateway.CreateRequest{Image: "python:3.11"}, "")
	g.mustRun(t, sb, "test -x /usr/bin/bash && ! test -e /marker")
	info := g.list(t)[sb]
	if info.ImageApplied || info.Image != "python:3.11" || !strings.Contains(info.ImageNote, "-image-fallback host") {
		t.Errorf("fallback sandbox listed as %+v", info)
	}
}

func TestNoImageSourceKeepsTheHostRoot(t *testing.T) {
	g := newGateway(t, Config{})
	sb := g.create(t, gateway.CreateRequest{Image: "python:3.11"}, "")
	info := g.list(t)[sb]
	if info.ImageApplied || info.Image != "python:3.11" || !strings.Contains(info.ImageNote, "no image source configured") || info.Limits == nil {
		t.Errorf("listed as %+v, want the image recorded, not applied, and the limits said", info)
	}
	if r := g.do(t, "GET", "/v1/images", nil); r.status != http.StatusOK || string(r.body) != `{"images":[]}`+"\n" {
		t.Errorf("GET /v1/images without a source: %d %q", r.status, r.body)
	}
}

func TestImageDefault(t *testing.T) {
	requireRoot(t)
	g := newGateway(t, Config{Isolation: IsolationBwrap, ImagesDir: testImages(t), ImageDefault: "beta:1"})
	sb := g.create(t, gateway.CreateRequest{}, "")
	if got := g.mustRun(t, sb, "cat /marker"); got != "beta" {
		t.Errorf("no image named, -image-default beta:1: marker %q", got)
	}
}

func TestImageConcurrentCreatesUnpackOnce(t *testing.T) {
	requireRoot(t)
	g := newGateway(t, Config{Isolation: IsolationBwrap, ImagesDir: testImages(t)})
	var wg sync.WaitGroup
	ids := make([]string, 10)
	errs := make([]string, 10)
	for i := range 10 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := g.send("POST", "/v1/sandboxes", gateway.CreateRequest{Image: "beta:1"}, "")
			switch {
			case err != nil:
				errs[i] = err.Error()
			case r.status != http.StatusOK:
				errs[i] = string(r.body)
			default:
				ids[i] = "ok"
			}
		}()
	}
	wg.Wait()
	for i, e := range errs {
		if e != "" {
			t.Fatalf("create %d: %s", i, e)
		}
	}
	if n := strings.Count(g.logs.String(), `msg="image unpacked"`); n != 1 {
		t.Errorf("image unpacked %d times, want once", n)
	}
	for id := range g.list(t) {
		if got := g.mustRun(t, id, "cat /marker"); got != "beta" {
			t.Errorf("%s: marker %q", id, got)
		}
	}
}

// limitedGateway is a gateway with cgroup limits, skipping where the
// machine has no cgroups the gateway can use.
func limitedGateway(t *testing.T, cfg Config) *testGateway {
	t.Helper()
	requireRoot(t)
	cfg.Isolation = IsolationBwrap
	cfg.CgroupShim = shimCopy(t) // TestMain runs limits.RunShim
	g := newGateway(t, cfg)
	if g.srv.res.cgroups == nil {
		t.Skipf("no usable cgroups here:\n%s", g.logs.String())
	}
	return g
}

func TestMemoryLimitOOMKill(t *testing.T) {
	g := limitedGateway(t, Config{})
	if !g.srv.res.holds.Memory {
		t.Skip("no memory controller")
	}
	rssBefore := vmRSS(t)
	sb := g.create(t, gateway.CreateRequest{MemoryMiB: 64}, "")
	// tail keeps all of a newline-free input: 512 MiB against 64.
	st := g.exec(t, sb, gateway.StartRequest{Command: "head -c 512M /dev/zero | tail > /dev/null", TimeoutMs: 60000})
	if st.ReturnCode == nil || *st.ReturnCode != 137 || !strings.Contains(st.Output, "memory limit") {
		t.Fatalf("got %s rc %v output %q; want rc 137 and a line about the memory limit", st.Status, st.ReturnCode, st.Output)
	}
	// The sandbox's later commands are unaffected.
	if got := g.mustRun(t, sb, "echo fine"); got != "fine\n" {
		t.Errorf("after the OOM kill: %q", got)
	}
	if info := g.list(t)[sb]; info.Limits == nil || !info.Limits.Memory {
		t.Errorf("listed limits %+v, want memory held", info.Limits)
	}
	if after := vmRSS(t); after > rssBefore+64<<20 {
		t.Errorf("gateway RSS grew from %d to %d bytes", rssBefore, after)
	}
}

func vmRSS(t *testing.T) int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			n, _ := strconv.ParseInt(f[1], 10, 64)
			return n << 10
		}
	}
	t.Fatal("no VmRSS")
	return 0
}

func TestForkBombIsContained(t *testing.T) {
	g := limitedGateway(t, Config{MaxPids: 64})
	if !g.srv.res.holds.Pids {
		t.Skip("no pids controller")
	}
	bomb := g.create(t, gateway.CreateRequest{}, "")
	other := g.create(t, gateway.CreateRequest{}, "")
	// Under the pids cap forks fail and bash gives up on them; the shell
	// sleeps on meanwhile, so the bomb goes on while the checks run.
	g.start(t, bomb, gateway.StartRequest{ExecID: "bomb", Command: `:(){ :|:& };:; sleep 2`, TimeoutMs: 10000})
	// While it runs: the gateway answers, and another sandbox works.
	var slowest time.Duration
	for range 10 {
		t0 := time.Now()
		if r := g.do(t, "GET", "/healthz", nil); r.status != http.StatusOK {
			t.Fatalf("healthz: %d", r.status)
		}
		slowest = max(slowest, time.Since(t0))
	}
	// The target is under 100 ms; it is logged, not asserted (a
	// shared, noisy machine), and recorded in docs/PERFORMANCE.md.
	t.Logf("slowest /healthz during the bomb: %v (target: under 100ms)", slowest)
	if got := g.mustRun(t, other, "true; echo ok"); got != "ok\n" {
		t.Errorf("other sandbox: %q", got)
	}
	end := g.wait(t, bomb, "bomb", 30*time.Second)
	if end.Status == gateway.StatusRunning {
		t.Fatalf("bomb exec did not end: %+v", end)
	}
	if !strings.Contains(end.Output, "Resource temporarily unavailable") {
		t.Errorf("the bomb's forks were not refused: %q", end.Output)
	}
	sb, err := g.srv.lookup(bomb)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the bomb's processes to be gone", func() bool { return len(sb.rt.group.Procs()) == 0 })
	if got := g.mustRun(t, bomb, "echo after"); got != "after\n" {
		t.Errorf("the bomb's sandbox after: %q", got)
	}
}

// TestLimitsWithoutTheBinaryShim: under cgroup v1 the execs join their
// cgroups through the sh shim, so the limits hold where the sandbox user
// cannot run the gateway's binary, and in an embedded gateway (worker -dev)
// that has none. The memory limit is checked by its effect, an OOM kill.
func TestLimitsWithoutTheBinaryShim(t *testing.T) {
	requireRoot(t)
	// Only v1 uses a shim: elsewhere there is nothing to test.
	c, err := limits.Detect(limits.Config{ShimPath: "-"})
	if err != nil {
		t.Fatal(err)
	}
	mode, holds := c.Mode(), c.Holds()
	_ = c.Close()
	if mode != limits.ModeV1 || !holds.Memory {
		t.Skipf("cgroups %s, holds %+v: no cgroup v1 memory controller here", mode, holds)
	}
	unreachable := filepath.Join(t.TempDir(), "gateway") // in a 0700 dir of root's
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(unreachable, b, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, shim := range map[string]string{"binary unreachable": unreachable, "embedded, no binary": ""} {
		t.Run(name, func(t *testing.T) {
			g := newGateway(t, Config{Isolation: IsolationBwrap, CgroupShim: shim})
			if g.srv.launcher.user == nil {
				t.Fatal("the gateway runs as root but bwrap has no sandbox user")
			}
			if g.srv.res.cgroups == nil || !g.srv.res.holds.Memory {
				t.Fatalf("cgroup limits off (holds %+v):\n%s", g.srv.res.holds, g.logs.String())
			}
			if got := g.srv.res.cgroups.Shim(); got != "/bin/sh" {
				t.Errorf("shim %s, want /bin/sh", got)
			}
			sb := g.create(t, gateway.CreateRequest{MemoryMiB: 64}, "")
			st := g.exec(t, sb, gateway.StartRequest{Command: "head -c 512M /dev/zero | tail > /dev/null", TimeoutMs: 60000})
			if st.ReturnCode == nil || *st.ReturnCode != 137 || !strings.Contains(st.Output, "memory limit") {
				t.Errorf("512 MiB under memoryMiB 64: %s rc %v output %q; want rc 137 and a line about the memory limit", st.Status, st.ReturnCode, st.Output)
			}
		})
	}
}

// TestCPULimitThrottles checks the cpu limit by its effect, not by its
// setting: a second of busy loop in a sandbox with cpu 0.2 is held back by
// the kernel (the group's cpu.stat nr_throttled). Without the quota, or
// with the command outside the group, the count stays 0. No time is
// asserted.
func TestCPULimitThrottles(t *testing.T) {
	g := limitedGateway(t, Config{})
	if !g.srv.res.holds.CPU {
		t.Skip("no cpu controller")
	}
	sb := g.create(t, gateway.CreateRequest{CPU: 0.2}, "")
	st := g.exec(t, sb, gateway.StartRequest{Command: `timeout 1 sh -c 'while :; do :; done'; echo "rc=$?"`, TimeoutMs: 60000})
	if st.Output != "rc=124\n" {
		t.Fatalf("busy loop: %s %q, want timeout's rc=124", st.Status, st.Output)
	}
	if info := g.list(t)[sb]; info.Limits == nil || !info.Limits.CPU {
		t.Errorf("listed limits %+v, want cpu held", info.Limits)
	}
	sbx, err := g.srv.lookup(sb)
	if err != nil {
		t.Fatal(err)
	}
	if sbx.rt.group == nil {
		t.Fatal("the sandbox has no cgroup")
	}
	n := sbx.rt.group.CPUThrottled()
	t.Logf("nr_throttled %d", n)
	if n == 0 {
		t.Errorf("a second of busy loop under cpu 0.2 was never throttled: the cpu limit did not hold")
	}
}

func TestDiskLimit(t *testing.T) {
	requireRoot(t)
	g := newGateway(t, Config{Isolation: IsolationBwrap})
	if !g.srv.res.holds.Disk {
		t.Skipf("no disk limits here: %v", g.srv.res.canMount)
	}
	sb := g.create(t, gateway.CreateRequest{DiskMiB: 32}, "")
	st := g.exec(t, sb, gateway.StartRequest{Command: `yes > ~/f; echo "rc=$?"; du -m ~/f | cut -f1`})
	if !strings.Contains(st.Output, "No space left on device") || !strings.Contains(st.Output, "rc=1") {
		t.Fatalf("yes > ~/f: %q, want the write to fail for space", st.Output)
	}
	lines := strings.Fields(st.Output)
	if mib, _ := strconv.Atoi(lines[len(lines)-1]); mib > 32 {
		t.Errorf("~/f is %d MiB, over the 32 MiB disk", mib)
	}
	// The file is on the sandbox's own disk, not the state dir's.
	sbx, _ := g.srv.lookup(sb)
	if !strings.HasPrefix(sbx.dirs.home, filepath.Join(sbx.dir, "disk")) {
		t.Errorf("home %s is not on the sandbox's disk", sbx.dirs.home)
	}
	// /tmp too.
	st = g.exec(t, sb, gateway.StartRequest{Command: `rm ~/f; head -c 40M /dev/zero > /tmp/g; echo "rc=$?"`})
	if !strings.Contains(st.Output, "rc=1") {
		t.Errorf("40 MiB into /tmp: %q", st.Output)
	}
	if info := g.list(t)[sb]; info.Limits == nil || !info.Limits.Disk {
		t.Errorf("listed limits %+v, want disk held", info.Limits)
	}
}

// TestFullDiskIsNotAnOOM: a tmpfs disk's pages count as the sandbox's
// memory. Filling a disk larger than memoryMiB fails the write for space,
// and the sandbox's later commands still run.
func TestFullDiskIsNotAnOOM(t *testing.T) {
	g := limitedGateway(t, Config{})
	if !g.srv.res.holds.Memory || !g.srv.res.holds.Disk {
		t.Skip("no memory controller or no disks")
	}
	sb := g.create(t, gateway.CreateRequest{MemoryMiB: 64, DiskMiB: 96}, "")
	st := g.exec(t, sb, gateway.StartRequest{Command: `head -c 128M /dev/zero > ~/f; echo "rc=$?"`, TimeoutMs: 60000})
	if !strings.Contains(st.Output, "No space left on device") || !strings.Contains(st.Output, "rc=1") {
		t.Fatalf("128 MiB onto a 96 MiB disk with memoryMiB 64: rc %v %q; want the write to fail for space", st.ReturnCode, st.Output)
	}
	// The full disk leaves the processes their memoryMiB.
	if got := g.mustRun(t, sb, "head -c 32M /dev/zero | tail > /dev/null; echo fine"); got != "fine\n" {
		t.Errorf("after the disk filled up: %q", got)
	}
	if info := g.list(t)[sb]; info.Limits == nil || !info.Limits.Memory || !info.Limits.Disk {
		t.Errorf("listed limits %+v, want memory and disk held", info.Limits)
	}
}

func TestImageSnapshotKeepsWrites(t *testing.T) {
	requireRoot(t)
	g := newGateway(t, Config{Isolation: IsolationBwrap, ImagesDir: testImages(t)})
	for _, disk := range []int{0, 16} {
		t.Run("disk"+strconv.Itoa(disk), func(t *testing.T) {
			key := "snap-" + strconv.Itoa(disk)
			// (Cwd: alpha's WorkingDir, /srv/app, is deleted below.)
			req := gateway.CreateRequest{Image: "alpha:1", Cwd: "/tmp", PersistentFilesystem: true, LogicalKey: key, DiskMiB: disk}
			sb := g.create(t, req, "")
			// Writes, a deletion of an image file, a directory of the image
			// replaced by a new one (opaque in the upper layer).
			g.mustRun(t, sb, "echo home > ~/h && echo etc > /etc/added && rm /marker && rm -r /srv && mkdir -p /srv/new")
			decode(t, "terminate", g.do(t, "POST", "/v1/sandboxes/"+sb+"/terminate", gateway.TerminateRequest{SnapshotBeforeTerminate: true}), http.StatusOK, nil)
			sb = g.create(t, req, "")
			if got := g.mustRun(t, sb, "cat ~/h /etc/added; test -e /marker && echo marker back; ls /srv"); got != "home\netc\nnew\n" {
				t.Errorf("restored sandbox: %q", got)
			}
		})
	}
}

func TestLimitsListedWithoutCgroups(t *testing.T) {
	g := newGateway(t, Config{NoCgroups: true})
	sb := g.create(t, gateway.CreateRequest{MemoryMiB: 64, CPU: 1}, "")
	got := g.list(t)[sb].Limits
	if diff := cmp.Diff(&gateway.SandboxLimits{}, got); diff != "" {
		t.Errorf("limits (-want +got):\n%s", diff)
	}
}

// TestHostileImageIs400: an image that cannot be unpacked for what it holds
// is as permanent as one that cannot be found.
func TestHostileImageIs400(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: "../../escape", Typeflag: tar.TypeReg, Mode: 0o644, Size: 1}); err != nil {
		t.Fatal(err)
	}
	tw.Write([]byte("x"))
	tw.Close()
	img, err := mutate.AppendLayers(empty.Image, imagetest.RawLayer(t, buf.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	imagetest.WriteTarball(t, filepath.Join(dir, "bad.tar"), map[string]v1.Image{"bad:1": img})
	g := newGateway(t, Config{Isolation: IsolationBwrap, ImagesDir: dir})
	r := g.do(t, "POST", "/v1/sandboxes", gateway.CreateRequest{Image: "bad:1"})
	if r.status != http.StatusBadRequest || !strings.Contains(r.errorMessage(), "bad image") || !strings.Contains(r.errorMessage(), "unsafe tar path") {
		t.Fatalf("create with a hostile image: %d %s; want 400 saying why", r.status, r.body)
	}
}

// TestImageWorkingDirMade: a WorkingDir the image lacks is made, as a
// container runtime does, and inside the image even through its symlinks.
func TestImageWorkingDirMade(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	outside := t.TempDir() // stands for the host
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	if err := tw.WriteHeader(&tar.Header{Name: "esc", Typeflag: tar.TypeSymlink, Linkname: outside, Mode: 0o777}); err != nil {
		t.Fatal(err)
	}
	tw.Close()
	base := imagetest.Build(t, imagetest.Spec{Marker: "w", Tools: imagetest.Tools})
	deep, err := mutate.Config(base, v1.Config{WorkingDir: "/work/deep", Env: []string{"PATH=/usr/bin:/bin"}})
	if err != nil {
		t.Fatal(err)
	}
	esc, err := mutate.AppendLayers(base, imagetest.RawLayer(t, buf.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	if esc, err = mutate.Config(esc, v1.Config{WorkingDir: "/esc/made", Env: []string{"PATH=/usr/bin:/bin"}}); err != nil {
		t.Fatal(err)
	}
	imagetest.WriteTarball(t, filepath.Join(dir, "w.tar"), map[string]v1.Image{"deep:1": deep, "esc:1": esc})
	g := newGateway(t, Config{Isolation: IsolationBwrap, ImagesDir: dir})

	sb := g.create(t, gateway.CreateRequest{Image: "deep:1"}, "")
	if got := g.mustRun(t, sb, "pwd; touch f && echo writable"); got != "/work/deep\nwritable\n" {
		t.Errorf("WorkingDir /work/deep, absent from the image: %q", got)
	}
	r := g.do(t, "POST", "/v1/sandboxes", gateway.CreateRequest{Image: "esc:1"})
	if _, err := os.Stat(filepath.Join(outside, "made")); err == nil {
		t.Errorf("the gateway made the WorkingDir through the image's symlink, on the host")
	}
	if r.status == http.StatusOK {
		var cr gateway.CreateResponse
		decode(t, "create", r, http.StatusOK, &cr)
		if got := g.mustRun(t, cr.ID, "pwd"); got != "/esc/made\n" {
			t.Errorf("esc sandbox: %q", got)
		}
	}
}

// TestCreateEndingAfterCloseLeavesNoMounts: a create still unpacking its
// image when the gateway closes ends as an orphan; its overlay and disk are
// unmounted, not left behind. (The image's index.json is a FIFO: the
// create waits on it until the test writes it.)
func TestCreateEndingAfterCloseLeavesNoMounts(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	lay := filepath.Join(dir, "gated")
	imagetest.WriteLayout(t, lay, map[string]v1.Image{"1": imagetest.Build(t, imagetest.Spec{Marker: "g"})})
	index := filepath.Join(lay, "index.json")
	body, err := os.ReadFile(index)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(index); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Mkfifo(index, 0o600); err != nil {
		t.Fatal(err)
	}
	g := newGateway(t, Config{Isolation: IsolationBwrap, ImagesDir: dir})
	if !g.srv.res.holds.Disk {
		t.Skip("no disks here")
	}
	t.Cleanup(func() { _ = limits.UnmountUnder(g.srv.sandboxesDir) })

	created := make(chan response, 1)
	go func() {
		r, err := g.send("POST", "/v1/sandboxes", gateway.CreateRequest{Image: "gated:1", DiskMiB: 8}, "")
		if err != nil {
			r.status, r.body = -1, []byte(err.Error())
		}
		created <- r
	}()
	waitFor(t, 30*time.Second, "the create to be under way", func() bool {
		g.srv.mu.Lock()
		defer g.srv.mu.Unlock()
		return g.srv.creating == 1
	})
	if err := g.srv.Close(t.Context()); err != nil {
		t.Fatal(err)
	}
	// Open the gate: the FIFO gets the index once, the file itself after.
	f, err := os.OpenFile(index, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(index+".real", body, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(index+".real", index); err != nil {
		t.Fatal(err)
	}
	f.Write(body)
	f.Close()
	if r := <-created; r.status == http.StatusOK {
		t.Fatalf("a create ending after Close answered %d %s", r.status, r.body)
	}
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], g.srv.sandboxesDir+"/") {
			t.Errorf("left mounted after the orphan create: %s", f[4])
		}
	}
}

// TestLimitsSaidOnceAtStart: what the gateway cannot enforce it says at
// start, once, and the list agrees per sandbox. (This embedded gateway has
// no binary shim: on a v1 machine its limits hold through the sh shim, as
// root; not at all without root.)
func TestLimitsSaidOnceAtStart(t *testing.T) {
	g := newGateway(t, Config{})
	atStart := strings.Count(g.logs.String(), "not enforced")
	cg := g.srv.res.cgroups != nil
	if !cg && atStart == 0 {
		t.Fatalf("no cgroups, and the start log does not say so:\n%s", g.logs.String())
	}
	var ids []string
	for range 3 {
		ids = append(ids, g.create(t, gateway.CreateRequest{MemoryMiB: 64, CPU: 1}, ""))
	}
	if n := strings.Count(g.logs.String(), "not enforced"); n != atStart {
		t.Errorf("%d 'not enforced' lines after three creates, %d at start: want them once", n, atStart)
	}
	list := g.list(t)
	for _, id := range ids {
		l := list[id].Limits
		if l == nil || l.Memory != (cg && g.srv.res.holds.Memory) || l.CPU != (cg && g.srv.res.holds.CPU) || l.Pids || l.Disk {
			t.Errorf("%s: limits %+v; cgroups %v, gateway holds %+v (no -max-pids, no diskMiB asked)", id, l, cg, g.srv.res.holds)
		}
	}
}

// TestImagePull: with Pull, an image comes from its registry (an in-process
// one on loopback: no network).
func TestImagePull(t *testing.T) {
	requireRoot(t)
	host := imagetest.Registry(t)
	imagetest.Push(t, host+"/team/pulled:1", imagetest.Build(t, imagetest.Spec{Marker: "pulled", OSRelease: "ID=pulled\n", Tools: []string{"cat"}}))
	g := newGateway(t, Config{Isolation: IsolationBwrap, Pull: true})
	sb := g.create(t, gateway.CreateRequest{Image: host + "/team/pulled:1"}, "")
	if got := g.mustRun(t, sb, "cat /marker /etc/os-release"); got != "pulledID=pulled\n" {
		t.Errorf("pulled image: %q", got)
	}
	r := g.do(t, "POST", "/v1/sandboxes", gateway.CreateRequest{Image: host + "/team/absent:1"})
	if r.status != http.StatusBadRequest || !strings.Contains(r.errorMessage(), "registry "+host) {
		t.Errorf("absent image: %d %s; want 400 naming the registry", r.status, r.body)
	}
}

// TestLeftoverMountsOfACrashAreUnmounted: a gateway that died with
// sandboxes mounted leaves their disks and overlays; the next start on the
// state dir unmounts them before it removes the sandboxes' files.
func TestLeftoverMountsOfACrashAreUnmounted(t *testing.T) {
	requireRoot(t)
	state := t.TempDir()
	disk := filepath.Join(state, "sandboxes", "sb-crashed", "disk")
	if err := os.MkdirAll(disk, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := limits.MountTmpfs(disk, 1); err != nil {
		t.Skipf("cannot mount: %v", err)
	}
	t.Cleanup(func() { _ = limits.Unmount(disk) })
	newGateway(t, Config{StateDir: state})
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), disk) {
		t.Errorf("%s is still mounted", disk)
	}
	if _, err := os.Stat(filepath.Dir(disk)); !os.IsNotExist(err) {
		t.Errorf("the crashed sandbox's dir is still there: %v", err)
	}
}

// shimCopy is a copy of this test binary that the sandbox user can run:
// the cgroup v1 shim runs with the exec's credentials.
func shimCopy(t *testing.T) string {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, d := range []string{dir, filepath.Dir(dir)} {
		if err := os.Chmod(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	shim := filepath.Join(dir, "shim")
	if err := os.WriteFile(shim, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return shim
}
