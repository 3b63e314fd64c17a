package gateway

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"
)

// Config configures a Client. Zero durations take the defaults documented on
// each field, which are the Python client's per-call timeouts.
type Config struct {
	// BaseURL is the gateway's address, e.g. https://modal-gateway.example.com.
	BaseURL string
	// Token is sent as "Authorization: Bearer <token>". It never appears in
	// an error, a log line or a result.
	Token string
	// HTTPClient sends the requests; nil means a client with a shared,
	// keep-alive transport sized for many concurrent execs.
	HTTPClient *http.Client
	// Logger receives debug lines about retries; nil discards them.
	Logger *slog.Logger

	CreateTimeout    time.Duration // default 60s
	StartTimeout     time.Duration // default 10s
	PollTimeout      time.Duration // read timeout of one poll on top of its waitMs; default 5s
	CancelTimeout    time.Duration // default 5s
	TerminateTimeout time.Duration // default 60s
	// Grace is added to an exec's timeout to get the client's own deadline;
	// past it the client cancels the exec and reports rc 124. Default 10s.
	Grace time.Duration
	// PollMin and PollMax bound the adaptive wait between two polls that
	// came back "running" quickly (a gateway that ignores waitMs). The first
	// poll is sent at once; the wait doubles from PollMin up to PollMax.
	// Defaults 5ms and 250ms.
	PollMin, PollMax time.Duration
	// LongPoll is the waitMs sent with each poll: a gateway that supports it
	// answers the moment the exec ends, or after this long with "running".
	// Default 10s; negative disables the parameter.
	LongPoll time.Duration
	// MaxExecTimeout caps an exec's timeout: the sandbox lifetime. Default 1h.
	MaxExecTimeout time.Duration
}

