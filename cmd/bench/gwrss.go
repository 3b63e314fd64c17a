package main

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/uuid"

	"github.com/boxq/boxq/gateway"
)

// The gateway-memory measurement (-gateway-rss BIN) runs a gateway binary,
// any build of cmd/gateway (an older one too, to compare), drives it over
// HTTP and reads its VmRSS: with many finished execs of 1 MiB output each,
// which it keeps for polls, and with many running ones. Each scenario gets
// a fresh gateway process, so that none inherits the heap of another.

// gwRSSSandboxes spreads the execs over this many sandboxes: under the
// per-sandbox cap of running execs, and under the default -max-sandboxes.
const gwRSSSandboxes = 32

// gwRSSResult is one scenario's memory, in MiB.
type gwRSSResult struct {
	name      string
	rss, peak float64
	note      string
}

// measureGatewayRSS runs the scenarios against bin and prints a table.
func measureGatewayRSS(ctx context.Context, bin string, finished, running int, stdout, progress io.Writer) error {
	say := func(format string, args ...any) { fmt.Fprintf(progress, "bench: "+format+"\n", args...) }
	mib := `head -c 1048576 /dev/zero | tr '\0' x`
	scenarios := []struct {
		name string
		f    func(g *gwProc) (string, error)
	}{
		{"idle, 32 sandboxes", func(g *gwProc) (string, error) { return "", nil }},
		{fmt.Sprintf("%d finished execs, 1 MiB output each, polled to their end", finished), func(g *gwProc) (string, error) {
			return g.runFinished(ctx, finished, mib)
		}},
		{fmt.Sprintf("%d running execs (sleep)", running), func(g *gwProc) (string, error) {
			return g.runRunning(ctx, running, "sleep 600")
		}},
		{fmt.Sprintf("%d running execs, 1 MiB printed each", running), func(g *gwProc) (string, error) {
			return g.runRunning(ctx, running, mib+"; sleep 600")
		}},
	}
	var results []gwRSSResult
	for _, sc := range scenarios {
		say("gateway memory: %s ...", sc.name)
		g, err := startGatewayProc(ctx, bin)
		if err != nil {
			return err
		}
		note, err := func() (string, error) {
			if err := g.makeSandboxes(ctx, gwRSSSandboxes); err != nil {
				return "", err
			}
			return sc.f(g)
		}()
		if err != nil {
			g.stop()
			return fmt.Errorf("%s: %w", sc.name, err)
		}
		// Sample for a while: output still arriving, the runtime settling.
		var rss float64
		for range 10 {
			rss = max(rss, rssMiB(g.cmd.Process.Pid))
			time.Sleep(200 * time.Millisecond)
		}
		results = append(results, gwRSSResult{name: sc.name, rss: rss, peak: vmHWM(g.cmd.Process.Pid), note: note})
		say("gateway memory: %s: VmRSS %.0f MiB", sc.name, rss)
		g.stop()
	}
	fmt.Fprintf(stdout, "gateway memory of %s (VmRSS, MiB; peak = VmHWM):\n", bin)
	for _, r := range results {
		fmt.Fprintf(stdout, "  %-58s %7.0f  peak %7.0f  %s\n", r.name, r.rss, r.peak, r.note)
	}
	return nil
}

// vmHWM is a process's peak resident memory, in MiB.
func vmHWM(pid int) float64 {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	for line := range strings.SplitSeq(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			var kb float64
			_, _ = fmt.Sscan(strings.TrimSuffix(strings.TrimSpace(v), " kB"), &kb)
			return kb / 1024
		}
	}
	return 0
}

// gwProc is a gateway process driven over HTTP.
type gwProc struct {
	cmd       *exec.Cmd
	dir       string
	base      string
	token     string
	client    *http.Client
	sandboxes []string
}

