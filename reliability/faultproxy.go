// Package reliability holds boxq's reliability tests — worker crashes and
// shutdowns, gateway faults and restarts, Redis restarts, bad input, and
// the security checks — and the small helpers they need, such as
// FaultProxy. docs/RELIABILITY.md says what each test breaks and what it
// found.
package reliability

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Fault is one way FaultProxy fails a request.
type Fault int

// The faults. "Before" faults never reach the gateway; "after" faults reach
// it, so the gateway acts on the request and only its answer is lost or
// late, the harder case for a client that retries.
const (
	// FaultNone forwards the request and its answer.
	FaultNone Fault = iota
	// FaultDrop closes the connection without forwarding or answering.
	FaultDrop
	// FaultDropAfter forwards the request, then closes the connection
	// without the answer.
	FaultDropAfter
	// Fault502 answers 502 Bad Gateway without forwarding.
	Fault502
	// Fault503After forwards the request, then answers 503 instead of the
	// gateway's answer.
	Fault503After
	// FaultDelay forwards the request and holds the answer until the client
	// gives up waiting (its timeout), or MaxDelay.
	FaultDelay
	// Fault429 answers 429 Too Many Requests with a Retry-After header,
	// without forwarding.
	Fault429
	numFaults
)

var faultNames = [numFaults]string{"none", "drop", "drop-after", "502", "503-after", "delay", "429"}

func (f Fault) String() string {
	if f < 0 || f >= numFaults {
		return fmt.Sprintf("fault(%d)", int(f))
	}
	return faultNames[f]
}

// AllFaults lists every fault but FaultNone.
func AllFaults() []Fault {
	return []Fault{FaultDrop, FaultDropAfter, Fault502, Fault503After, FaultDelay, Fault429}
}

// FaultConfig configures a FaultProxy.
type FaultConfig struct {
	// Target is the URL of the server behind the proxy. Required.
	Target string
	// Rate is the share of requests that get a fault, 0 to 1.
	Rate float64
	// Faults are drawn from, uniformly, for a request that gets one.
	// Default AllFaults().
	Faults []Fault
	// Seed seeds the draws: the same seed and the same order of requests
	// give the same faults.
	Seed uint64
	// RetryAfter is the Retry-After of a 429, in seconds. Default "1".
	RetryAfter string
	// MaxDelay bounds a FaultDelay when the client never gives up.
	// Default 30s.
	MaxDelay time.Duration
	// Skip, when set, exempts the requests it returns true for.
	Skip func(*http.Request) bool
	// Choose, when set, decides the fault of each request instead of the
	// random draw, from the request and its body: for tests that need one
	// fault at one moment.
	Choose func(r *http.Request, body []byte) Fault
}

// FaultProxy is an HTTP reverse proxy that fails a random share of the
// requests it forwards, each in one of the ways of Fault. Put it between
// a client and a server to see the client ride out a flaky network and a
// flaky server.
type FaultProxy struct {
	cfg    FaultConfig
	target *url.URL
	client *http.Client
	rate   atomic.Uint64 // math.Float64bits of the rate

	mu  sync.Mutex
	rng *rand.Rand

	counts [numFaults]atomic.Int64
}

// NewFaultProxy returns a proxy for cfg. Close it when done.
func NewFaultProxy(cfg FaultConfig) (*FaultProxy, error) {
	u, err := url.Parse(cfg.Target)
	if err != nil || u.Scheme == "" || u.Host == "" {
		return nil, fmt.Errorf("reliability: fault proxy target %q is not a URL", cfg.Target)
	}
	if cfg.Rate < 0 || cfg.Rate > 1 {
		return nil, fmt.Errorf("reliability: fault rate %v is not in [0, 1]", cfg.Rate)
	}
	if len(cfg.Faults) == 0 {
		cfg.Faults = AllFaults()
	}
	if cfg.RetryAfter == "" {
		cfg.RetryAfter = "1"
	}
	if cfg.MaxDelay == 0 {
		cfg.MaxDelay = 30 * time.Second
	}
	p := &FaultProxy{
		cfg:    cfg,
		target: u,
		client: &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 256}},
		rng:    rand.New(rand.NewPCG(cfg.Seed, cfg.Seed^0x9e3779b97f4a7c15)),
	}
	p.SetRate(cfg.Rate)
	return p, nil
}