func (c *Config) withDefaults() {
	def := func(d *time.Duration, v time.Duration) {
		if *d == 0 {
			*d = v
		}
	}
	def(&c.CreateTimeout, 60*time.Second)
	def(&c.StartTimeout, 10*time.Second)
	def(&c.PollTimeout, 5*time.Second)
	def(&c.CancelTimeout, 5*time.Second)
	def(&c.TerminateTimeout, 60*time.Second)
	def(&c.Grace, 10*time.Second)
	def(&c.PollMin, 5*time.Millisecond)
	def(&c.PollMax, 250*time.Millisecond)
	def(&c.LongPoll, 10*time.Second)
	def(&c.MaxExecTimeout, time.Duration(DefaultTimeoutMs)*time.Millisecond)
	if c.HTTPClient == nil {
		c.HTTPClient = &http.Client{Transport: NewTransport()}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

func (c *Config) validate() error {
	if c.BaseURL == "" {
		return errors.New("gateway: no gateway URL: set GATEWAY_URL (or MODAL_GATEWAY_URL, or TOOL_GATEWAY_DOMAIN)")
	}
	u, err := url.Parse(c.BaseURL)
	if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
		return fmt.Errorf("gateway: URL %q is not an http(s) URL with a host", redactURL(c.BaseURL))
	}
	if c.Token == "" {
		return errors.New("gateway: no token: set GATEWAY_TOKEN (or TOOL_GATEWAY_USER_TOKEN)")
	}
	if c.PollMin <= 0 || c.PollMax < c.PollMin {
		return fmt.Errorf("gateway: poll interval bounds %v..%v are invalid", c.PollMin, c.PollMax)
	}
	return nil
}

// NewTransport returns the HTTP transport a Client uses by default: keep-alive
// connections, enough idle ones per host for a worker with many execs in
// flight, and a 1 s connect timeout (the Python client's poll and cancel
// connect timeout; a gateway that cannot be reached in 1 s is retried).
func NewTransport() *http.Transport {
	return &http.Transport{
		Proxy:                 http.ProxyFromEnvironment,
		DialContext:           (&net.Dialer{Timeout: time.Second, KeepAlive: 30 * time.Second}).DialContext,
		ForceAttemptHTTP2:     true,
		MaxIdleConns:          1024,
		MaxIdleConnsPerHost:   1024,
		IdleConnTimeout:       90 * time.Second,
		TLSHandshakeTimeout:   10 * time.Second,
		ExpectContinueTimeout: time.Second,
	}
}

// FromEnv reads the gateway URL and token the way the Python client does:
// GATEWAY_URL, else MODAL_GATEWAY_URL, else
// ${TOOL_GATEWAY_SCHEME:-https}://modal-gateway.${TOOL_GATEWAY_DOMAIN};
// GATEWAY_TOKEN, else TOOL_GATEWAY_USER_TOKEN. Empty strings when unset.
func FromEnv(getenv func(string) string) (baseURL, token string) {
	baseURL = getenv("GATEWAY_URL")
	if baseURL == "" {
		baseURL = getenv("MODAL_GATEWAY_URL")
	}
	if baseURL == "" {
		if domain := getenv("TOOL_GATEWAY_DOMAIN"); domain != "" {
			scheme := getenv("TOOL_GATEWAY_SCHEME")
			if scheme == "" {
				scheme = "https"
			}
			baseURL = scheme + "://modal-gateway." + domain
		}
	}
	token = getenv("GATEWAY_TOKEN")
	if token == "" {
		token = getenv("TOOL_GATEWAY_USER_TOKEN")
	}
	return baseURL, token
}

// Client calls a sandbox gateway. It is safe for concurrent use.
type Client struct {
	cfg     Config
	baseURL string
	http    *http.Client
	log     *slog.Logger
}

// New returns a Client for cfg.
func New(cfg Config) (*Client, error) {
	cfg.withDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	return &Client{
		cfg:     cfg,
		baseURL: strings.TrimRight(cfg.BaseURL, "/"),
		http:    cfg.HTTPClient,
		log:     cfg.Logger,
	}, nil
}

// Create creates a sandbox and returns its id. The caller chooses the
// idempotency key before the call and keeps it, so that a create retried
// after a crash or a lost answer is the same create.
func (c *Client) Create(ctx context.Context, idempotencyKey string, req CreateRequest) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.CreateTimeout)
	defer cancel()
	r, err := c.newRequest(ctx, http.MethodPost, "/v1/sandboxes", req)
	if err != nil {
		return "", err
	}
	if idempotencyKey != "" {
		r.Header.Set("x-idempotency-key", idempotencyKey)
	}
	var resp CreateResponse
	if err := c.do(r, &resp); err != nil {
		return "", err
	}
	if resp.ID == "" {
		return "", errors.New("gateway: create answered without a sandbox id")
	}
	return resp.ID, nil
}

// StartExec starts an exec. It returns ErrSandboxGone (wrapping the
// *APIError) when the gateway answers 404. The answer is either "running" or
// already terminal. Starting an execId that exists returns that exec: a
// start is safe to repeat.
func (c *Client) StartExec(ctx context.Context, sandboxID string, req StartRequest) (ExecState, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.StartTimeout)
	defer cancel()
	r, err := c.newRequest(ctx, http.MethodPost, "/v1/sandboxes/"+url.PathEscape(sandboxID)+"/execs", req)
	if err != nil {
		return ExecState{}, err
	}
	var st ExecState
	if err := c.do(r, &st); err != nil {
		if StatusCode(err) == http.StatusNotFound {
			return ExecState{}, fmt.Errorf("%w: %w", ErrSandboxGone, err)
		}
		return ExecState{}, err
	}
	if st.ExecID != req.ExecID {
		return ExecState{}, fmt.Errorf("gateway: start of exec %s answered for exec %q", req.ExecID, st.ExecID)
	}
	return st, nil
}

