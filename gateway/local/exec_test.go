package local

import (
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/boxq/boxq/gateway"
)

func TestExec(t *testing.T) {
	eachIsolation(t, func(t *testing.T, mode Isolation) {
		g := newGateway(t, Config{Isolation: mode})
		sb := g.newSandbox(t)
		g.mustRun(t, sb, "mkdir -p ~/work && echo inside > ~/work/f")

		tests := []struct {
			name       string
			req        gateway.StartRequest
			wantStatus string
			wantRC     int
			wantOutput string // exact, unless wantPrefix
			wantPrefix bool
		}{
			{name: "output", req: gateway.StartRequest{Command: "echo hello"},
				wantStatus: gateway.StatusCompleted, wantOutput: "hello\n"},
			{name: "stdout and stderr in order", req: gateway.StartRequest{Command: "echo a; echo b >&2; echo c; echo d >&2"},
				wantStatus: gateway.StatusCompleted, wantOutput: "a\nb\nc\nd\n"},
			{name: "exit 3", req: gateway.StartRequest{Command: "echo no; exit 3"},
				wantStatus: gateway.StatusFailed, wantRC: 3, wantOutput: "no\n"},
			{name: "killed by a signal", req: gateway.StartRequest{Command: "kill -9 $$"},
				wantStatus: gateway.StatusFailed, wantRC: 128 + 9, wantOutput: ""},
			{name: "cwd honoured", req: gateway.StartRequest{Command: "cat f", Cwd: "/root/work"},
				wantStatus: gateway.StatusCompleted, wantOutput: "inside\n"},
			{name: "default cwd is home", req: gateway.StartRequest{Command: `[ "$(pwd -P)" = "$(cd ~ && pwd -P)" ] && echo home`},
				wantStatus: gateway.StatusCompleted, wantOutput: "home\n"},
			{name: "missing cwd", req: gateway.StartRequest{Command: "true", Cwd: "/root/nope"},
				wantStatus: gateway.StatusFailed, wantRC: 1, wantOutput: "", wantPrefix: true},
			{name: "stdin", req: gateway.StartRequest{Command: "cat", StdinData: "line1\nline2\n"},
				wantStatus: gateway.StatusCompleted, wantOutput: "line1\nline2\n"},
			{name: "stdin read in parts", req: gateway.StartRequest{Command: `read a; read b; echo "$b $a"`, StdinData: "line1\nline2\n"},
				wantStatus: gateway.StatusCompleted, wantOutput: "line2 line1\n"},
			{name: "stdin counted", req: gateway.StartRequest{Command: "wc -l", StdinData: "line1\nline2\n"},
				wantStatus: gateway.StatusCompleted, wantOutput: "2\n"},
			{name: "no stdin", req: gateway.StartRequest{Command: "cat; echo end"},
				wantStatus: gateway.StatusCompleted, wantOutput: "end\n"},
			{name: "environment", req: gateway.StartRequest{Command: `echo "$HOME|$TERM|$LANG"; [ -n "$PATH" ] && echo path`},
				wantStatus: gateway.StatusCompleted, wantOutput: map[Isolation]string{
					IsolationBwrap: "/root|dumb|C.UTF-8\npath\n",
					IsolationNone:  g.srv.stateDir, // HOME is the sandbox's own dir
				}[mode], wantPrefix: mode == IsolationNone},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				tt.req.TimeoutMs = 20_000
				st := g.exec(t, sb, tt.req)
				if st.Status != tt.wantStatus || st.RC() != tt.wantRC {
					t.Fatalf("got %s/%d %q, want %s/%d", st.Status, st.RC(), st.Output, tt.wantStatus, tt.wantRC)
				}
				if tt.wantPrefix {
					if !strings.HasPrefix(st.Output, tt.wantOutput) {
						t.Errorf("got output %q, want it to start with %q", st.Output, tt.wantOutput)
					}
				} else if st.Output != tt.wantOutput {
					t.Errorf("got output %q, want %q", st.Output, tt.wantOutput)
				}
				if tt.name == "missing cwd" && !strings.Contains(st.Output, "/root/nope") {
					t.Errorf("got output %q, want it to name the missing cwd", st.Output)
				}
			})
		}
	})
}

