package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/boxq/boxq/gateway"
)

// childEnv makes the test binary run main: the gateway as a process of its
// own, which a test can start as another user. BOXQ_TEST_GATEWAY_BIN, when
// set, names another gateway binary to start instead (an older build, to
// see a test fail on it).
const childEnv = "BOXQ_TEST_GATEWAY_CHILD"

// The unprivileged user the gateway runs as, as in the Dockerfile. It
// needs no /etc/passwd entry.
const nonRootUID = 10001

// child is a gateway process under test.
type child struct {
	cmd    *exec.Cmd
	logs   *logLines
	base   string
	token  string
	client *http.Client
}

// startChild starts the gateway binary (bin) as uid/gid nonRootUID with
// args, and waits until it listens.
func startChild(t *testing.T, bin, token string, args ...string) *child {
	t.Helper()
	args = append([]string{"-addr", "127.0.0.1:0", "-log-format", "json", "-log-level", "debug"}, args...)
	cmd := exec.Command(bin, args...)
	cmd.Env = []string{childEnv + "=1", "GATEWAY_TOKEN=" + token, "PATH=" + os.Getenv("PATH"), "HOME=/nonexistent"}
	cmd.SysProcAttr = &syscall.SysProcAttr{
		Credential: &syscall.Credential{Uid: nonRootUID, Gid: nonRootUID, Groups: []uint32{}},
		Pdeathsig:  syscall.SIGKILL,
	}
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	logs := readLogs(stderr)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	c := &child{cmd: cmd, logs: logs, token: token, client: &http.Client{Timeout: 30 * time.Second}}
	exited := make(chan struct{})
	go func() { <-logs.done; close(exited) }()
	select {
	case addr := <-logs.addr:
		c.base = "http://" + addr
	case <-exited:
		_ = cmd.Wait()
		t.Fatalf("gateway ended before listening; logs:\n%s", logs)
	case <-time.After(20 * time.Second):
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
		t.Fatalf("gateway not listening after 20s; logs:\n%s", logs)
	}
	t.Cleanup(func() { c.kill() })
	return c
}

// kill ends the gateway at once, leaving whatever it had on disk.
func (c *child) kill() {
	if c.cmd.ProcessState != nil {
		return
	}
	_ = c.cmd.Process.Kill()
	_ = c.cmd.Wait()
	<-c.logs.done
	c.client.CloseIdleConnections()
}

// stop ends the gateway with SIGTERM and checks that it stops cleanly.
func (c *child) stop(t *testing.T) {
	t.Helper()
	_ = c.cmd.Process.Signal(syscall.SIGTERM)
	err := c.cmd.Wait()
	<-c.logs.done
	c.client.CloseIdleConnections()
	if err != nil {
		t.Errorf("gateway after SIGTERM: %v; logs:\n%s", err, c.logs)
	}
}

func (c *child) call(t *testing.T, method, path, body string, v any) int {
	t.Helper()
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, c.base+path, rd)
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("Authorization", "Bearer "+c.token)
	req.Header.Set("Content-Type", "application/json")
	resp, err := c.client.Do(req)
	if err != nil {
		t.Fatalf("%s %s: %v", method, path, err)
	}
	defer resp.Body.Close()
	data, _ := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if resp.StatusCode != http.StatusOK {
		t.Errorf("%s %s: got %d %s", method, path, resp.StatusCode, data)
	} else if v != nil {
		if err := json.Unmarshal(data, v); err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
	}
	return resp.StatusCode
}

func (c *child) create(t *testing.T, key string) string {
	t.Helper()
	var created gateway.CreateResponse
	if c.call(t, "POST", "/v1/sandboxes", fmt.Sprintf(`{"persistentFilesystem": true, "logicalKey": %q}`, key), &created) != http.StatusOK {
		t.FailNow()
	}
	return created.ID
}

