package local

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/uuid"
	"golang.org/x/sys/unix"

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
		// A Unix socket listening in a tree the view binds, made before
		// the gateway starts: the view must mask it, since a read-only
		// bind does not stop a connect. Its name has a space and a
		// newline, which must reach bwrap as they are.
		boundSock, boundSkip := listenInBoundTree(t, "s p\nq")
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
		// A Unix socket listening in a host directory that is not the
		// gateway's: a read-only view of it would not stop a connect.
		sockDir, err := os.MkdirTemp("/var/tmp", "boxq-sock-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(sockDir) })
		if err := os.Chmod(sockDir, 0o755); err != nil {
			t.Fatal(err)
		}
		sockPath := filepath.Join(sockDir, "s")
		ln, err := net.Listen("unix", sockPath)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		if err := os.Chmod(sockPath, 0o777); err != nil {
			t.Fatal(err)
		}
		_, noPython := exec.LookPath("/usr/bin/python3")
		if noPython != nil && boundSkip == "" {
			boundSkip = "no /usr/bin/python3 to connect with"
		}
		asRoot := map[bool]string{true: control}[os.Geteuid() == 0]

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
				name:    "unmounting a mount",
				command: "umount /tmp 2>&1 && echo unmounted",
				leaked:  func(out string) bool { return strings.Contains(out, "unmounted") },
			},
			{
				name:    "another sandbox's files past an unmount",
				command: fmt.Sprintf("umount -l %s 2>/dev/null; umount -l /run 2>/dev/null; cat %s/secret 2>&1", g.srv.stateDir, otherHome),
				leaked:  func(out string) bool { return strings.Contains(out, "other-secret") },
			},
			{
				name:    "/etc/shadow",
				command: "cat /etc/shadow 2>&1",
				leaked:  func(out string) bool { return strings.Contains(out, "root:") },
				without: asRoot,
			},
			{
				name:    "running as root",
				command: "id -u",
				leaked:  func(out string) bool { return strings.TrimSpace(out) == "0" },
				without: asRoot,
			},
			{
				name:    "capabilities",
				command: "grep CapEff /proc/self/status",
				leaked:  func(out string) bool { return !strings.Contains(out, "0000000000000000") },
				without: asRoot,
			},
			{
				name:    "a host Unix socket",
				skip:    map[bool]string{true: "no /usr/bin/python3 to connect with"}[noPython != nil],
				command: fmt.Sprintf(`/usr/bin/python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); s.connect("%s"); print("connected")' 2>&1`, sockPath),
				leaked:  func(out string) bool { return strings.Contains(out, "connected") },
				without: control,
			},
			{
				name:    "a Unix socket in a bound tree",
				skip:    boundSkip,
				command: fmt.Sprintf(`/usr/bin/python3 -c 'import socket; s = socket.socket(socket.AF_UNIX); s.connect(%q); print("connected")' 2>&1`, boundSock),
				leaked:  func(out string) bool { return strings.Contains(out, "connected") },
				without: control,
			},
			{
				name:    "/sys",
				command: "ls /sys/kernel 2>&1 | head -3; test -d /sys/kernel && echo mounted",
				leaked:  func(out string) bool { return strings.Contains(out, "mounted") },
				without: control,
			},
			{
				name:    "the host's /var and /srv",
				command: fmt.Sprintf("ls -d %s /srv 2>&1", sockDir),
				leaked:  func(out string) bool { return strings.Contains(out, sockDir) && !strings.Contains(out, "No such file") },
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

// listenInBoundTree listens on a Unix socket named name in a fresh
// directory of the first tree of the view it can write to (/opt, else
// /usr/local, else /etc), open to every user, until the test ends. It says
// why not when it cannot (as a user who can write to none of them).
func listenInBoundTree(t *testing.T, name string) (path, skip string) {
	t.Helper()
	var dir string
	for _, tree := range []string{"/opt", "/usr/local", "/etc"} {
		if fi, err := os.Lstat(tree); err != nil || !fi.IsDir() {
			continue
		}
		if d, err := os.MkdirTemp(tree, "boxq-sock-"); err == nil {
			dir = d
			break
		}
	}
	if dir == "" {
		return "", "cannot make a directory in /opt, /usr/local or /etc"
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	path = filepath.Join(dir, name)
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	if err := os.Chmod(path, 0o777); err != nil {
		t.Fatal(err)
	}
	return path, ""
}

// mustHostView returns the view of the host with the given state dirs.
func mustHostView(t *testing.T, stateDir, sandboxesDir string) hostView {
	t.Helper()
	v, err := newHostView(slog.New(slog.DiscardHandler), stateDir, sandboxesDir)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestFindSockets checks the walk for sockets on a tree made for it: every
// socket found, odd names included, none through a symlink or in a
// covered directory, and a refusal past the bounds.
func TestFindSockets(t *testing.T) {
	// Socket paths must fit in 108 bytes: not under t.TempDir().
	root, err := os.MkdirTemp("", "boxq-walk-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	outside, err := os.MkdirTemp("", "boxq-walk-out-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(outside) })
	for _, d := range []string{"a/b", "covered", "-x"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range []string{
		filepath.Join(root, "top"),
		filepath.Join(root, "a/b", "new\nline"),
		filepath.Join(root, "-x", " sp ace"),
		filepath.Join(root, "covered", "hidden"),
		filepath.Join(outside, "out"),
	} {
		ln, err := net.Listen("unix", p)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
	}
	if err := os.WriteFile(filepath.Join(root, "a", "file"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(outside, filepath.Join(root, "a", "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(filepath.Join(outside, "out"), filepath.Join(root, "a", "sock-link")); err != nil {
		t.Fatal(err)
	}
	covered := map[string]bool{filepath.Join(root, "covered"): true}

	got, st, err := findSockets([]string{root}, covered, 10, 1<<10)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		filepath.Join(root, "-x", " sp ace"),
		filepath.Join(root, "a/b", "new\nline"),
		filepath.Join(root, "top"),
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("sockets (-got +want):\n%s", diff)
	}
	if st.entries < 8 {
		t.Errorf("walked %d entries, want at least the 8 outside covered", st.entries)
	}

	for _, tt := range []struct {
		name          string
		max, maxBytes int
	}{
		{"too many", 2, 1 << 10},
		{"paths too long", 10, len(want[0]) + len(want[1])},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, _, err := findSockets([]string{root}, covered, tt.max, tt.maxBytes)
			if err == nil || !strings.Contains(err.Error(), "too many to mask") {
				t.Errorf("got %v, want a refusal: too many to mask", err)
			}
		})
	}
}

// TestSymlinkedTreeRefused checks that a sandbox whose own directory is a
// symlink (which only someone with the gateway's rights can make) runs
// nothing, rather than bind the symlink's target in.
func TestSymlinkedTreeRefused(t *testing.T) {
	eachIsolation(t, func(t *testing.T, mode Isolation) {
		g := newGateway(t, Config{Isolation: mode})
		sb := g.newSandbox(t)
		target, err := os.MkdirTemp("/var/tmp", "boxq-target-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(target) })
		g.srv.mu.Lock()
		home := g.srv.sandboxes[sb].dirs.home
		g.srv.mu.Unlock()
		if err := os.RemoveAll(home); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(target, home); err != nil {
			t.Fatal(err)
		}
		st := g.run(t, sb, "touch /root/pwned ~/pwned; echo ran")
		if _, err := os.Stat(filepath.Join(target, "pwned")); err == nil {
			t.Errorf("a command wrote through the symlinked home into %s", target)
		}
		if st.Status == gateway.StatusCompleted || !strings.Contains(st.Output, "not a directory") {
			t.Errorf("got %s/%d %q, want the exec refused: not a directory", st.Status, st.RC(), st.Output)
		}
	})
}

// TestSnapshotFromNoneUntrusted checks that a snapshot made without
// isolation, where a command can do anything the gateway can (here: turn
// its home into a symlink to a host directory, and leave a fifo and a
// setuid file), is restored under bubblewrap as a plain tree: the symlink
// replaced by an empty directory, the fifo dropped, the setuid bit gone.
func TestSnapshotFromNoneUntrusted(t *testing.T) {
	requireBwrap(t)
	stateDir := newStateDir(t)
	target, err := os.MkdirTemp("/var/tmp", "boxq-target-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(target) })
	token := "tok-" + uuid.NewString()
	req := gateway.CreateRequest{PersistentFilesystem: true, LogicalKey: "untrusted"}

	none := newGateway(t, Config{Isolation: IsolationNone, StateDir: stateDir, Token: token})
	sb := none.create(t, req, "")
	none.mustRun(t, sb, `mkfifo "$TMPDIR/fifo" && cp /bin/true "$TMPDIR/suid" && chmod 4755 "$TMPDIR/suid" && cd / && rm -rf "$HOME" && ln -s `+target+` "$HOME"`)
	decode(t, "terminate", none.do(t, "POST", "/v1/sandboxes/"+sb+"/terminate", gateway.TerminateRequest{SnapshotBeforeTerminate: true}), http.StatusOK, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := none.srv.Close(ctx); err != nil {
		t.Fatal(err)
	}

	g := newGateway(t, Config{Isolation: IsolationBwrap, StateDir: stateDir, Token: token})
	sb = g.create(t, req, "")
	out := g.mustRun(t, sb, "touch /root/pwned && ls -A /root; ls /tmp; stat -c %A /tmp/suid")
	if _, err := os.Stat(filepath.Join(target, "pwned")); err == nil {
		t.Errorf("a command under bwrap wrote through the snapshot's symlink into %s", target)
	}
	if want := "pwned\nsuid\n-rwxr-xr-x\n"; out != want {
		t.Errorf("restored tree: got %q, want %q (a fresh home, no fifo, no setuid bit)", out, want)
	}
	if !strings.Contains(g.logs.String(), "snapshot made under another isolation") {
		t.Errorf("want the restore of a snapshot made under none logged")
	}
}

// TestStateDirOutOfReach checks a state dir the sandbox user cannot reach
// (under a private directory, as t.TempDir() or /root would be): as root,
// the sandboxes' working files go elsewhere, and snapshots, on another
// file system when /dev/shm is one, still work.
func TestStateDirOutOfReach(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("only root runs commands as another user")
	}
	requireBwrap(t)
	parent := t.TempDir() // private: 0700
	if d, err := os.MkdirTemp("/dev/shm", "boxq-private-"); err == nil {
		parent = d
		t.Cleanup(func() { os.RemoveAll(d) })
	}
	stateDir := filepath.Join(parent, "state")
	// What a gateway killed before its Close left, for a state dir gone
	// since: this start removes it.
	orphan, err := os.MkdirTemp("", "boxq-sandboxes-orphan")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(orphan) })
	if err := os.WriteFile(filepath.Join(orphan, stateDirRecord), []byte(filepath.Join(parent, "gone")), 0o600); err != nil {
		t.Fatal(err)
	}
	req := gateway.CreateRequest{PersistentFilesystem: true, LogicalKey: "far"}
	g := newGateway(t, Config{Isolation: IsolationBwrap, StateDir: stateDir})
	if strings.HasPrefix(g.srv.sandboxesDir, stateDir) {
		t.Fatalf("sandboxes dir %s: want it out of the unreachable state dir", g.srv.sandboxesDir)
	}
	sb := g.create(t, req, "")
	g.mustRun(t, sb, "echo kept > ~/f")
	decode(t, "terminate", g.do(t, "POST", "/v1/sandboxes/"+sb+"/terminate", gateway.TerminateRequest{SnapshotBeforeTerminate: true}), http.StatusOK, nil)
	sb = g.create(t, req, "")
	if out := g.mustRun(t, sb, "cat ~/f; id -u"); out != fmt.Sprintf("kept\n%d\n", DefaultSandboxUID) {
		t.Errorf("restored: got %q", out)
	}
	if _, err := os.Lstat(orphan); err == nil {
		t.Errorf("the orphan sandboxes dir %s is still there", orphan)
	}
	dir := g.srv.sandboxesDir
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := g.srv.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(dir); err == nil {
		t.Errorf("Close left %s", dir)
	}
}

// TestFindSocketsNestedMounts: a file system mounted inside a walked tree is
// walked (bubblewrap's bind is recursive: its sockets are in the view) and
// counted once, as one mount, however many directories it has; a kernel
// pseudo file system mounted there is not entered.
func TestFindSocketsNestedMounts(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("mounts need root")
	}
	root, err := os.MkdirTemp("", "boxq-walk-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	nested, proc := filepath.Join(root, "m"), filepath.Join(root, "p")
	for _, d := range []string{nested, proc} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := unix.Mount("tmpfs", nested, "tmpfs", 0, "size=1m"); err != nil {
		t.Skipf("cannot mount a tmpfs: %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(nested, unix.MNT_DETACH) })
	if err := unix.Mount("proc", proc, "proc", 0, ""); err != nil {
		t.Skipf("cannot mount proc: %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(proc, unix.MNT_DETACH) })
	deep := filepath.Join(nested, "a", "b", "c")
	if err := os.MkdirAll(deep, 0o755); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", filepath.Join(deep, "s"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })

	got, st, err := findSockets([]string{root}, nil, 10, 1<<10)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(got, []string{filepath.Join(deep, "s")}); diff != "" {
		t.Errorf("sockets (-got +want):\n%s", diff)
	}
	if st.mounts != 1 {
		t.Errorf("nested mounts walked: got %d, want 1 (the tmpfs; proc is not entered)", st.mounts)
	}
	if st.entries > 10 {
		t.Errorf("walked %d entries, want at most 10: proc entered?", st.entries)
	}
}

// TestFindSocketsUnlisted: a directory the gateway cannot list is counted
// and named, for newHostView's warning: a command may still reach a socket
// in it by name. Root lists everything, so the walk runs on a thread that
// has dropped its DAC capabilities, with a directory (0711) of another
// user's.
func TestFindSocketsUnlisted(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root, to make another user's directory")
	}
	root, err := os.MkdirTemp("", "boxq-walk-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	locked := filepath.Join(root, "locked")
	if err := os.Mkdir(locked, 0o711); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("unix", filepath.Join(locked, "s"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	if err := os.Chown(locked, 65534, 65534); err != nil {
		t.Fatal(err)
	}

	type result struct {
		st  walkStats
		err error
	}
	done := make(chan result, 1)
	go func() {
		// Never unlocked: the thread, without its capabilities, ends
		// with the goroutine.
		runtime.LockOSThread()
		hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
		var data [2]unix.CapUserData
		if err := unix.Capget(&hdr, &data[0]); err != nil {
			done <- result{err: err}
			return
		}
		data[0].Effective &^= 1<<unix.CAP_DAC_OVERRIDE | 1<<unix.CAP_DAC_READ_SEARCH
		if err := unix.Capset(&hdr, &data[0]); err != nil {
			done <- result{err: err}
			return
		}
		_, st, err := findSockets([]string{root}, nil, 10, 1<<10)
		done <- result{st, err}
	}()
	r := <-done
	if r.err != nil {
		t.Fatal(r.err)
	}
	if r.st.unlisted != 1 || len(r.st.unlistedFirst) != 1 || r.st.unlistedFirst[0] != locked {
		t.Errorf("unlisted %d %q, want 1 [%s]", r.st.unlisted, r.st.unlistedFirst, locked)
	}
}

// TestTooManySocketsRefusesAuto: a host whose view has more sockets than
// can be masked does not start where bubblewrap works, in auto too: falling
// back to no isolation would expose the host bubblewrap is there to hide.
// Where bubblewrap does not work, auto still runs with none, as it would
// with no socket at all. A refused New leaves the state dir unlocked. (The
// farm is a temporary tree added to the view's: sockets in the real /opt
// would stop every other test's gateway.)
func TestTooManySocketsRefusesAuto(t *testing.T) {
	// Before the farm joins the view: the probe is run once, for all tests.
	bwrapErr := bwrapProbe()
	root, err := os.MkdirTemp("", "boxq-farm-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	// As root, bubblewrap runs as the sandbox user, who binds the farm.
	if err := os.Chmod(root, 0o755); err != nil {
		t.Fatal(err)
	}
	for i := range maxViewSockets + 1 {
		ln, err := net.Listen("unix", filepath.Join(root, fmt.Sprintf("s%d", i)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
	}
	saved := hostRoots
	hostRoots = append(slices.Clone(saved), root)
	t.Cleanup(func() { hostRoots = saved })

	for _, mode := range []Isolation{IsolationAuto, IsolationBwrap} {
		t.Run(string(mode)+" refused where bubblewrap works", func(t *testing.T) {
			if bwrapErr != nil {
				requireBwrap(t) // skips, or fails in CI
			}
			dir := newStateDir(t)
			s, err := New(Config{Token: "t", StateDir: dir, Isolation: mode})
			if err == nil {
				s.Close(context.Background())
				t.Fatalf("New(%s) with a view past its socket bound started", mode)
			}
			if !strings.Contains(err.Error(), "too many to mask") {
				t.Errorf("New(%s) = %v, want the view's refusal: too many to mask", mode, err)
			}
			// The refusal released the state dir's lock.
			s, err = New(Config{Token: "t", StateDir: dir, Isolation: IsolationNone})
			if err != nil {
				t.Fatalf("New on the refused gateway's state dir: %v", err)
			}
			if err := s.Close(context.Background()); err != nil {
				t.Fatal(err)
			}
		})
	}
	t.Run("auto without bubblewrap runs with none", func(t *testing.T) {
		s, err := New(Config{Token: "t", StateDir: newStateDir(t), Isolation: IsolationAuto, BwrapPath: "/nonexistent/bwrap"})
		if err != nil {
			t.Fatalf("New(auto) without bubblewrap: %v, want isolation none", err)
		}
		defer s.Close(context.Background())
		if got := s.Isolation(); got != IsolationNone {
			t.Errorf("isolation %q, want none", got)
		}
	})
}
