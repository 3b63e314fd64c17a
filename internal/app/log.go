// Package app wires boxq's parts into the programs of cmd/: logging, the
// worker with its HTTP endpoints, and flag helpers shared by the commands.
package app

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"os"
	"strings"

	"github.com/lmittmann/tint"
	"github.com/redis/go-redis/v9"
)

// NewLogger returns the logger of a command: tint (coloured, human) when
// format is "text", or "auto" and w is a terminal; JSON lines otherwise.
func NewLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("-log-level %q: want debug, info, warn or error", level)
	}
	switch strings.ToLower(format) {
	case "auto":
		if IsTerminal(w) {
			return slog.New(tint.NewTextHandler(w, &tint.Options{Level: lvl, TimeFormat: "15:04:05.000"})), nil
		}
		return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: lvl, ReplaceAttr: durationString})), nil
	case "text":
		return slog.New(tint.NewTextHandler(w, &tint.Options{Level: lvl, TimeFormat: "15:04:05.000", NoColor: !IsTerminal(w)})), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: lvl, ReplaceAttr: durationString})), nil
	}
	return nil, fmt.Errorf("-log-format %q: want auto, text or json", format)
}

// IsTerminal reports whether w is a terminal: a character device that
// answers as one (/dev/null is a character device too).
func IsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	st, err := f.Stat()
	return err == nil && st.Mode()&os.ModeCharDevice != 0 && isTTY(f)
}

// durationString writes durations as Go duration strings ("5m0s"), not
// as nanoseconds, in JSON logs.
func durationString(_ []string, a slog.Attr) slog.Attr {
	if a.Value.Kind() == slog.KindDuration {
		return slog.String(a.Key, a.Value.Duration().String())
	}
	return a
}

// RouteRedisLogs sends go-redis's own log lines (connection pool retries,
// printed to stderr by default, ahead of the command's own message when
// Redis is down) to log at debug level. go-redis keeps its logger in a
// package variable, so this is called once, from main.
func RouteRedisLogs(log *slog.Logger) {
	redis.SetLogger(redisLogger{log})
}

type redisLogger struct{ l *slog.Logger }

func (r redisLogger) Printf(ctx context.Context, format string, v ...any) {
	r.l.DebugContext(ctx, strings.TrimSpace(fmt.Sprintf(format, v...)), "component", "go-redis")
}
