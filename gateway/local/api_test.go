package local

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/boxq/boxq/gateway"
)

func TestHealthz(t *testing.T) {
	g := newGateway(t, Config{})
	r := g.request(t, "GET", "/healthz", nil, "-")
	var got gateway.StatusResponse
	decode(t, "healthz without a token", r, http.StatusOK, &got)
	if got.Status != "ok" {
		t.Errorf("got status %q, want ok", got.Status)
	}
}

func TestAuth(t *testing.T) {
	g := newGateway(t, Config{})
	tests := []struct {
		name string
		auth string // "-": no header
		want int
	}{
		{"missing", "-", http.StatusUnauthorized},
		{"wrong token", "Bearer wrong", http.StatusUnauthorized},
		{"token with a suffix", "Bearer " + g.token + "x", http.StatusUnauthorized},
		{"token prefix", "Bearer " + g.token[:len(g.token)-1], http.StatusUnauthorized},
		{"no token", "Bearer ", http.StatusUnauthorized},
		{"other scheme", "Basic " + g.token, http.StatusUnauthorized},
		{"bare token", g.token, http.StatusUnauthorized},
		{"right token", "Bearer " + g.token, http.StatusOK},
		{"scheme in lower case", "bearer " + g.token, http.StatusOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for _, call := range []struct{ method, path string }{
				{"GET", "/v1/sandboxes"},
				{"POST", "/v1/sandboxes"},
				{"POST", "/v1/sandboxes/sb-x/execs"},
				{"GET", "/v1/sandboxes/sb-x/execs/e"},
				{"POST", "/v1/sandboxes/sb-x/execs/e/cancel"},
				{"POST", "/v1/sandboxes/sb-x/terminate"},
			} {
				r := g.request(t, call.method, call.path, "{}", tt.auth)
				got := r.status
				if tt.want == http.StatusOK && got == http.StatusNotFound {
					got = http.StatusOK // through the door, to a sandbox that does not exist
				}
				if got != tt.want {
					t.Errorf("%s %s: got %d %s, want %d", call.method, call.path, r.status, r.body, tt.want)
				}
				if r.status == http.StatusUnauthorized {
					if r.errorMessage() == "" {
						t.Errorf("%s %s: got body %q, want a JSON error", call.method, call.path, r.body)
					}
					if strings.Contains(string(r.body), g.token) {
						t.Errorf("%s %s: the answer holds the token", call.method, call.path)
					}
				}
			}
		})
	}
}

