package local

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"weak"

	"github.com/boxq/boxq/gateway"
)

// TestEndedSandboxFreesOutputs checks that the outputs of a sandbox's
// finished execs are freed when the sandbox ends, not kept for the rest of
// their retention by the retention queue, uncounted: a loop of create, a
// 1 MiB exec and terminate would otherwise hold every output in memory,
// outside the caps on retained execs.
func TestEndedSandboxFreesOutputs(t *testing.T) {
	g := newGateway(t, Config{})
	sb := g.newSandbox(t)
	st := g.run(t, sb, "head -c 100000 /dev/zero | tr '\\0' x")
	if st.Status != gateway.StatusCompleted {
		t.Fatalf("exec: got %s/%d", st.Status, st.RC())
	}
	// In a function of its own, so that no stack slot of this one keeps
	// the exec alive.
	ref := func() weak.Pointer[execution] {
		e, err := g.srv.execOf(sb, st.ExecID)
		if err != nil {
			t.Fatal(err)
		}
		return weak.Make(e)
	}()
	decode(t, "terminate", g.do(t, "POST", "/v1/sandboxes/"+sb+"/terminate", nil), http.StatusOK, nil)
	for range 3 {
		runtime.GC()
	}
	if ref.Value() != nil {
		t.Errorf("the exec of an ended sandbox, and its output, are still in memory")
	}
	g.srv.mu.Lock()
	count, bytes := g.srv.retainedCount, g.srv.retainedBytes
	g.srv.mu.Unlock()
	if count != 0 || bytes != 0 {
		t.Errorf("after the sandbox ended: %d execs, %d bytes counted as retained, want none", count, bytes)
	}
}

// deepTree is a command that makes, in the sandbox's home, a directory
// path of 25 names of 200 bytes each (over PATH_MAX, 4096, in all) with
// a file at its end; deepCat prints that file.
const (
	deepTree = `d=$(printf 'd%.0s' $(seq 200)); cd ~ && for i in $(seq 25); do mkdir $d && cd $d || exit 1; done; echo deep > f`
	deepCat  = `d=$(printf 'd%.0s' $(seq 200)); cd ~ && for i in $(seq 25); do cd $d || exit 1; done; cat f`
)

// TestDeepTreeSnapshot checks that a sandbox whose files lie deeper than
// PATH_MAX can be snapshotted, restored and removed: a copy by full paths
// would fail on them, and every later create of the key with it.
func TestDeepTreeSnapshot(t *testing.T) {
	eachIsolation(t, func(t *testing.T, mode Isolation) {
		g := newGateway(t, Config{Isolation: mode})
		req := gateway.CreateRequest{PersistentFilesystem: true, LogicalKey: "deep-" + string(mode)}
		sb := g.create(t, req, "")
		g.mustRun(t, sb, deepTree+" && touch -d @1000000000 ~/old && chmod 4751 ~/old && mkdir ~/st && chmod 1770 ~/st")
		decode(t, "terminate", g.do(t, "POST", "/v1/sandboxes/"+sb+"/terminate", gateway.TerminateRequest{SnapshotBeforeTerminate: true}), http.StatusOK, nil)
		sb = g.create(t, req, "")
		if got := g.mustRun(t, sb, deepCat); got != "deep\n" {
			t.Errorf("restored deep file: got %q, want \"deep\\n\"", got)
		}
		// What the copy keeps: the mtime, the permission bits but setuid,
		// the sticky bit of a directory, the sandbox user as owner.
		want := g.mustRun(t, sb, "echo 1000000000 751 1770 $(id -u) $(id -u)")
		if got := g.mustRun(t, sb, "echo $(stat -c '%Y %a' ~/old) $(stat -c %a ~/st) $(stat -c %u ~/old) $(stat -c %u ~/st)"); got != want {
			t.Errorf("restored mtime, modes, owners: got %q, want %q", got, want)
		}
		decode(t, "terminate", g.do(t, "POST", "/v1/sandboxes/"+sb+"/terminate", gateway.TerminateRequest{}), http.StatusOK, nil)
	})
}

