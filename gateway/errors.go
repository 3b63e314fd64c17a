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
	msg := fmt.Sprintf("gateway: %s %s: %d %s: %s", e.Method, e.Path, e.StatusCode, http.StatusText(e.StatusCode), e.Message)
	if e.StatusCode == http.StatusUnauthorized || e.StatusCode == http.StatusForbidden {
		msg += " (the gateway rejected the token: check GATEWAY_TOKEN)"
	}
	return msg
}

// ErrDetached is returned by Run when the caller stopped waiting without
// cancelling the exec: the context was cancelled with this error as its
// cause (context.WithCancelCause). A worker that shuts down uses it so the
// exec keeps running and a re-delivered job can re-attach to it.
var ErrDetached = errors.New("gateway: stopped waiting; the exec goes on")

// ErrUnauthorized marks a 401 or 403: the token is missing, wrong or lacks
// access. Permanent: retrying will not help.
var ErrUnauthorized = errors.New("gateway rejected the token: check GATEWAY_TOKEN")

// Class says what a caller should do about a gateway error.
type Class int

const (
	// Transient errors (network, timeouts, 5xx, 408) may succeed if retried.
	Transient Class = iota
	// Capacity errors (429) mean "not now": wait RetryAfter and try again,
	// without counting it as a failure.
	Capacity
	// Permanent errors (400, 401, 403, other 4xx) will fail again.
	Permanent
)

func (c Class) String() string {
	switch c {
	case Transient:
		return "transient"
	case Capacity:
		return "capacity"
	case Permanent:
		return "permanent"
	}
	return "unknown"
}

// Classify decides, in one place, whether an error from this package is
// transient, capacity or permanent. Errors that are not gateway answers
// (context cancellation included) are transient.
func Classify(err error) Class {
	var ae *APIError
	if !errors.As(err, &ae) {
		return Transient
	}
	switch {
	case ae.StatusCode == http.StatusTooManyRequests:
		return Capacity
	case ae.StatusCode == http.StatusRequestTimeout, ae.StatusCode >= 500:
		return Transient
	default:
		return Permanent
	}
}

// RetryAfter returns the Retry-After the gateway sent with err, or 0.
func RetryAfter(err error) time.Duration {
	var ae *APIError
	if errors.As(err, &ae) {
		return ae.RetryAfter
	}
	return 0
}

// StatusCode returns the HTTP status of an *APIError in err's chain, or 0.
func StatusCode(err error) int {
	var ae *APIError
	if errors.As(err, &ae) {
		return ae.StatusCode
	}
	return 0
}

// Is lets errors.Is(err, ErrUnauthorized) match a 401 or 403 answer.
func (e *APIError) Is(target error) bool {
	return target == ErrUnauthorized && (e.StatusCode == http.StatusUnauthorized || e.StatusCode == http.StatusForbidden)
}