func TestBadInput(t *testing.T) {
	g := newGateway(t, Config{})
	sb := g.newSandbox(t)
	done := g.run(t, sb, "true")
	execs := "/v1/sandboxes/" + sb + "/execs"
	huge := fmt.Sprint(MaxTimeout.Milliseconds() + 1)

	tests := []struct {
		name      string
		method    string
		path      string
		body      any
		want      int
		wantError string // a part of the error message
	}{
		// create
		{"create: invalid JSON", "POST", "/v1/sandboxes", `{"cpu":`, 400, "invalid JSON"},
		{"create: not JSON", "POST", "/v1/sandboxes", `hello`, 400, "invalid JSON"},
		{"create: empty body", "POST", "/v1/sandboxes", ``, 400, "empty"},
		{"create: an array", "POST", "/v1/sandboxes", `[]`, 400, "want a JSON object"},
		{"create: trailing data", "POST", "/v1/sandboxes", `{} {}`, 400, "after the JSON object"},
		{"create: cpu is a string", "POST", "/v1/sandboxes", `{"cpu":"1"}`, 400, `"cpu"`},
		{"create: timeoutMs is a string", "POST", "/v1/sandboxes", `{"timeoutMs":"1000"}`, 400, `"timeoutMs"`},
		{"create: timeoutMs is a fraction", "POST", "/v1/sandboxes", `{"timeoutMs":1.5}`, 400, `"timeoutMs"`},
		{"create: persistentFilesystem is a number", "POST", "/v1/sandboxes", `{"persistentFilesystem":1}`, 400, `"persistentFilesystem"`},
		{"create: negative cpu", "POST", "/v1/sandboxes", `{"cpu":-1}`, 400, "cpu -1 is negative"},
		{"create: negative memoryMiB", "POST", "/v1/sandboxes", `{"memoryMiB":-5}`, 400, "memoryMiB -5 is negative"},
		{"create: negative diskMiB", "POST", "/v1/sandboxes", `{"diskMiB":-5}`, 400, "diskMiB -5 is negative"},
		{"create: negative timeoutMs", "POST", "/v1/sandboxes", `{"timeoutMs":-1}`, 400, "timeoutMs -1 is negative"},
		{"create: huge timeoutMs", "POST", "/v1/sandboxes", `{"timeoutMs":` + huge + `}`, 400, "over the maximum"},
		{"create: timeoutMs beyond int64", "POST", "/v1/sandboxes", `{"timeoutMs":1e30}`, 400, `"timeoutMs"`},
		{"create: negative idleTimeoutMs", "POST", "/v1/sandboxes", `{"idleTimeoutMs":-1}`, 400, "idleTimeoutMs -1 is negative"},
		{"create: huge idleTimeoutMs", "POST", "/v1/sandboxes", `{"idleTimeoutMs":` + huge + `}`, 400, "over the maximum"},
		{"create: relative cwd", "POST", "/v1/sandboxes", `{"cwd":"root"}`, 400, "not an absolute path"},
		{"create: huge logicalKey", "POST", "/v1/sandboxes", gateway.CreateRequest{LogicalKey: strings.Repeat("k", 2000)}, 400, "logicalKey"},
		// start
		{"start: invalid JSON", "POST", execs, `{"command":"true"`, 400, "invalid JSON"},
		{"start: empty command", "POST", execs, `{"command":""}`, 400, "command is empty"},
		{"start: blank command", "POST", execs, `{"command":"  \n"}`, 400, "command is empty"},
		{"start: no command", "POST", execs, `{"execId":"x"}`, 400, "command is empty"},
		{"start: command is a list", "POST", execs, `{"command":["ls"]}`, 400, `"command"`},
		{"start: negative timeoutMs", "POST", execs, `{"command":"true","timeoutMs":-1}`, 400, "timeoutMs -1 is negative"},
		{"start: huge timeoutMs", "POST", execs, `{"command":"true","timeoutMs":` + huge + `}`, 400, "over the maximum"},
		{"start: relative cwd", "POST", execs, `{"command":"true","cwd":"work"}`, 400, "not an absolute path"},
		{"start: huge execId", "POST", execs, gateway.StartRequest{ExecID: strings.Repeat("e", 300), Command: "true"}, 400, "execId"},
		{"start: stdinData is a number", "POST", execs, `{"command":"cat","stdinData":5}`, 400, `"stdinData"`},
		{"start: body over 8 MiB", "POST", execs, gateway.StartRequest{Command: "cat", StdinData: strings.Repeat("x", MaxBodyBytes)}, 413, "over the limit"},
		// poll
		{"poll: waitMs not a number", "GET", execs + "/" + done.ExecID + "?waitMs=soon", nil, 400, "waitMs"},
		{"poll: negative waitMs", "GET", execs + "/" + done.ExecID + "?waitMs=-1", nil, 400, "waitMs"},
		// terminate
		{"terminate: invalid JSON", "POST", "/v1/sandboxes/" + sb + "/terminate", `{"snapshotBeforeTerminate":`, 400, "invalid JSON"},
		{"terminate: snapshot flag is a string", "POST", "/v1/sandboxes/" + sb + "/terminate", `{"snapshotBeforeTerminate":"yes"}`, 400, `"snapshotBeforeTerminate"`},
		// not found
		{"start: unknown sandbox", "POST", "/v1/sandboxes/sb-nope/execs", `{"command":"true"}`, 404, "sandbox sb-nope not found"},
		{"poll: unknown sandbox", "GET", "/v1/sandboxes/sb-nope/execs/x", nil, 404, "sandbox sb-nope not found"},
		{"poll: unknown exec", "GET", execs + "/nope", nil, 404, "exec nope not found"},
		{"cancel: unknown sandbox", "POST", "/v1/sandboxes/sb-nope/execs/x/cancel", nil, 404, "sandbox sb-nope not found"},
		{"cancel: unknown exec", "POST", execs + "/nope/cancel", nil, 404, "exec nope not found"},
		{"terminate: unknown sandbox", "POST", "/v1/sandboxes/sb-nope/terminate", `{}`, 404, "sandbox sb-nope not found"},
		{"unknown endpoint", "GET", "/v1/nothing", nil, 404, "no such endpoint"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := g.do(t, tt.method, tt.path, tt.body)
			if r.status != tt.want {
				t.Errorf("got %d %s, want %d", r.status, r.body, tt.want)
			}
			if ct := r.header.Get("Content-Type"); ct != "application/json" {
				t.Errorf("got Content-Type %q, want application/json", ct)
			}
			if msg := r.errorMessage(); !strings.Contains(msg, tt.wantError) {
				t.Errorf("got error %q, want it to hold %q", msg, tt.wantError)
			}
		})
	}

	// None of that harmed the server or the sandbox.
	if st := g.run(t, sb, "echo still here"); st.Output != "still here\n" {
		t.Errorf("after bad input: got %s %q", st.Status, st.Output)
	}
	var list gateway.ListResponse
	decode(t, "list", g.do(t, "GET", "/v1/sandboxes", nil), http.StatusOK, &list)
	if len(list.Sandboxes) != 1 {
		t.Errorf("bad creates made sandboxes: got %d live, want 1", len(list.Sandboxes))
	}
}

