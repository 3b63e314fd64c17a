package local

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/google/go-cmp/cmp"
)

func TestCapBuffer(t *testing.T) {
	tests := []struct {
		name   string
		limit  int
		writes []string
		want   string
	}{
		{"empty", 10, nil, ""},
		{"under the limit", 10, []string{"abc", "def"}, "abcdef"},
		{"at the limit", 10, []string{"abcde", "fghij"}, "abcdefghij"},
		{"one over", 10, []string{"abcdefghijk"}, "abcde\n[... 1 bytes omitted ...]\nghijk"},
		{"one big write", 10, []string{strings.Repeat("x", 5) + strings.Repeat("-", 100) + "12345"}, "xxxxx\n[... 100 bytes omitted ...]\n12345"},
		{"many small writes wrap the tail", 6, []string{"a", "b", "c", "d", "e", "f", "g", "h", "i", "j"}, "abc\n[... 4 bytes omitted ...]\nhij"},
		{"a write larger than the tail after small ones", 6, []string{"abc", "de", "fghijklmn"}, "abc\n[... 8 bytes omitted ...]\nlmn"},
		{"odd limit", 5, []string{"0123456789"}, "01\n[... 5 bytes omitted ...]\n789"},
		{"limit 1", 1, []string{"abc"}, "\n[... 2 bytes omitted ...]\nc"},
		{"UTF-8 kept whole at both cuts", 8, []string{"aaaé" + strings.Repeat("-", 10) + "ééb"}, "aaa\n[... 14 bytes omitted ...]\néb"},
	}
	for _, tt := range tests {
		for _, spill := range []bool{false, true} {
			t.Run(fmt.Sprintf("%s/spill=%v", tt.name, spill), func(t *testing.T) {
				b := newCapBuffer(tt.limit, "")
				if spill {
					// Into a file from the first byte on.
					b = newCapBuffer(tt.limit, t.TempDir())
					b.st.memMax = 0
				}
				total := 0
				for _, w := range tt.writes {
					n, err := b.Write([]byte(w))
					if n != len(w) || err != nil {
						t.Fatalf("Write(%q): got %d, %v, want %d, nil", w, n, err, len(w))
					}
					total += n
				}
				got, omitted := b.Result()
				if got != tt.want {
					t.Errorf("got %q, want %q", got, tt.want)
				}
				// The count it returns is the one it wrote in the output.
				wantOmitted := int64(0)
				if _, after, ok := strings.Cut(tt.want, "[... "); ok {
					fmt.Sscanf(after, "%d", &wantOmitted)
				}
				if omitted != wantOmitted {
					t.Errorf("got omitted %d, want %d", omitted, wantOmitted)
				}
				if b.total != int64(total) {
					t.Errorf("got total %d, want %d", b.total, total)
				}
				if spill && total > 0 && b.st.f == nil && b.st.mem != nil {
					t.Errorf("spill: the bytes stayed in memory")
				}
			})
		}
	}
}

func TestCapBufferValidUTF8(t *testing.T) {
	// Whatever the cut points, text stays text.
	text := strings.Repeat("héllo wörld ✓ 🚀 ", 50)
	for limit := 2; limit < 64; limit++ {
		b := newCapBuffer(limit, "")
		for i := 0; i < len(text); i += 7 {
			_, _ = b.Write([]byte(text[i:min(i+7, len(text))]))
		}
		if got, _ := b.Result(); !utf8.ValidString(got) {
			t.Errorf("limit %d: got invalid UTF-8 %q", limit, got)
		}
	}
}

func TestSafeName(t *testing.T) {
	keys := []string{"task-1", "task_1", "task/1", "task 1", "../../etc", "..", "", "ü", strings.Repeat("k", 5000), strings.Repeat("k", 5001)}
	seen := map[string]string{}
	for _, k := range keys {
		name := safeName(k)
		if prev, dup := seen[name]; dup {
			t.Errorf("keys %q and %q share the name %q", prev, k, name)
		}
		seen[name] = k
		if strings.ContainsAny(name, "/.\\ \x00") || filepath.Base(name) != name || len(name) > 60 {
			t.Errorf("safeName(%q) = %q: want a short name of [A-Za-z0-9_-]", k, name)
		}
	}
	if got := safeName("task-1"); !strings.HasPrefix(got, "task-1-") {
		t.Errorf("safeName(task-1) = %q: want it readable", got)
	}
}

