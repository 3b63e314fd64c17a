package local

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"runtime/debug"
	"strconv"
	"strings"
	"time"

	"github.com/boxq/boxq/gateway"
)

// apiError is an error answer: its status and the message of its body.
type apiError struct {
	status     int
	msg        string
	retryAfter time.Duration // sent as Retry-After when > 0
}

func (e *apiError) Error() string { return e.msg }

func badRequest(format string, args ...any) error {
	return &apiError{status: http.StatusBadRequest, msg: fmt.Sprintf(format, args...)}
}

func sandboxNotFound(id string) error {
	return &apiError{status: http.StatusNotFound, msg: fmt.Sprintf("sandbox %s not found", id)}
}

func execNotFound(id string) error {
	return &apiError{status: http.StatusNotFound, msg: fmt.Sprintf("exec %s not found", id)}
}

var errClosing = &apiError{status: http.StatusServiceUnavailable, msg: "gateway is shutting down", retryAfter: time.Second}

// writeJSON answers with v as JSON.
func writeJSON(w http.ResponseWriter, status int, v any) {
	writeRawJSON(w, status, encodeJSON(v))
}

// writeRawJSON answers with data, a JSON document.
func writeRawJSON(w http.ResponseWriter, status int, data []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", strconv.Itoa(len(data)))
	w.WriteHeader(status)
	_, _ = w.Write(data)
}

// encodeJSON is v as JSON with a final newline, as json.Encoder writes
// it. The server's answers are all plain structs: encoding cannot fail.
func encodeJSON(v any) []byte {
	data, err := json.Marshal(v)
	if err != nil {
		panic(fmt.Sprintf("encode %T: %v", v, err))
	}
	// Exactly sized: a retained exec keeps these bytes, and only these.
	out := make([]byte, len(data)+1)
	copy(out, data)
	out[len(data)] = '\n'
	return out
}

// writeError answers with err: an *apiError as it says, anything else as
// a 500, which is logged since it is the server's fault.
func (s *Server) writeError(w http.ResponseWriter, r *http.Request, err error) {
	var ae *apiError
	if !errors.As(err, &ae) {
		s.log.Error("request failed", "method", r.Method, "path", r.URL.Path, "error", err)
		ae = &apiError{status: http.StatusInternalServerError, msg: err.Error()}
	}
	if ae.retryAfter > 0 {
		secs := int((ae.retryAfter + time.Second - 1) / time.Second)
		w.Header().Set("Retry-After", strconv.Itoa(secs))
	}
	if ae.status == http.StatusUnauthorized {
		w.Header().Set("WWW-Authenticate", `Bearer realm="boxq gateway"`)
	}
	writeJSON(w, ae.status, gateway.ErrorBody{Error: ae.msg})
}

var errTrailingData = errors.New("request body has data after the JSON object")

// decodeBody reads the JSON object of r's body into v. An empty body is
// fine when emptyOK (v keeps its zero value). A body over MaxBodyBytes is
// a 413, anything else wrong a 400 that says what.
func decodeBody(w http.ResponseWriter, r *http.Request, v any, emptyOK bool) error {
	r.Body = http.MaxBytesReader(w, r.Body, MaxBodyBytes)
	dec := json.NewDecoder(r.Body)
	err := dec.Decode(v)
	if err == nil {
		_, err = dec.Token()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err == nil {
			err = errTrailingData
		}
	} else if errors.Is(err, io.EOF) && emptyOK {
		return nil
	}
	var (
		tooBig    *http.MaxBytesError
		typeErr   *json.UnmarshalTypeError
		syntaxErr *json.SyntaxError
	)
	switch {
	case errors.As(err, &tooBig):
		return &apiError{status: http.StatusRequestEntityTooLarge, msg: fmt.Sprintf("request body is over the limit of %d bytes", tooBig.Limit)}
	case errors.Is(err, errTrailingData):
		return badRequest("%v", err)
	case errors.Is(err, io.EOF):
		return badRequest("request body is empty: want a JSON object")
	case errors.As(err, &typeErr):
		if typeErr.Field == "" {
			return badRequest("request body is a JSON %s: want a JSON object", typeErr.Value)
		}
		return badRequest("field %q is a JSON %s: want %s", typeErr.Field, typeErr.Value, jsonKind(typeErr.Type.Kind().String()))
	case errors.Is(err, io.ErrUnexpectedEOF):
		return badRequest("invalid JSON: the body ends inside a value")
	case errors.As(err, &syntaxErr):
		return badRequest("invalid JSON at byte %d: %v", syntaxErr.Offset, syntaxErr)
	}
	return badRequest("cannot read request body: %v", err)
}

// jsonKind names a Go kind the way a JSON sender thinks of it.
func jsonKind(kind string) string {
	switch {
	case kind == "string":
		return "a string"
	case kind == "bool":
		return "a boolean"
	case strings.HasPrefix(kind, "int"), strings.HasPrefix(kind, "uint"):
		return "an integer"
	case strings.HasPrefix(kind, "float"):
		return "a number"
	}
	return "a " + kind
}

// authed lets a request through to h only with the server's bearer token,
// and only while the server is open.
func (s *Server) authed(h http.Handler) http.Handler {
	// Hashing first makes the comparison's time independent of the
	// lengths too, not only of the contents.
	want := sha256.Sum256([]byte(s.cfg.Token))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
		if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" {
			s.writeError(w, r, &apiError{status: http.StatusUnauthorized, msg: "missing bearer token: send the header Authorization: Bearer <token>"})
			return
		}
		got := sha256.Sum256([]byte(token))
		if subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
			s.writeError(w, r, &apiError{status: http.StatusUnauthorized, msg: "invalid bearer token"})
			return
		}
		select {
		case <-s.closing:
			s.writeError(w, r, errClosing)
			return
		default:
		}
		h.ServeHTTP(w, r)
	})
}

// recoverPanics turns a panic in h into a logged 500, so that one bad
// request cannot take the server down.
func recoverPanics(log *slog.Logger, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		defer func() {
			v := recover()
			if v == nil {
				return
			}
			if v == http.ErrAbortHandler {
				panic(v)
			}
			log.Error("panic in handler", "method", r.Method, "path", r.URL.Path, "panic", fmt.Sprint(v), "stack", string(debug.Stack()))
			writeJSON(w, http.StatusInternalServerError, gateway.ErrorBody{Error: "internal error"})
		}()
		h.ServeHTTP(w, r)
	})
}

// statusRecorder remembers the status a handler answered with.
type statusRecorder struct {
	http.ResponseWriter
	status int
}

func (r *statusRecorder) WriteHeader(status int) {
	if r.status == 0 {
		r.status = status
	}
	r.ResponseWriter.WriteHeader(status)
}

func (r *statusRecorder) Write(p []byte) (int, error) {
	if r.status == 0 {
		r.status = http.StatusOK
	}
	return r.ResponseWriter.Write(p)
}

// logRequests logs each request at debug level. The path holds sandbox and
// exec ids; headers, and so the token, are never logged.
func logRequests(log *slog.Logger, h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !log.Enabled(r.Context(), slog.LevelDebug) {
			h.ServeHTTP(w, r)
			return
		}
		start := time.Now()
		rec := &statusRecorder{ResponseWriter: w}
		h.ServeHTTP(rec, r)
		log.Debug("request", "method", r.Method, "path", r.URL.Path, "status", rec.status, "duration", time.Since(start))
	})
}