// run runs command in sandbox sb to its end and returns its output; it
// fails the test unless the command completes.
func (c *child) run(t *testing.T, sb, command string) string {
	t.Helper()
	id := uuid.NewString()
	body, _ := json.Marshal(gateway.StartRequest{ExecID: id, Command: command, TimeoutMs: 30_000})
	var st gateway.ExecState
	if c.call(t, "POST", "/v1/sandboxes/"+sb+"/execs", string(body), &st) != http.StatusOK {
		t.FailNow()
	}
	for !gateway.Terminal(st.Status) {
		if c.call(t, "GET", "/v1/sandboxes/"+sb+"/execs/"+id+"?waitMs=10000", "", &st) != http.StatusOK {
			t.FailNow()
		}
	}
	if st.Status != gateway.StatusCompleted {
		t.Fatalf("%q: got %s/%d %q, want completed", command, st.Status, st.RC(), st.Output)
	}
	return st.Output
}

// gatewayBinary returns a copy of the gateway binary that nonRootUID can
// run, in dir.
func gatewayBinary(t *testing.T, dir string) string {
	t.Helper()
	if bin := os.Getenv("BOXQ_TEST_GATEWAY_BIN"); bin != "" {
		return bin
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "gateway")
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}

// mess is what a command may leave behind: the modes of a Go module
// cache (555), a directory nobody may enter (000), unreadable files,
// fifos, a socket, symlinks out of the sandbox, and a read-only home.
const mess = `set -e
mkdir -p ~/ro/a && touch ~/ro/a/f && chmod 555 ~/ro/a ~/ro
mkdir ~/secret && echo s > ~/secret/s && chmod 000 ~/secret/s ~/secret
mkfifo ~/fifo /tmp/fifo
ln -s / ~/rootlink && ln -s /etc/passwd ~/passwd && ln -s ~/ro /tmp/rolink
/usr/bin/python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind("/root/sock")' || true
mkdir -p /tmp/deep/x && touch /tmp/deep/x/y && chmod 000 /tmp/deep/x && chmod 500 /tmp/deep
chmod 555 ~`