func TestExecTimeoutKillsGroup(t *testing.T) {
	eachIsolation(t, func(t *testing.T, mode Isolation) {
		g := newGateway(t, Config{Isolation: mode, StartWait: -1})
		sb := g.newSandbox(t)
		marker := newMarker()
		begin := time.Now()
		st := g.start(t, sb, gateway.StartRequest{Command: markerCommand(marker), TimeoutMs: 1000})
		if st.Status != gateway.StatusRunning {
			t.Fatalf("start: got %s, want running", st.Status)
		}
		waitMarker(t, marker, true, 10*time.Second)
		st = g.wait(t, sb, st.ExecID, 5*time.Second)
		took := time.Since(begin)
		if st.Status != gateway.StatusTimeout || st.RC() != gateway.ReturnCodeTimeout {
			t.Errorf("got %s/%d, want timeout/124", st.Status, st.RC())
		}
		// Loose on purpose (shared, loaded machines): what it tells apart is
		// a timeout that fires from one that lets the 30 s sleep run out.
		if took > 10*time.Second {
			t.Errorf("the timeout took %v, want well under the command's 30 s", took)
		}
		t.Logf("timeout of 1s answered after %v", took)
		waitMarker(t, marker, false, 10*time.Second)
	})
}

func TestExecCancel(t *testing.T) {
	eachIsolation(t, func(t *testing.T, mode Isolation) {
		g := newGateway(t, Config{Isolation: mode, StartWait: -1})
		sb := g.newSandbox(t)
		marker := newMarker()
		st := g.start(t, sb, gateway.StartRequest{Command: markerCommand(marker), TimeoutMs: 60_000})
		waitMarker(t, marker, true, 10*time.Second)

		path := fmt.Sprintf("/v1/sandboxes/%s/execs/%s/cancel", sb, st.ExecID)
		var resp gateway.StatusResponse
		decode(t, "cancel", g.do(t, "POST", path, nil), http.StatusOK, &resp)
		if resp.Status != "cancelling" {
			t.Errorf("cancel: got status %q, want cancelling", resp.Status)
		}
		st = g.wait(t, sb, st.ExecID, 3*time.Second)
		if st.Status != gateway.StatusCancelled || st.RC() != gateway.ReturnCodeCancelled {
			t.Errorf("got %s/%d, want cancelled/130", st.Status, st.RC())
		}
		waitMarker(t, marker, false, 10*time.Second)

		// A cancel of an ended exec is harmless and changes nothing.
		decode(t, "cancel again", g.do(t, "POST", path, nil), http.StatusOK, &resp)
		done := g.run(t, sb, "true")
		decode(t, "cancel of a completed exec", g.do(t, "POST", fmt.Sprintf("/v1/sandboxes/%s/execs/%s/cancel", sb, done.ExecID), nil), http.StatusOK, nil)
		var again gateway.ExecState
		decode(t, "poll", g.poll(t, sb, done.ExecID, 0), http.StatusOK, &again)
		if again.Status != gateway.StatusCompleted {
			t.Errorf("after a late cancel: got %s, want completed", again.Status)
		}
	})
}

func TestExecLeftoversKilled(t *testing.T) {
	// A background process outlives its shell only until the exec ends.
	eachIsolation(t, func(t *testing.T, mode Isolation) {
		g := newGateway(t, Config{Isolation: mode})
		sb := g.newSandbox(t)
		marker := newMarker()
		st := g.run(t, sb, fmt.Sprintf("(exec -a %s sleep 30) >/dev/null 2>&1 & echo started", marker))
		if st.Status != gateway.StatusCompleted || st.Output != "started\n" {
			t.Fatalf("got %s/%d %q, want completed \"started\\n\"", st.Status, st.RC(), st.Output)
		}
		waitMarker(t, marker, false, 10*time.Second)
	})
}