// TestRestoreOpensHome checks that a sandbox whose command took its own
// rights on its home and /tmp away (chmod 000) is restored usable: bash
// could no longer start in /root, the default cwd, of any later sandbox
// of the key, and the client's every exec would fail.
func TestRestoreOpensHome(t *testing.T) {
	eachIsolation(t, func(t *testing.T, mode Isolation) {
		g := newGateway(t, Config{Isolation: mode})
		req := gateway.CreateRequest{PersistentFilesystem: true, LogicalKey: "closed-" + string(mode)}
		sb := g.create(t, req, "")
		// ${TMPDIR:-/tmp}: without isolation /tmp is the host's own.
		g.mustRun(t, sb, `echo kept > ~/f && chmod 000 ~ "${TMPDIR:-/tmp}"`)
		decode(t, "terminate", g.do(t, "POST", "/v1/sandboxes/"+sb+"/terminate", gateway.TerminateRequest{SnapshotBeforeTerminate: true}), http.StatusOK, nil)
		sb = g.create(t, req, "")
		// Back to what the commands need (cwd, reads); the writes are
		// theirs to give back, as they own the directories.
		if got := g.mustRun(t, sb, `cat ~/f && ls "${TMPDIR:-/tmp}" && stat -c %a ~ && echo ok`); got != "kept\n500\nok\n" {
			t.Errorf("restored sandbox: got %q, want the kept file, home r-x", got)
		}
	})
}

// TestHostViewHidesStateDirRoot checks that a state dir that is itself
// one of the host roots in the view (-state-dir /opt) is covered too, not
// only one below a root: its sandboxes all run as one user, who could
// read each other's files through it.
func TestHostViewHidesStateDirRoot(t *testing.T) {
	if fi, err := os.Lstat("/opt"); err != nil || !fi.IsDir() {
		t.Skip("no /opt directory here")
	}
	joined := strings.Join(mustHostView(t, "/opt", "/opt/sandboxes").args, " ")
	if !strings.Contains(joined, "--ro-bind /opt /opt") || !strings.Contains(joined, "--tmpfs /opt") {
		t.Errorf("view %q: want /opt bound and covered", joined)
	}
}

// TestSparseFileRestore checks that a sparse file stays sparse through a
// snapshot and its restore: `truncate -s 10T ~/f` costs a command
// nothing, and a restore that wrote its zeros out would fill the host's
// disk and fail every later create of the key.
func TestSparseFileRestore(t *testing.T) {
	g := newGateway(t, Config{})
	req := gateway.CreateRequest{PersistentFilesystem: true, LogicalKey: "sparse"}
	sb := g.create(t, req, "")
	// 64 MiB, a few bytes of data at the start, in the middle and at the end.
	g.mustRun(t, sb, `cd ~ && truncate -s 64M f && printf head | dd of=f conv=notrunc status=none && printf mid | dd of=f bs=1 seek=33554432 conv=notrunc status=none && printf tail | dd of=f bs=1 seek=67108860 conv=notrunc status=none`)
	before := g.mustRun(t, sb, "stat -c %b ~/f")
	decode(t, "terminate", g.do(t, "POST", "/v1/sandboxes/"+sb+"/terminate", gateway.TerminateRequest{SnapshotBeforeTerminate: true}), http.StatusOK, nil)
	sb = g.create(t, req, "")
	out := g.mustRun(t, sb, `cd ~ && stat -c '%s %b' f && head -c 4 f && echo && dd if=f bs=1 skip=33554432 count=3 status=none && echo && tail -c 4 f && echo && sha256sum < f`)
	want := g.mustRun(t, sb, `printf '67108864 %s\nhead\nmid\ntail\n' `+strings.TrimSpace(before)+` && { printf head; head -c 33554428 /dev/zero; printf mid; head -c 33554425 /dev/zero; printf tail; } | sha256sum`)
	if out != want {
		t.Errorf("restored sparse file (size, 512-byte blocks allocated, data, sum): got %q, want %q", out, want)
	}
}

