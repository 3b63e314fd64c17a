package e2e

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// EnvRequireChromium, set to 1 (as CI does), makes a missing Chromium a test
// failure instead of a skip.
const EnvRequireChromium = "BOXQ_REQUIRE_CHROMIUM"

// chromium returns the path of a headless-capable Chromium, or skips the
// test (fails it under BOXQ_REQUIRE_CHROMIUM=1) when there is none.
func chromium(t *testing.T) string {
	t.Helper()
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	if os.Getenv(EnvRequireChromium) == "1" {
		t.Fatalf("chromium not found and %s=1: apt-get install -y chromium", EnvRequireChromium)
	}
	t.Skipf("chromium not found: the dashboard is not checked in a browser (apt-get install -y chromium; %s=1 makes this a failure)", EnvRequireChromium)
	return ""
}

// checkDashboard loads the asynqmon dashboard of the worker at addr in
// headless Chromium, logged in with token (HTTP Basic, as a user typing it
// in the browser's prompt: credentials in the URL answer the same
// challenge), lets its React app fetch /monitoring/api/queues, and looks
// for the queue in the rendered page; it also saves a screenshot and logs
// its path. Without the token the page must not load.
func checkDashboard(t *testing.T, addr, token, queue string) {
	t.Helper()
	bin := chromium(t)
	url := "http://boxq:" + token + "@" + addr + "/monitoring/"

	if dom := runChromium(t, bin, "--dump-dom", "http://"+addr+"/monitoring/"); strings.Contains(dom, "/monitoring/queues/") {
		t.Errorf("the dashboard loaded without the token:\n%.2048s", dom)
	}
	dom := runChromium(t, bin, "--dump-dom", url)
	// The queues table links each queue's page; the sidebar and the title
	// are there even when the API call failed, so they prove nothing.
	link := `href="/monitoring/queues/` + queue + `"`
	if !strings.Contains(dom, link) {
		t.Errorf("the rendered dashboard has no %s: the queues did not load\nDOM (first 4 KiB):\n%.4096s", link, dom)
	}

	dir := os.Getenv("BOXQ_SCREENSHOT_DIR")
	if dir == "" {
		var err error
		if dir, err = os.MkdirTemp("", "boxq-dashboard-"); err != nil {
			t.Fatal(err)
		}
	}
	shot := filepath.Join(dir, "dashboard.png")
	runChromium(t, bin, "--screenshot="+shot, "--window-size=1280,800", url)
	if fi, err := os.Stat(shot); err != nil || fi.Size() == 0 {
		t.Errorf("no screenshot at %s: %v", shot, err)
	} else {
		t.Logf("dashboard screenshot: %s", shot)
	}
}

// runChromium runs headless Chromium with a throwaway profile, networking
// to nothing but the page, and returns its stdout.
func runChromium(t *testing.T, bin string, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	argv := append([]string{
		"--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
		"--disable-quic", "--no-first-run", "--disable-background-networking",
		"--disable-component-update", "--disable-sync",
		// Every name but the page's fails at once: the dashboard asks
		// for web fonts, which neither CI nor the test needs.
		"--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
		"--user-data-dir=" + t.TempDir(),
		// Virtual time runs until the page has been idle for this long (in
		// virtual milliseconds), so the app's fetches finish before the
		// dump, without a real wait.
		"--virtual-time-budget=10000",
	}, args...)
	cmd := exec.CommandContext(ctx, bin, argv...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	cmd.WaitDelay = 5 * time.Second
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("chromium %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return string(out)
}