// TestNonRootCannotBeBricked runs the gateway binary as an unprivileged
// user under bubblewrap, as the Dockerfile does, and checks that nothing a
// command leaves in its sandbox breaks a terminate, a snapshot, its
// replacement, a restore or the gateway's next start.
func TestNonRootCannotBeBricked(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root, to start the gateway as another user")
	}
	if _, err := exec.LookPath("bwrap"); err != nil {
		if os.Getenv("BOXQ_REQUIRE_BWRAP") != "" {
			t.Fatalf("bwrap: %v", err)
		}
		t.Skipf("bwrap: %v", err)
	}
	dir, err := os.MkdirTemp("/var/tmp", "boxq-nonroot-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) }) // as root: whatever the modes
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := gatewayBinary(t, dir)
	state := filepath.Join(dir, "state")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(state, nonRootUID, nonRootUID); err != nil {
		t.Fatal(err)
	}
	token := "tok-" + uuid.NewString()
	args := []string{"-state-dir", state, "-isolation", "bwrap"}
	entries := func(sub string) []string {
		t.Helper()
		des, err := os.ReadDir(filepath.Join(state, sub))
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, de := range des {
			names = append(names, de.Name())
		}
		return names
	}

	g := startChild(t, bin, token, args...)
	if uid := strings.TrimSpace(g.run(t, g.create(t, "probe"), "id -u")); uid != fmt.Sprint(nonRootUID) {
		t.Errorf("id -u in a sandbox: got %s, want %d", uid, nonRootUID)
	}

	// A terminate without a snapshot removes it all.
	sb := g.create(t, "plain-"+uuid.NewString())
	g.run(t, sb, mess)
	g.call(t, "POST", "/v1/sandboxes/"+sb+"/terminate", `{}`, nil)
	if _, err := os.Lstat(filepath.Join(state, "sandboxes", sb)); err == nil {
		t.Errorf("terminate left the files of %s", sb)
	}

	// A terminate with a snapshot, a restore of it, and a replacement.
	sb = g.create(t, "bricked")
	g.run(t, sb, mess)
	g.call(t, "POST", "/v1/sandboxes/"+sb+"/terminate", `{"snapshotBeforeTerminate": true}`, nil)
	sb = g.create(t, "bricked")
	if out := g.run(t, sb, "ls ~/ro/a; stat -c %a ~ ~/ro/a ~/secret /tmp/deep; test -p ~/fifo || echo no fifo; readlink ~/rootlink"); out != "f\n555\n555\n0\n500\nno fifo\n/\n" {
		t.Errorf("restored sandbox: got %q", out)
	}
	g.run(t, sb, "chmod 755 ~ && echo more > ~/more && chmod 000 ~/secret")
	g.call(t, "POST", "/v1/sandboxes/"+sb+"/terminate", `{"snapshotBeforeTerminate": true}`, nil)
	if left := entries("trash"); len(left) != 0 {
		t.Errorf("snapshot replacement left %v in trash/", left)
	}

	// A gateway killed with a messy sandbox, and something in its state
	// dir it cannot remove at all: the next start logs it and serves.
	sb = g.create(t, "killed-"+uuid.NewString())
	g.run(t, sb, mess)
	g.kill()
	planted := filepath.Join(state, "sandboxes", "planted")
	if err := os.MkdirAll(filepath.Join(planted, "x"), 0o755); err != nil { // root's: not the gateway's to remove
		t.Fatal(err)
	}
	g = startChild(t, bin, token, args...)
	if got := entries("sandboxes"); len(got) != 1 || got[0] != "planted" {
		t.Errorf("after a restart: sandboxes/ holds %v, want only what cannot be removed", got)
	}
	sb = g.create(t, "bricked")
	if out := g.run(t, sb, "cat ~/more"); out != "more\n" {
		t.Errorf("restore after a restart: got %q, want the latest snapshot", out)
	}
	g.call(t, "POST", "/v1/sandboxes/"+sb+"/terminate", `{"snapshotBeforeTerminate": true}`, nil)
	g.stop(t)
	if !strings.Contains(g.logs.String(), "cannot remove") {
		t.Errorf("want the start-up to log what it could not remove; logs:\n%s", g.logs)
	}
	if t.Failed() {
		t.Logf("gateway logs:\n%s", g.logs)
	}
}

// TestStartWaitFlag checks that -start-wait 0 makes every start answer
// "running", even for a command that ends at once.
func TestStartWaitFlag(t *testing.T) {
	for _, tt := range []struct {
		flag string
		want string
	}{{"0", gateway.StatusRunning}, {"10s", gateway.StatusCompleted}} {
		t.Run(tt.flag, func(t *testing.T) {
			pr, pw := io.Pipe()
			logs := readLogs(pr)
			ctx, cancel := context.WithCancel(context.Background())
			args := []string{"-addr", "127.0.0.1:0", "-state-dir", t.TempDir(), "-isolation", "none", "-log-format", "json", "-start-wait", tt.flag}
			ran := make(chan error, 1)
			go func() {
				ran <- run(ctx, args, env(map[string]string{"GATEWAY_TOKEN": "t"}), io.Discard, pw)
				pw.Close()
			}()
			defer func() {
				cancel()
				<-ran
				<-logs.done
			}()
			var addr string
			select {
			case addr = <-logs.addr:
			case err := <-ran:
				t.Fatalf("run ended before listening: %v\nlogs:\n%s", err, logs)
			}
			c := &child{base: "http://" + addr, token: "t", client: &http.Client{Timeout: 20 * time.Second}}
			defer c.client.CloseIdleConnections()
			var created gateway.CreateResponse
			c.call(t, "POST", "/v1/sandboxes", `{}`, &created)
			var st gateway.ExecState
			c.call(t, "POST", "/v1/sandboxes/"+created.ID+"/execs", `{"execId": "e", "command": "true"}`, &st)
			if st.Status != tt.want {
				t.Errorf("-start-wait %s: start of true answered %q, want %q", tt.flag, st.Status, tt.want)
			}
		})
	}
}
