package app

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
)

// UsageError is a mistake in the command line: exit status 2, with a
// message that says what to fix.
type UsageError struct{ Msg string }

func (e *UsageError) Error() string { return e.Msg }

// Usagef returns a *UsageError.
func Usagef(format string, args ...any) error {
	return &UsageError{Msg: fmt.Sprintf(format, args...)}
}

// ExitError ends a command with Code and no further message (the command
// has said what it had to).
type ExitError struct{ Code int }

func (e *ExitError) Error() string { return fmt.Sprintf("exit status %d", e.Code) }

// Exit turns the error of a command's run into its exit status, printing
// it first when there is something to say. Only main calls os.Exit.
func Exit(prog string, err error, stderr io.Writer) {
	var ue *UsageError
	var ee *ExitError
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		os.Exit(0)
	case errors.As(err, &ee):
		os.Exit(ee.Code)
	case errors.As(err, &ue):
		fmt.Fprintf(stderr, "%s: %s\nRun '%s -h' for help.\n", prog, ue.Msg, prog)
		os.Exit(2)
	default:
		fmt.Fprintf(stderr, "%s: %v\n", prog, err)
		os.Exit(1)
	}
}

// EnvOr returns getenv(key), or def when it is empty.
func EnvOr(getenv func(string) string, key, def string) string {
	if v := getenv(key); v != "" {
		return v
	}
	return def
}

// ParseFlags parses args into fs (which must use flag.ContinueOnError),
// turning flag errors into usage errors. On -h it writes help to stdout:
// the head text, the flags with their defaults, then the tail text, and
// returns flag.ErrHelp.
func ParseFlags(fs *flag.FlagSet, args []string, stdout io.Writer, head, tail string) error {
	fs.SetOutput(io.Discard)
	fs.Usage = func() {}
	err := fs.Parse(args)
	switch {
	case err == nil:
		return nil
	case errors.Is(err, flag.ErrHelp):
		fmt.Fprint(stdout, head)
		fmt.Fprintln(stdout, "\nFlags:")
		fs.SetOutput(stdout)
		fs.PrintDefaults()
		fmt.Fprint(stdout, tail)
		return err
	}
	return &UsageError{Msg: err.Error()}
}
