package gateway

import (
	"errors"
	"fmt"
	"net/http"
	"time"
)

// ErrSandboxGone is returned by StartExec when the gateway answers 404: the
// sandbox was idle-reaped, outlived its lifetime, or the gateway restarted.
var ErrSandboxGone = errors.New("gateway: sandbox is gone")

// ErrExecNotFound is returned by PollExec when the gateway answers 404.
var ErrExecNotFound = errors.New("gateway: exec not found")

// APIError is a non-2xx answer from the gateway.
type APIError struct {
	StatusCode int
	Method     string
	Path       string // the request path, never the query or the host
	Message    string
	RetryAfter time.Duration // from Retry-After, on 429 and 503
}

func (e *APIError) Error() string {
	return fmt.Sprintf("gateway: %s %s: %d %s: %s", e.Method, e.Path, e.StatusCode, http.StatusText(e.StatusCode), e.Message)
}