// SetRate changes the share of requests that get a fault.
func (p *FaultProxy) SetRate(rate float64) {
	p.rate.Store(math.Float64bits(rate))
}

// Counts returns how many requests got each fault, FaultNone included.
func (p *FaultProxy) Counts() map[Fault]int64 {
	m := make(map[Fault]int64, numFaults)
	for f := range numFaults {
		m[f] = p.counts[f].Load()
	}
	return m
}

// Close frees the proxy's idle connections to the target.
func (p *FaultProxy) Close() {
	p.client.CloseIdleConnections()
}

// draw picks the fault of one request.
func (p *FaultProxy) draw() Fault {
	rate := math.Float64frombits(p.rate.Load())
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.rng.Float64() >= rate {
		return FaultNone
	}
	return p.cfg.Faults[p.rng.IntN(len(p.cfg.Faults))]
}

// ServeHTTP forwards r, or fails it.
func (p *FaultProxy) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxForwardBody))
	if err != nil {
		drop(w)
		return
	}
	f := FaultNone
	switch {
	case p.cfg.Skip != nil && p.cfg.Skip(r):
	case p.cfg.Choose != nil:
		f = p.cfg.Choose(r, body)
	default:
		f = p.draw()
	}
	p.counts[f].Add(1)
	switch f {
	case FaultDrop:
		drop(w)
		return
	case Fault502:
		writeError(w, http.StatusBadGateway, "fault proxy: bad gateway", "")
		return
	case Fault429:
		writeError(w, http.StatusTooManyRequests, "fault proxy: too many requests", p.cfg.RetryAfter)
		return
	}

	// The forwarded request outlives the client's: an "after" fault is
	// one the gateway acted on.
	ctx := context.WithoutCancel(r.Context())
	if f == FaultNone {
		ctx = r.Context()
	}
	status, header, answer, err := p.forward(ctx, r, body)
	if err != nil {
		if f == FaultNone {
			writeError(w, http.StatusBadGateway, "fault proxy: "+err.Error(), "")
		} else {
			drop(w)
		}
		return
	}
	switch f {
	case FaultDropAfter:
		drop(w)
		return
	case Fault503After:
		writeError(w, http.StatusServiceUnavailable, "fault proxy: service unavailable", "")
		return
	case FaultDelay:
		t := time.NewTimer(p.cfg.MaxDelay)
		select {
		case <-r.Context().Done():
		case <-t.C:
		}
		t.Stop()
		if r.Context().Err() != nil {
			return // the client is gone
		}
	}
	for k, vs := range header {
		for _, v := range vs {
			w.Header().Add(k, v)
		}
	}
	w.WriteHeader(status)
	_, _ = w.Write(answer)
}

// maxForwardBody bounds what the proxy reads of an answer.
const maxForwardBody = 64 << 20

// forward sends r, with body, to the target and reads the whole answer.
func (p *FaultProxy) forward(ctx context.Context, r *http.Request, body []byte) (int, http.Header, []byte, error) {
	u := *p.target
	u.Path = strings.TrimRight(p.target.Path, "/") + r.URL.Path
	u.RawQuery = r.URL.RawQuery
	var rd io.Reader
	if len(body) > 0 {
		rd = bytes.NewReader(body)
	}
	req, err := http.NewRequestWithContext(ctx, r.Method, u.String(), rd)
	if err != nil {
		return 0, nil, nil, err
	}
	for k, vs := range r.Header {
		req.Header[k] = vs
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return 0, nil, nil, err
	}
	defer resp.Body.Close()
	answer, err := io.ReadAll(io.LimitReader(resp.Body, maxForwardBody))
	if err != nil {
		return 0, nil, nil, err
	}
	h := resp.Header.Clone()
	h.Del("Content-Length")
	return resp.StatusCode, h, answer, nil
}

// drop closes the client's connection without an answer.
func drop(w http.ResponseWriter) {
	hj, ok := w.(http.Hijacker)
	if !ok {
		panic(http.ErrAbortHandler)
	}
	conn, _, err := hj.Hijack()
	if err != nil {
		panic(http.ErrAbortHandler)
	}
	_ = conn.Close()
}

func writeError(w http.ResponseWriter, status int, msg, retryAfter string) {
	if retryAfter != "" {
		w.Header().Set("Retry-After", retryAfter)
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	fmt.Fprintf(w, "{\"error\":%q}\n", msg)
}