// PollExec reads an exec's state. With wait > 0 it sends waitMs so a gateway
// that long-polls answers when the exec ends or after wait. A 404 returns
// ErrExecNotFound.
func (c *Client) PollExec(ctx context.Context, sandboxID, execID string, wait time.Duration) (ExecState, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.PollTimeout+max(wait, 0))
	defer cancel()
	path := "/v1/sandboxes/" + url.PathEscape(sandboxID) + "/execs/" + url.PathEscape(execID)
	r, err := c.newRequest(ctx, http.MethodGet, path, nil)
	if err != nil {
		return ExecState{}, err
	}
	if wait > 0 {
		r.URL.RawQuery = WaitParam + "=" + strconv.FormatInt(wait.Milliseconds(), 10)
	}
	var st ExecState
	if err := c.do(r, &st); err != nil {
		if StatusCode(err) == http.StatusNotFound {
			return ExecState{}, fmt.Errorf("%w: %w", ErrExecNotFound, err)
		}
		return ExecState{}, err
	}
	return st, nil
}

// CancelExec asks the gateway to cancel an exec. Safe to repeat.
func (c *Client) CancelExec(ctx context.Context, sandboxID, execID string) error {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.CancelTimeout)
	defer cancel()
	path := "/v1/sandboxes/" + url.PathEscape(sandboxID) + "/execs/" + url.PathEscape(execID) + "/cancel"
	r, err := c.newRequest(ctx, http.MethodPost, path, nil)
	if err != nil {
		return err
	}
	return c.do(r, nil)
}

// Terminate ends a sandbox; with snapshot, a persistent sandbox's files are
// kept under its logical key for the next create.
func (c *Client) Terminate(ctx context.Context, sandboxID string, snapshot bool) error {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.TerminateTimeout)
	defer cancel()
	r, err := c.newRequest(ctx, http.MethodPost, "/v1/sandboxes/"+url.PathEscape(sandboxID)+"/terminate",
		TerminateRequest{SnapshotBeforeTerminate: snapshot})
	if err != nil {
		return err
	}
	return c.do(r, nil)
}

// List returns the live sandboxes. It is an extension of the reference
// gateway (cmd/gateway); a hosted gateway may answer 404.
func (c *Client) List(ctx context.Context) ([]SandboxInfo, error) {
	ctx, cancel := context.WithTimeout(ctx, c.cfg.StartTimeout)
	defer cancel()
	r, err := c.newRequest(ctx, http.MethodGet, "/v1/sandboxes", nil)
	if err != nil {
		return nil, err
	}
	var resp ListResponse
	if err := c.do(r, &resp); err != nil {
		return nil, err
	}
	return resp.Sandboxes, nil
}

// newRequest builds a request to path with body encoded as JSON (nil: no
// body) and the auth and content headers.
func (c *Client) newRequest(ctx context.Context, method, path string, body any) (*http.Request, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, fmt.Errorf("gateway: encode %s %s: %w", method, path, err)
		}
		rd = bytes.NewReader(b)
	}
	r, err := http.NewRequestWithContext(ctx, method, c.baseURL+path, rd)
	if err != nil {
		return nil, fmt.Errorf("gateway: %s %s: %w", method, path, err)
	}
	r.Header.Set("Authorization", "Bearer "+c.cfg.Token)
	r.Header.Set("Content-Type", "application/json")
	r.Header.Set("Accept", "application/json")
	return r, nil
}

// maxErrorBody bounds how much of an error answer is read.
const maxErrorBody = 64 << 10

// maxBody bounds a successful answer: an exec's output is capped by the
// gateway (1 MiB by default), JSON escaping can grow it up to 6x.
const maxBody = 64 << 20

