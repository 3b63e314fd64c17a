package e2e

import (
	"bufio"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/boxq/boxq/gateway/image/imagetest"
	"github.com/boxq/boxq/internal/redistest"
	"github.com/boxq/boxq/jobs"
)

// TestImagesAndLimitsPipeline runs jobs that name a test image and a memory
// size through the whole pipeline: enqueue → Redis → worker → the gateway
// binary with -images and -max-pids (its cgroup v1 shim included) →
// bubblewrap in the image's overlay.
func TestImagesAndLimitsPipeline(t *testing.T) {
	if os.Geteuid() != 0 || !isBwrapWorking() {
		if os.Getenv("BOXQ_REQUIRE_BWRAP") == "1" {
			t.Fatal("BOXQ_REQUIRE_BWRAP=1 but images need root and a working bubblewrap")
		}
		t.Skip("images need root and a working bubblewrap")
	}
	binaries(t) // build before starting anything with a deadline

	images := t.TempDir()
	alpha := imagetest.Build(t, imagetest.Spec{
		Marker: "alpha", OSRelease: "ID=alpha\n", Tools: imagetest.Tools,
		Files:      map[string]string{"srv/app/README": "app"},
		Env:        []string{"PATH=/usr/bin:/bin", "GREETING=hello"},
		WorkingDir: "/srv/app",
	})
	imagetest.WriteTarball(t, filepath.Join(images, "alpha.tar"), map[string]v1.Image{"boxq-test/alpha:1": alpha})

	srv := redistest.StartServer(t)
	token := randomToken(t)
	gwAddr := freeAddr(t)
	gw := start(t, progGateway, []string{progGateway, "-addr", gwAddr, "-state-dir", t.TempDir(), "-isolation", "bwrap",
		"-images", images, "-max-pids", "256"}, map[string]string{"GATEWAY_TOKEN": token})
	waitHealthy(t, gw, gwAddr, startLimit)
	wAddr := freeAddr(t)
	w := start(t, progWorker, []string{progWorker, "-http", wAddr}, map[string]string{
		"REDIS_URL": srv.URL(0), "GATEWAY_URL": "http://" + gwAddr, "GATEWAY_TOKEN": token,
	})
	waitHealthy(t, w, wAddr, startLimit)

	batch := filepath.Join(t.TempDir(), "batch.jsonl")
	lines := []map[string]any{
		{"id": "img-1", "task_id": "img", "image": "boxq-test/alpha:1", "command": `cat /marker /etc/os-release; pwd; echo "$GREETING"`},
		{"id": "img-2", "task_id": "nope", "image": "boxq-test/nope:1", "command": "true"},
		{"id": "img-3", "task_id": "mem", "image": "boxq-test/alpha:1", "memory_mib": 64, "command": "head -c 512M /dev/zero | tail > /dev/null"},
	}
	var b strings.Builder
	for _, l := range lines {
		j, _ := json.Marshal(l)
		b.Write(j)
		b.WriteByte('\n')
	}
	if err := os.WriteFile(batch, []byte(b.String()), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), batchLimit)
	defer cancel()
	stdout, stderr, _ := run(ctx, t, []string{progEnqueue, "-redis", srv.URL(0), "-f", batch, "-wait"}, nil)
	results := map[string]jobs.Result{}
	sc := bufio.NewScanner(strings.NewReader(stdout))
	for sc.Scan() {
		var r jobs.Result
		if err := json.Unmarshal(sc.Bytes(), &r); err != nil {
			t.Fatalf("result line %q: %v", sc.Text(), err)
		}
		results[r.ID] = r
	}
	if len(results) != len(lines) {
		t.Fatalf("%d results, want %d\nstdout:\n%s\nstderr:\n%s\ngateway:\n%s", len(results), len(lines), stdout, stderr, gw.out.String())
	}
	if r := results["img-1"]; r.Status != jobs.StatusCompleted || r.Output != "alphaID=alpha\n/srv/app\nhello\n" {
		t.Errorf("img-1: %s rc %d output %q error %q", r.Status, r.ReturnCode, r.Output, r.Error)
	}
	// An unresolvable image: the gateway's 400 in the job's error, and no
	// retry.
	if r := results["img-2"]; r.Status != jobs.StatusError || !strings.Contains(r.Error, "boxq-test/nope:1") || !strings.Contains(r.Error, "-images "+images) || r.Attempts != 1 {
		t.Errorf("img-2: %s attempts %d error %q; want error naming the image and where it looked, 1 attempt", r.Status, r.Attempts, r.Error)
	}
	if r := results["img-3"]; r.ReturnCode != 137 || !strings.Contains(r.Output, "memory limit") {
		t.Errorf("img-3: %s rc %d output %q error %q; want rc 137 and the memory limit said", r.Status, r.ReturnCode, r.Output, r.Error)
	}
	for _, p := range []*proc{w, gw} {
		if code := p.stop(t, stopLimit); code != 0 {
			t.Errorf("%s exited %d after SIGTERM\n%s", p.name, code, p.out.String())
		}
	}
}