func TestStartSameExecIDRunsOnce(t *testing.T) {
	eachIsolation(t, func(t *testing.T, mode Isolation) {
		g := newGateway(t, Config{Isolation: mode})
		sb := g.newSandbox(t)

		t.Run("sequential", func(t *testing.T) {
			req := gateway.StartRequest{ExecID: uuid.NewString(), Command: "echo x >> ~/seq; echo ran", TimeoutMs: 10_000}
			first := g.exec(t, sb, req)
			second := g.start(t, sb, req)
			if second.Status != first.Status || second.Output != first.Output || second.RC() != first.RC() {
				t.Errorf("second start: got %s/%d %q, want the first's %s/%d %q", second.Status, second.RC(), second.Output, first.Status, first.RC(), first.Output)
			}
			if got := g.mustRun(t, sb, "wc -l < ~/seq"); got != "1\n" {
				t.Errorf("lines written: got %q, want 1", got)
			}
		})
		t.Run("concurrent", func(t *testing.T) {
			req := gateway.StartRequest{ExecID: uuid.NewString(), Command: "echo x >> ~/conc; sleep 0.2", TimeoutMs: 10_000}
			var wg sync.WaitGroup
			for range 10 {
				wg.Go(func() {
					r, err := g.send("POST", "/v1/sandboxes/"+sb+"/execs", req, "")
					if err != nil || r.status != http.StatusOK {
						t.Errorf("start: got %d %s, %v", r.status, r.body, err)
					}
				})
			}
			wg.Wait()
			g.wait(t, sb, req.ExecID, 5*time.Second)
			if got := g.mustRun(t, sb, "wc -l < ~/conc"); got != "1\n" {
				t.Errorf("lines written: got %q, want 1", got)
			}
		})
	})
}

func TestStartWait(t *testing.T) {
	tests := []struct {
		name      string
		startWait time.Duration
		command   string
		want      string
	}{
		{"fast command answered by the start", 5 * time.Second, "true", gateway.StatusCompleted},
		{"slow command answered running", 50 * time.Millisecond, "sleep 2", gateway.StatusRunning},
		{"no start wait", -1, "sleep 2", gateway.StatusRunning},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := newGateway(t, Config{StartWait: tt.startWait})
			sb := g.newSandbox(t)
			st := g.start(t, sb, gateway.StartRequest{Command: tt.command, TimeoutMs: 10_000})
			if st.Status != tt.want {
				t.Errorf("got %s, want %s", st.Status, tt.want)
			}
			if st.Status == gateway.StatusCompleted && (st.ReturnCode == nil || *st.ReturnCode != 0) {
				t.Errorf("got returncode %v, want 0", st.ReturnCode)
			}
		})
	}
}

func TestLongPoll(t *testing.T) {
	g := newGateway(t, Config{StartWait: -1})
	sb := g.newSandbox(t)

	t.Run("answers when the exec ends", func(t *testing.T) {
		// The command prints when it ends, by the same clock as ours.
		st := g.start(t, sb, gateway.StartRequest{Command: "sleep 0.3; date +%s%N", TimeoutMs: 10_000})
		var got gateway.ExecState
		decode(t, "poll", g.poll(t, sb, st.ExecID, 10_000), http.StatusOK, &got)
		answered := time.Now()
		if got.Status != gateway.StatusCompleted {
			t.Fatalf("got %s, want completed", got.Status)
		}
		ns, err := strconv.ParseInt(strings.TrimSpace(got.Output), 10, 64)
		if err != nil {
			t.Fatalf("output %q: %v", got.Output, err)
		}
		lag := answered.Sub(time.Unix(0, ns))
		t.Logf("long poll answered %v after the command's last output", lag)
		if lag > 5*time.Second {
			t.Errorf("long poll answered %v after the exec ended, want it at the end, not at the 10 s waitMs", lag)
		}
	})
	t.Run("answers running after waitMs", func(t *testing.T) {
		st := g.start(t, sb, gateway.StartRequest{Command: "sleep 5", TimeoutMs: 10_000})
		begin := time.Now()
		var got gateway.ExecState
		decode(t, "poll", g.poll(t, sb, st.ExecID, 200), http.StatusOK, &got)
		took := time.Since(begin)
		if got.Status != gateway.StatusRunning {
			t.Errorf("got %s, want running", got.Status)
		}
		if took < 150*time.Millisecond || took > 4*time.Second {
			t.Errorf("a 200 ms long poll took %v", took)
		}
		decode(t, "cancel", g.do(t, "POST", fmt.Sprintf("/v1/sandboxes/%s/execs/%s/cancel", sb, st.ExecID), nil), http.StatusOK, nil)
	})
	t.Run("no wait answers at once", func(t *testing.T) {
		st := g.start(t, sb, gateway.StartRequest{Command: "sleep 5", TimeoutMs: 10_000})
		var got gateway.ExecState
		decode(t, "poll", g.do(t, "GET", fmt.Sprintf("/v1/sandboxes/%s/execs/%s", sb, st.ExecID), nil), http.StatusOK, &got)
		if got.Status != gateway.StatusRunning {
			t.Errorf("got %s, want running", got.Status)
		}
		decode(t, "cancel", g.do(t, "POST", fmt.Sprintf("/v1/sandboxes/%s/execs/%s/cancel", sb, st.ExecID), nil), http.StatusOK, nil)
	})
}