// do sends r, checks the status, decodes a 2xx JSON answer into v (nil:
// ignore it), and always drains and closes the body so the connection is
// reused. Transport errors are returned as *TransportError, non-2xx answers
// as *APIError; neither carries the token or the URL's host.
func (c *Client) do(r *http.Request, v any) error {
	resp, err := c.http.Do(r)
	if err != nil {
		return &TransportError{Method: r.Method, Path: r.URL.Path, Err: stripURLError(err)}
	}
	defer func() {
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxErrorBody))
		resp.Body.Close()
	}()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		body, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
		return &APIError{
			StatusCode: resp.StatusCode,
			Method:     r.Method,
			Path:       r.URL.Path,
			Message:    errorMessage(body, resp.StatusCode, c.cfg.Token),
			RetryAfter: retryAfter(resp.Header.Get("Retry-After")),
		}
	}
	if v == nil {
		return nil
	}
	if err := json.NewDecoder(io.LimitReader(resp.Body, maxBody)).Decode(v); err != nil {
		return &TransportError{Method: r.Method, Path: r.URL.Path, Err: fmt.Errorf("decode answer: %w", err)}
	}
	return nil
}

// TransportError is a request that got no usable answer: connection refused
// or reset, a timeout, a body that is not the expected JSON. Always transient.
type TransportError struct {
	Method, Path string
	Err          error
}

func (e *TransportError) Error() string {
	return fmt.Sprintf("gateway: %s %s: %v", e.Method, e.Path, e.Err)
}

func (e *TransportError) Unwrap() error { return e.Err }

// stripURLError drops the *url.Error wrapper, whose message repeats the full
// URL; the path is already in TransportError and the host is config.
func stripURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// errorMessage extracts the text of an error answer: the "error", "message"
// or "code" field of a JSON object (nested objects are searched the same
// way), else the body as text, else "HTTP <status>". The token is blanked
// out in case a gateway echoes it.
func errorMessage(body []byte, status int, token string) string {
	msg := ""
	var obj map[string]any
	if json.Unmarshal(body, &obj) == nil {
		msg = messageFrom(obj, 0)
	}
	if msg == "" {
		msg = strings.TrimSpace(strings.ToValidUTF8(string(body), "\uFFFD"))
		if len(msg) > 512 {
			msg = msg[:512] + "…"
		}
	}
	if msg == "" {
		msg = "HTTP " + strconv.Itoa(status)
	}
	if token != "" {
		msg = strings.ReplaceAll(msg, token, "[REDACTED]")
	}
	return msg
}

func messageFrom(obj map[string]any, depth int) string {
	if depth > 4 {
		return ""
	}
	for _, k := range []string{"error", "message", "code"} {
		switch v := obj[k].(type) {
		case string:
			if v != "" {
				return v
			}
		case float64:
			return strconv.FormatFloat(v, 'f', -1, 64)
		case map[string]any:
			if m := messageFrom(v, depth+1); m != "" {
				return m
			}
		}
	}
	return ""
}

// retryAfter parses a Retry-After header: seconds, or an HTTP date.
func retryAfter(h string) time.Duration {
	if h == "" {
		return 0
	}
	if s, err := strconv.Atoi(strings.TrimSpace(h)); err == nil && s >= 0 {
		return time.Duration(s) * time.Second
	}
	if t, err := http.ParseTime(h); err == nil {
		if d := time.Until(t); d > 0 {
			return d
		}
	}
	return 0
}

// redactURL drops any user info from a URL before it goes in a message.
func redactURL(s string) string {
	u, err := url.Parse(s)
	if err != nil {
		return "<unparseable URL>"
	}
	return u.Redacted()
}

// Ping checks that the gateway answers and accepts the token, without
// side effects: it polls an exec that does not exist. A 404 (or any other
// answer than 401/403) proves both; a transport error or a 401/403 is
// returned.
func (c *Client) Ping(ctx context.Context) error {
	_, err := c.PollExec(ctx, "boxq-ping", "boxq-ping", 0)
	switch {
	case err == nil, errors.Is(err, ErrExecNotFound):
		return nil
	case errors.Is(err, ErrUnauthorized):
		return err
	case StatusCode(err) != 0 && StatusCode(err) < 500:
		return nil
	}
	return err
}