// TestHardLinksRestore checks that files hard-linked together stay one
// file through a snapshot and its restore: a 1 GiB file and a thousand
// links to it (what a pnpm store does on a small scale) cost a command
// 1 GiB, and a restore that copied each link would write 1 TiB.
func TestHardLinksRestore(t *testing.T) {
	g := newGateway(t, Config{})
	req := gateway.CreateRequest{PersistentFilesystem: true, LogicalKey: "links"}
	sb := g.create(t, req, "")
	g.mustRun(t, sb, `cd ~ && head -c 1048576 /dev/urandom > big && mkdir -p a/b && for i in $(seq 20); do ln big l$i; done && ln big a/b/deep && sha256sum < big > sum`)
	decode(t, "terminate", g.do(t, "POST", "/v1/sandboxes/"+sb+"/terminate", gateway.TerminateRequest{SnapshotBeforeTerminate: true}), http.StatusOK, nil)
	sb = g.create(t, req, "")
	// 22 names of one inode, its data once: under 2 MiB for the whole home.
	out := g.mustRun(t, sb, `cd ~ && stat -c %h big && test big -ef l20 && test big -ef a/b/deep && sha256sum < l7 | cmp - sum && du -sk . | cut -f1`)
	lines := strings.Fields(out)
	if len(lines) != 2 || lines[0] != "22" {
		t.Fatalf("restored links: got %q, want 22 names of one file", out)
	}
	if kib, err := strconv.Atoi(lines[1]); err != nil || kib > 2048 {
		t.Errorf("restored home uses %s KiB, want the file's data once (about 1024)", lines[1])
	}
}

// TestEndedIdemKeysBounded checks that the idempotency keys of ended
// sandboxes, kept so that a retried create gets the same id, are bounded
// in number: a loop of create and terminate, each with a new key of up to
// 1 KiB, would otherwise grow the gateway's memory for ExecRetention
// without limit. (Internal: ending maxEndedIdemKeys sandboxes for real
// would take minutes.)
func TestEndedIdemKeysBounded(t *testing.T) {
	g := newGateway(t, Config{})
	s := g.srv
	now := s.cfg.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	last := ""
	for i := range maxEndedIdemKeys + 10 {
		sb := &sandbox{id: fmt.Sprintf("sb-%d", i), idemKey: fmt.Sprintf("key-%d", i)}
		e := &idemEntry{done: make(chan struct{}), id: sb.id}
		close(e.done)
		s.idem[sb.idemKey] = e
		s.retainIdemLocked(sb, now)
		last = sb.idemKey
	}
	if len(s.idem) > maxEndedIdemKeys || len(s.idemFIFO) > maxEndedIdemKeys {
		t.Errorf("after %d ended sandboxes: %d keys, %d queued; want at most %d", maxEndedIdemKeys+10, len(s.idem), len(s.idemFIFO), maxEndedIdemKeys)
	}
	if s.idem[last] == nil || s.idem["key-0"] != nil {
		t.Errorf("want the newest keys kept and the oldest forgotten")
	}
}

// TestCountEdges covers the edges of a count's reading: the JSON numbers a
// client may send for a whole number, and what is refused, by message.
func TestCountEdges(t *testing.T) {
	for _, tt := range []struct {
		raw     string
		want    int64
		wantErr string
	}{
		{"-0", 0, ""},
		{"-0.0", 0, ""},
		{"5120.0", 5120, ""},
		{"5.12e3", 5120, ""},
		{"9223372036854775807", 9223372036854775807, ""},
		{"1e400", 0, "within ±1.8e308"},
		{"99999999999999999999", 0, "out of range"},
		{"1e19", 0, "out of range"},
		{`"5120.0"`, 0, "is a string: want a number"},
		{"5120.5", 0, "want a whole number"},
		{"null", 0, ""},
	} {
		got, err := count("memoryMiB", json.RawMessage(tt.raw))
		switch {
		case tt.wantErr == "" && (err != nil || got != tt.want):
			t.Errorf("count(%s): got %d, %v; want %d", tt.raw, got, err, tt.want)
		case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
			t.Errorf("count(%s): got %d, %v; want an error with %q", tt.raw, got, err, tt.wantErr)
		}
	}
}