func TestDefaultsAccepted(t *testing.T) {
	// What the Python client sends, to the letter.
	g := newGateway(t, Config{})
	body := `{"image":"python:3.11","cwd":"/root","cpu":1,"memoryMiB":5120,"timeoutMs":3600000,"idleTimeoutMs":300000,"persistentFilesystem":true,"logicalKey":"task-1"}`
	var created gateway.CreateResponse
	decode(t, "create", g.do(t, "POST", "/v1/sandboxes", body, "x-idempotency-key", "k"), http.StatusOK, &created)
	start := `{"execId":"e-1","command":"echo ok","cwd":"/root","timeoutMs":60000}`
	r := g.do(t, "POST", "/v1/sandboxes/"+created.ID+"/execs", start)
	var st gateway.ExecState
	decode(t, "start", r, http.StatusOK, &st)
	if st.Status == gateway.StatusRunning {
		st = g.wait(t, created.ID, "e-1", 10*time.Second)
	}
	if st.Status != gateway.StatusCompleted || st.Output != "ok\n" || st.RC() != 0 {
		t.Errorf("got %s/%d %q, want completed/0 \"ok\\n\"", st.Status, st.RC(), st.Output)
	}
	// A terminate without a body is a terminate without a snapshot.
	decode(t, "terminate", g.do(t, "POST", "/v1/sandboxes/"+created.ID+"/terminate", nil), http.StatusOK, nil)
}

func TestRecoverPanics(t *testing.T) {
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))
	mux := http.NewServeMux()
	mux.HandleFunc("/panic", func(http.ResponseWriter, *http.Request) { panic("handler bug") })
	mux.HandleFunc("/ok", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, http.StatusOK, gateway.StatusResponse{Status: "ok"})
	})
	ts := httptest.NewServer(recoverPanics(log, mux))
	defer ts.Close()
	client := ts.Client()

	get := func(path string) (int, string) {
		t.Helper()
		resp, err := client.Get(ts.URL + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	status, body := get("/panic")
	var e gateway.ErrorBody
	if err := json.Unmarshal([]byte(body), &e); status != http.StatusInternalServerError || err != nil || e.Error == "" {
		t.Errorf("panicking handler: got %d %q, want 500 with a JSON error", status, body)
	}
	if !strings.Contains(logs.String(), "handler bug") {
		t.Errorf("got log %q, want the panic logged", logs.String())
	}
	if status, body := get("/ok"); status != http.StatusOK {
		t.Errorf("after a panic: got %d %q, want 200", status, body)
	}
}
