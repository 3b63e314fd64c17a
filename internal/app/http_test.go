package app

import (
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/internal/redistest"
)

// TestHealthAndReadiness: with the gateway down, /healthz (Redis only)
// stays 200 and /readyz says 503, naming the gateway; without a token the
// dashboard is off, not open.
func TestHealthAndReadiness(t *testing.T) {
	rdb, _ := redistest.New(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	down := "http://" + ln.Addr().String()
	ln.Close() // nothing listens there now
	gw, err := gateway.New(gateway.Config{BaseURL: down, Token: "t"})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(httpHandler(httpConfig{rdb: rdb, reg: prometheus.NewRegistry(), gw: gw}))
	defer srv.Close()
	for _, tt := range []struct {
		path string
		code int
		want string
	}{
		{"/healthz", http.StatusOK, `"ok"`},
		{"/readyz", http.StatusServiceUnavailable, "gateway: "},
		{"/monitoring/", http.StatusForbidden, "BOXQ_HTTP_TOKEN"},
		{"/metrics", http.StatusOK, ""},
	} {
		resp, err := http.Get(srv.URL + tt.path)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tt.code || !strings.Contains(string(body), tt.want) {
			t.Errorf("GET %s = %d %q; want %d with %q", tt.path, resp.StatusCode, body, tt.code, tt.want)
		}
	}
}

func TestMain(m *testing.M) { redistest.Main(m) }

func TestParseQueues(t *testing.T) {
	for _, tt := range []struct {
		in, want, err string
	}{
		{"default=3,batch=1", "batch=1,default=3", ""},
		{" default , batch=2 ", "batch=2,default=1", ""},
		{"default=0", "", "whole number"},
		{"=2", "", "missing queue name"},
		{"boxq", "", "boxq's own"},
		{"a:b=1", "", "not a valid queue name"},
		{"a,a", "", "twice"},
		{"", "", "no queue"},
	} {
		qs, err := ParseQueues(tt.in)
		switch {
		case tt.err != "" && (err == nil || !strings.Contains(err.Error(), tt.err)):
			t.Errorf("ParseQueues(%q) = %v, %v; want an error with %q", tt.in, qs, err, tt.err)
		case tt.err == "" && (err != nil || FormatQueues(qs) != tt.want):
			t.Errorf("ParseQueues(%q) = %s, %v; want %s", tt.in, FormatQueues(qs), err, tt.want)
		}
	}
}