func TestHostPath(t *testing.T) {
	dirs := fsDirs{home: "/s/fs/root", tmp: "/s/fs/tmp"}
	tests := []struct{ in, want string }{
		{"/root", "/s/fs/root"},
		{"/root/", "/s/fs/root"},
		{"/root/work/x", "/s/fs/root/work/x"},
		{"/root/../etc", "/etc"},
		{"/rootkit", "/rootkit"},
		{"/tmp", "/s/fs/tmp"},
		{"/tmp/a", "/s/fs/tmp/a"},
		{"/usr/bin", "/usr/bin"},
		{"/", "/"},
	}
	for _, tt := range tests {
		if got := hostPath(dirs, tt.in); got != tt.want {
			t.Errorf("hostPath(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestBwrapArgs(t *testing.T) {
	l := launcher{mode: IsolationBwrap, bwrap: "bwrap", view: mustHostView(t, "/state", "/state/sandboxes")}
	args := l.bwrapArgs(fsDirs{home: "/state/s/root", tmp: "/state/s/tmp"}, "/root/w", "echo hi")
	joined := strings.Join(args, " ")
	for _, want := range []string{
		"--unshare-all", "--unshare-user", "--disable-userns", "--cap-drop ALL", "--die-with-parent", "--new-session", "--clearenv",
		"--ro-bind /usr /usr", "--dev /dev", "--proc /proc",
		"--bind /state/s/root /root", "--bind /state/s/tmp /tmp",
		"--setenv HOME /root", "--chdir /root/w", "-- bash -c echo hi",
	} {
		if !strings.Contains(joined, want) {
			t.Errorf("bwrap args %q: want %q in them", joined, want)
		}
	}
	// Only the roots a shell needs: never the host's root, /run, /sys, /home.
	for _, bad := range []string{"--ro-bind / /", "/run", "/sys", "/home", "/state "} {
		if strings.Contains(joined, bad) {
			t.Errorf("bwrap args %q: want no %q in them", joined, bad)
		}
	}
	if _, err := os.Stat("/etc/shadow"); err == nil && !strings.Contains(joined, "--ro-bind /dev/null /etc/shadow") {
		t.Errorf("bwrap args %q: want /etc/shadow covered", joined)
	}
	// Later mounts cover earlier ones: /etc first, its secrets after it,
	// the sandbox's own dirs last.
	order := []string{"--ro-bind /etc /etc", "--ro-bind /dev/null /etc/shadow", "--bind /state/s/root /root"}
	last := -1
	for _, o := range order {
		i := strings.Index(joined, o)
		if i >= 0 && i < last {
			t.Errorf("bwrap args %q: want %q after the mounts before it", joined, o)
		}
		last = max(last, i)
	}
}

func TestConfig(t *testing.T) {
	t.Run("defaults", func(t *testing.T) {
		got := Config{Token: "t"}.withDefaults()
		want := map[string]any{
			"Isolation": IsolationAuto, "BwrapPath": "bwrap", "MaxSandboxes": 64, "MaxRunningExecs": 1024,
			"OutputLimit": 1 << 20, "StartWait": 50 * time.Millisecond, "ExecRetention": 10 * time.Minute,
			"JanitorInterval": time.Second, "MaxSandboxRunningExecs": 64, "MaxRetainedExecs": 4096,
			"MaxRetainedBytes": int64(256 << 20), "MaxTombstones": 256 << 10, "SandboxUID": 65534, "SandboxGID": 65534,
		}
		have := map[string]any{
			"Isolation": got.Isolation, "BwrapPath": got.BwrapPath, "MaxSandboxes": got.MaxSandboxes, "MaxRunningExecs": got.MaxRunningExecs,
			"OutputLimit": got.OutputLimit, "StartWait": got.StartWait, "ExecRetention": got.ExecRetention,
			"JanitorInterval": got.JanitorInterval, "MaxSandboxRunningExecs": got.MaxSandboxRunningExecs,
			"MaxRetainedExecs": got.MaxRetainedExecs, "MaxRetainedBytes": got.MaxRetainedBytes, "MaxTombstones": got.MaxTombstones,
			"SandboxUID": got.SandboxUID, "SandboxGID": got.SandboxGID,
		}
		if diff := cmp.Diff(want, have); diff != "" {
			t.Errorf("defaults (-want +got):\n%s", diff)
		}
		if got.Logger == nil || got.Now == nil {
			t.Errorf("got a nil Logger or Now, want defaults")
		}
	})
	tests := []struct {
		name string
		cfg  Config
		want string
	}{
		{"no token", Config{}, "token is empty"},
		{"unknown isolation", Config{Token: "t", Isolation: "docker"}, `isolation "docker"`},
		{"negative max sandboxes", Config{Token: "t", MaxSandboxes: -1}, "max sandboxes -1"},
		{"negative max execs", Config{Token: "t", MaxRunningExecs: -1}, "max running execs -1"},
		{"negative output limit", Config{Token: "t", OutputLimit: -1}, "output limit -1"},
		{"negative retention", Config{Token: "t", ExecRetention: -time.Second}, "exec retention -1s"},
		{"negative janitor interval", Config{Token: "t", JanitorInterval: -time.Second}, "janitor interval -1s"},
		{"bwrap missing", Config{Token: "t", Isolation: IsolationBwrap, BwrapPath: "/nonexistent/bwrap"}, "bubblewrap not found"},
		{"negative max pids", Config{Token: "t", MaxPids: -1}, "max pids -1"},
		{"image default without a source", Config{Token: "t", ImageDefault: "python:3.11"}, "needs an image source"},
		{"images without isolation", Config{Token: "t", Isolation: IsolationNone, ImagesDir: "/nonexistent"}, "images need bubblewrap isolation"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.cfg.StateDir == "" {
				tt.cfg.StateDir = t.TempDir()
			}
			srv, err := New(tt.cfg)
			if err == nil {
				_ = srv.Close(context.Background())
				t.Fatalf("New: got no error, want one with %q", tt.want)
			}
			if !strings.Contains(err.Error(), tt.want) {
				t.Errorf("New: got %q, want it to hold %q", err, tt.want)
			}
		})
	}
	t.Run("auto without bubblewrap falls back to none", func(t *testing.T) {
		srv, err := New(Config{Token: "t", StateDir: t.TempDir(), BwrapPath: "/nonexistent/bwrap"})
		if err != nil {
			t.Fatalf("New: %v", err)
		}
		defer srv.Close(context.Background())
		if got := srv.Isolation(); got != IsolationNone {
			t.Errorf("got isolation %q, want none", got)
		}
	})
	t.Run("no state dir: a temporary one, removed by Close", func(t *testing.T) {
		srv, err := New(Config{Token: "t", Isolation: IsolationNone})
		if err != nil {
			t.Fatalf("New: %v", err)
		}
		dir := srv.StateDir()
		if err := srv.Close(context.Background()); err != nil {
			t.Fatalf("Close: %v", err)
		}
		if _, err := os.Stat(dir); !os.IsNotExist(err) {
			t.Errorf("state dir %s: got %v, want it removed", dir, err)
		}
	})
}

func TestKeyedMutex(t *testing.T) {
	var k keyedMutex
	unlockA := k.lock("a")
	// Another key is not blocked by a.
	unlockB := k.lock("b")
	unlockB()
	done := make(chan struct{})
	go func() {
		unlock := k.lock("a")
		unlock()
		close(done)
	}()
	select {
	case <-done:
		t.Fatal("a second lock of a got it while a was locked")
	case <-time.After(50 * time.Millisecond): // what "never" looks like, briefly
	}
	unlockA()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("the second lock of a never got it")
	}
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(k.m) != 0 {
		t.Errorf("got %d keys left, want none", len(k.m))
	}
}

func TestAwaitExit(t *testing.T) {
	cmd := exec.Command("sh", "-c", "read x; exit 7")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan bool, 1)
	go func() { done <- awaitExit(cmd.Process.Pid) }()
	select {
	case <-done:
		t.Fatal("awaitExit returned while the process ran")
	case <-time.After(50 * time.Millisecond): // what "still waiting" looks like, briefly
	}
	stdin.Close() // the process reads EOF and exits
	select {
	case zombie := <-done:
		if !zombie {
			t.Skip("pidfds do not work here: cmd.Wait waits instead")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("awaitExit still waiting 5s after the process exited")
	}
	// Exited, not reaped: a zombie, whose pid cannot be reused yet.
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	if _, rest, _ := strings.Cut(string(stat), ") "); !strings.HasPrefix(rest, "Z") {
		t.Errorf("process state: got %q, want Z (zombie)", rest[:min(1, len(rest))])
	}
	if err := cmd.Wait(); cmd.ProcessState.ExitCode() != 7 {
		t.Errorf("Wait after awaitExit: got %v, want exit status 7", err)
	}
}

// TestCapBufferSpillSame checks that a buffer that moves its bytes to a
// file part way gives what one in memory gives, for writes of every size.
func TestCapBufferSpillSame(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	dir := t.TempDir()
	for i := range 200 {
		limit := 1 + rng.IntN(300)
		mem, spilled := newCapBuffer(limit, ""), newCapBuffer(limit, dir)
		spilled.st.memMax = rng.IntN(limit + 1)
		for range rng.IntN(40) {
			p := make([]byte, rng.IntN(2*limit))
			for j := range p {
				p[j] = byte('a' + rng.IntN(26))
			}
			_, _ = mem.Write(p)
			_, _ = spilled.Write(p)
		}
		wantOut, wantOmitted := mem.Result()
		gotOut, gotOmitted := spilled.Result()
		if gotOut != wantOut || gotOmitted != wantOmitted {
			t.Fatalf("case %d (limit %d, spill after %d): got %q/%d, want %q/%d", i, limit, spilled.st.memMax, gotOut, gotOmitted, wantOut, wantOmitted)
		}
	}
	if left, _ := os.ReadDir(dir); len(left) != 0 {
		t.Errorf("spill files left in %s: %d", dir, len(left))
	}
}