func startGatewayProc(ctx context.Context, bin string) (*gwProc, error) {
	var b [16]byte
	_, _ = rand.Read(b[:])
	dir, err := os.MkdirTemp("", "boxq-gwrss-")
	if err != nil {
		return nil, err
	}
	g := &gwProc{dir: dir, token: hex.EncodeToString(b[:]), client: &http.Client{
		Transport: &http.Transport{MaxIdleConnsPerHost: 64},
		Timeout:   2 * time.Minute,
	}}
	g.cmd = exec.CommandContext(ctx, bin, "-addr", "127.0.0.1:0", "-isolation", "none", "-state-dir", dir, "-log-format", "json", "-log-level", "info")
	g.cmd.Env = append(os.Environ(), "GATEWAY_TOKEN="+g.token)
	g.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	stderr, err := g.cmd.StderrPipe()
	if err != nil {
		return nil, err
	}
	if err := g.cmd.Start(); err != nil {
		os.RemoveAll(dir)
		return nil, err
	}
	addr := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			var rec struct{ Msg, Addr string }
			if json.Unmarshal(sc.Bytes(), &rec) == nil && rec.Msg == "listening" {
				addr <- rec.Addr
			}
		}
		_, _ = io.Copy(io.Discard, stderr)
	}()
	select {
	case a := <-addr:
		g.base = "http://" + a
		return g, nil
	case <-time.After(20 * time.Second):
		g.stop()
		return nil, fmt.Errorf("gateway %s: not listening after 20s", bin)
	}
}

func (g *gwProc) stop() {
	_ = g.cmd.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { _ = g.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		_ = g.cmd.Process.Kill()
		<-done
	}
	g.client.CloseIdleConnections()
	os.RemoveAll(g.dir)
}

// call sends a request and decodes a 200's body into v; the body is read
// whole, as a client does.
func (g *gwProc) call(ctx context.Context, method, path string, body, v any) error {
	var rd io.Reader
	if body != nil {
		data, err := json.Marshal(body)
		if err != nil {
			return err
		}
		rd = strings.NewReader(string(data))
	}
	req, err := http.NewRequestWithContext(ctx, method, g.base+path, rd)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+g.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := g.client.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s %s: %d %s", method, path, resp.StatusCode, strings.TrimSpace(string(data[:min(len(data), 300)])))
	}
	if v != nil {
		return json.Unmarshal(data, v)
	}
	return nil
}

func (g *gwProc) makeSandboxes(ctx context.Context, n int) error {
	for range n {
		var created gateway.CreateResponse
		if err := g.call(ctx, "POST", "/v1/sandboxes", gateway.CreateRequest{TimeoutMs: 3_600_000, IdleTimeoutMs: 3_600_000}, &created); err != nil {
			return err
		}
		g.sandboxes = append(g.sandboxes, created.ID)
	}
	return nil
}

// each runs f(i) for i in [0, n) on 16 goroutines and returns the first
// error.
func each(n int, f func(i int) error) error {
	var (
		wg    sync.WaitGroup
		once  sync.Once
		first error
		next  = make(chan int)
	)
	for range 16 {
		wg.Go(func() {
			for i := range next {
				if err := f(i); err != nil {
					once.Do(func() { first = err })
				}
			}
		})
	}
	for i := range n {
		next <- i
	}
	close(next)
	wg.Wait()
	return first
}

// runFinished runs n execs of command to their end, each polled until it
// ends (and so read once), and says how many are still pollable after.
func (g *gwProc) runFinished(ctx context.Context, n int, command string) (string, error) {
	ids := make([]string, n)
	err := each(n, func(i int) error {
		sb := g.sandboxes[i%len(g.sandboxes)]
		ids[i] = uuid.NewString()
		var st gateway.ExecState
		if err := g.call(ctx, "POST", "/v1/sandboxes/"+sb+"/execs", gateway.StartRequest{ExecID: ids[i], Command: command, TimeoutMs: 60_000}, &st); err != nil {
			return err
		}
		for !gateway.Terminal(st.Status) {
			if err := g.call(ctx, "GET", "/v1/sandboxes/"+sb+"/execs/"+ids[i]+"?waitMs=10000", nil, &st); err != nil {
				return err
			}
		}
		if len(st.Output) != 1<<20 {
			return fmt.Errorf("exec %d: got %d bytes of output, want 1 MiB", i, len(st.Output))
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	kept := 0
	for i, id := range ids {
		if g.call(ctx, "GET", "/v1/sandboxes/"+g.sandboxes[i%len(g.sandboxes)]+"/execs/"+id, nil, nil) == nil {
			kept++
		}
	}
	return fmt.Sprintf("(%d of %d still pollable)", kept, n), nil
}

// runRunning starts n execs of command and leaves them running.
func (g *gwProc) runRunning(ctx context.Context, n int, command string) (string, error) {
	err := each(n, func(i int) error {
		sb := g.sandboxes[i%len(g.sandboxes)]
		return g.call(ctx, "POST", "/v1/sandboxes/"+sb+"/execs", gateway.StartRequest{ExecID: uuid.NewString(), Command: command, TimeoutMs: 600_000}, nil)
	})
	return "", err
}
