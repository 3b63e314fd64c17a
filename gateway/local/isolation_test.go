package local

import (
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/boxq/boxq/gateway"
)

// TestIsolation checks what a command must not reach under bubblewrap.
// Without isolation the same probes run as controls where they should
// reach it: they show that each probe can see a leak when there is one.
func TestIsolation(t *testing.T) {
	const (
		control = "control"
		hidden  = "hidden"
	)
	secretVal := "secret-" + uuid.NewString()
	t.Setenv("BOXQ_TEST_SECRET", secretVal)
	token := "tok-" + uuid.NewString()
	t.Setenv("GATEWAY_TOKEN", token)

	// A file in the host's /root, which a sandbox's /root must hide.
	hostFile := filepath.Join("/root", "boxq-isolation-"+uuid.NewString())
	hostFileOK := os.WriteFile(hostFile, []byte("host"), 0o600) == nil
	if hostFileOK {
		t.Cleanup(func() { os.Remove(hostFile) })
	}
	usrFile := "/usr/boxq-isolation-" + uuid.NewString()
	t.Cleanup(func() { os.Remove(usrFile) })

	eachIsolation(t, func(t *testing.T, mode Isolation) {
		// Under /tmp the sandbox's own /tmp would hide the state dir
		// anyway: put it elsewhere, so that its own cover is what is tested.
		stateDir := newStateDir(t)
		if d, err := os.MkdirTemp("/var/tmp", "boxq-isolation-"); err == nil {
			stateDir = d
			t.Cleanup(func() { os.RemoveAll(d) })
		}
		g := newGateway(t, Config{Isolation: mode, Token: token, StartWait: -1, StateDir: stateDir})
		u, err := url.Parse(g.url)
		if err != nil {
			t.Fatal(err)
		}
		self := g.newSandbox(t)
		other := g.newSandbox(t)
		g.mustRun(t, other, "echo other-secret > ~/secret")
		g.srv.mu.Lock()
		otherHome := g.srv.sandboxes[other].dirs.home
		g.srv.mu.Unlock()
		marker := newMarker()
		g.start(t, other, gateway.StartRequest{Command: markerCommand(marker), TimeoutMs: 60_000})
		waitMarker(t, marker, true, 10*time.Second)

		tests := []struct {
			name    string
			skip    string // why the check cannot run here, if it cannot
			command string
			leaked  func(out string) bool
			// Without isolation: control, the probe reaches its target
			// (which shows it would see a leak); hidden, it does not
			// either; otherwise the probe does not run.
			without string
		}{
			{
				name:    "another sandbox's home by its path inside",
				command: "cat /root/secret 2>&1",
				leaked:  func(out string) bool { return strings.Contains(out, "other-secret") },
			},
			{
				name:    "another sandbox's files in the state dir",
				command: fmt.Sprintf("cat %s/secret 2>&1", otherHome),
				leaked:  func(out string) bool { return strings.Contains(out, "other-secret") },
				without: control,
			},
			{
				name:    "the state dir",
				command: fmt.Sprintf("ls -A %s 2>&1", g.srv.stateDir),
				leaked:  func(out string) bool { return strings.Contains(out, "sandboxes") },
				without: control,
			},
			{
				name:    "the host's /root",
				skip:    map[bool]string{false: "cannot write a file in the host's /root"}[hostFileOK],
				command: fmt.Sprintf("cat %s 2>&1", hostFile),
				leaked:  func(out string) bool { return strings.Contains(out, "host") && !strings.Contains(out, "No such file") },
				without: control,
			},
			{
				name:    "writing to /usr",
				command: fmt.Sprintf("touch %s 2>&1 && echo written", usrFile),
				leaked:  func(out string) bool { return strings.Contains(out, "written") },
			},
			{
				name:    "the gateway's port",
				command: fmt.Sprintf("echo > /dev/tcp/127.0.0.1/%s && echo connected", u.Port()),
				leaked:  func(out string) bool { return strings.Contains(out, "connected") },
				without: control,
			},
			{
				name:    "the gateway's environment",
				command: "env",
				leaked: func(out string) bool {
					return strings.Contains(out, secretVal) || strings.Contains(out, token) || strings.Contains(out, "BOXQ_TEST_SECRET")
				},
				without: hidden,
			},
			{
				name:    "the gateway's process",
				command: fmt.Sprintf("tr '\\0' ' ' < /proc/%d/cmdline", os.Getpid()),
				leaked:  func(out string) bool { return strings.Contains(out, os.Args[0]) },
				without: control,
			},
			{
				name: "another sandbox's processes",
				// argv[0] of every process in sight; the marker is not in
				// this command, so only the other sandbox can show it.
				command: `for p in /proc/[0-9]*; do read -r -d '' a0 < $p/cmdline; echo "$a0"; done 2>/dev/null; true`,
				leaked:  func(out string) bool { return strings.Contains(out, marker) },
				without: control,
			},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				if tt.skip != "" {
					t.Skip(tt.skip)
				}
				if mode == IsolationNone && tt.without == "" {
					t.Skip("no isolation, and no control for this probe")
				}
				st := g.run(t, self, tt.command)
				leaked := tt.leaked(st.Output)
				if (mode == IsolationBwrap || tt.without == hidden) && leaked {
					t.Errorf("%q reached what it must not: got %s/%d %q", tt.command, st.Status, st.RC(), st.Output)
				}
				if mode == IsolationNone && tt.without == control && !leaked {
					t.Errorf("control: %q without isolation: got %s/%d %q, want it to reach its target", tt.command, st.Status, st.RC(), st.Output)
				}
				t.Logf("%s: %s/%d %q", mode, st.Status, st.RC(), st.Output[:min(len(st.Output), 200)])
			})
		}
	})
}