func TestOutputLimit(t *testing.T) {
	const limit = 1000
	g := newGateway(t, Config{OutputLimit: limit})
	sb := g.newSandbox(t)

	tests := []struct {
		name        string
		command     string
		wantOmitted int // 0: nothing cut
		wantLen     int
	}{
		{"under the limit", "head -c 999 /dev/zero | tr '\\0' x", 0, 999},
		{"at the limit", "head -c 1000 /dev/zero | tr '\\0' x", 0, 1000},
		{"over the limit", "printf HEAD; head -c 10000 /dev/zero | tr '\\0' x; printf TAIL", 10008 - limit, 0},
		{"far over the limit, in many writes", "printf HEAD; for i in $(seq 2000); do echo line $i; done; printf TAIL", -1, 0},
		// The command prints the gateway's cut line itself: outputOmittedBytes
		// still says nothing was cut.
		{"a cut line of the command's own", `printf 'a\n[... 99 bytes omitted ...]\nb'`, 0, 30},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			st := g.run(t, sb, tt.command)
			if st.Status != gateway.StatusCompleted {
				t.Fatalf("got %s/%d %q, want completed", st.Status, st.RC(), st.Output)
			}
			out := st.Output
			if st.OutputOmitted == nil {
				t.Fatalf("no outputOmittedBytes in the answer")
			}
			if tt.wantOmitted == 0 {
				if len(out) != tt.wantLen || *st.OutputOmitted != 0 {
					t.Errorf("got %d bytes, %d omitted; want %d, uncut", len(out), *st.OutputOmitted, tt.wantLen)
				}
				return
			}
			if !strings.HasPrefix(out, "HEAD") || !strings.HasSuffix(out, "TAIL") {
				t.Errorf("got %q..%q, want the head and the tail kept", out[:min(10, len(out))], out[max(0, len(out)-10):])
			}
			head, tail, ok := strings.Cut(out, "\n[... ")
			if !ok {
				t.Fatalf("got %q, want a line saying what was cut", out)
			}
			var omitted int
			if _, err := fmt.Sscanf(tail, "%d bytes omitted ...]\n", &omitted); err != nil {
				t.Fatalf("cut line %q: %v", tail[:min(40, len(tail))], err)
			}
			_, tail, _ = strings.Cut(tail, "...]\n")
			if len(head) != limit/2 || len(tail) != limit-limit/2 {
				t.Errorf("got head %d and tail %d bytes, want %d and %d", len(head), len(tail), limit/2, limit-limit/2)
			}
			if tt.wantOmitted > 0 && omitted != tt.wantOmitted {
				t.Errorf("got %d bytes omitted, want %d", omitted, tt.wantOmitted)
			}
			if omitted <= 0 {
				t.Errorf("got %d bytes omitted, want > 0", omitted)
			}
			if *st.OutputOmitted != int64(omitted) {
				t.Errorf("outputOmittedBytes %d, the cut line says %d", *st.OutputOmitted, omitted)
			}
		})
	}
}
