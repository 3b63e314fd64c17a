package reliability

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// TestFaultProxy checks each fault on its own: what the client sees, and
// whether the request reached the server behind the proxy.
func TestFaultProxy(t *testing.T) {
	var hits atomic.Int32
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("X-Seen", r.Header.Get("Authorization"))
		_, _ = io.WriteString(w, r.Method+" "+r.URL.RequestURI()+" "+string(body))
	}))
	defer backend.Close()
	tests := []struct {
		fault      Fault
		wantStatus int // 0: a transport error
		wantHit    bool
	}{
		{FaultNone, http.StatusOK, true},
		{FaultDrop, 0, false},
		{FaultDropAfter, 0, true},
		{Fault502, http.StatusBadGateway, false},
		{Fault503After, http.StatusServiceUnavailable, true},
		{FaultDelay, 0, true},
		{Fault429, http.StatusTooManyRequests, false},
	}
	for _, tt := range tests {
		t.Run(tt.fault.String(), func(t *testing.T) {
			proxy, err := NewFaultProxy(FaultConfig{Target: backend.URL,
				Choose: func(*http.Request, []byte) Fault { return tt.fault }})
			if err != nil {
				t.Fatal(err)
			}
			front := httptest.NewServer(proxy)
			defer front.Close()
			defer proxy.Close()
			hits.Store(0)
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			req, _ := http.NewRequestWithContext(ctx, http.MethodPost, front.URL+"/v1/x?waitMs=5", strings.NewReader("body"))
			req.Header.Set("Authorization", "Bearer t")
			client := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}}
			resp, err := client.Do(req)
			status, answer := 0, ""
			if err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				status, answer = resp.StatusCode, string(b)
				if tt.fault == Fault429 && resp.Header.Get("Retry-After") != "1" {
					t.Errorf("429 without Retry-After: 1")
				}
				if tt.fault == FaultNone && (answer != "POST /v1/x?waitMs=5 body" || resp.Header.Get("X-Seen") != "Bearer t") {
					t.Errorf("forwarded as %q with Authorization %q", answer, resp.Header.Get("X-Seen"))
				}
			}
			if status != tt.wantStatus {
				t.Errorf("status %d (err %v), want %d", status, err, tt.wantStatus)
			}
			// An "after" fault's request reaches the server even when the
			// client has given up.
			waitFor(t, 2*time.Second, "the backend's answer", func() bool { return !tt.wantHit || hits.Load() == 1 })
			if !tt.wantHit && hits.Load() != 0 {
				t.Errorf("the request reached the server")
			}
			if n := proxy.Counts()[tt.fault]; n != 1 {
				t.Errorf("Counts()[%v] = %d, want 1", tt.fault, n)
			}
		})
	}
}

// TestFaultProxyRate checks that the seeded draw hits about the asked share
// of requests, the same way for the same seed.
func TestFaultProxyRate(t *testing.T) {
	draws := func(seed uint64) []Fault {
		p, err := NewFaultProxy(FaultConfig{Target: "http://127.0.0.1:1", Rate: 0.1, Seed: seed})
		if err != nil {
			t.Fatal(err)
		}
		out := make([]Fault, 10000)
		for i := range out {
			out[i] = p.draw()
		}
		return out
	}
	a, b := draws(7), draws(7)
	faults := 0
	for i := range a {
		if a[i] != b[i] {
			t.Fatalf("draw %d differs for the same seed: %v, %v", i, a[i], b[i])
		}
		if a[i] != FaultNone {
			faults++
		}
	}
	if faults < 800 || faults > 1200 {
		t.Errorf("%d faults in 10000 draws at rate 0.1", faults)
	}
	if _, err := NewFaultProxy(FaultConfig{Target: "http://x", Rate: 2}); err == nil {
		t.Errorf("rate 2 accepted")
	}
}
