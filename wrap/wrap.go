// Package wrap turns a user's shell command into the bash script boxq sends to
// a sandbox, and turns that script's output back into the user's output and
// the shell's final working directory.
//
// The gateway runs every exec in a fresh shell, so a `cd` in one command would
// be lost before the next. The wrapped script therefore starts in the tracked
// directory and, after the user's command, prints the directory it ended in
// between two copies of a per-exec marker. The marker carries a random nonce
// that the user's command is not shown, so nothing the command prints can
// forge the reported directory (see Command for how far that goes).
package wrap

import (
	"crypto/rand"
	"encoding/hex"
	"strings"
)

// maxPath bounds the text between the opening and the closing marker. Linux's
// PATH_MAX is 4096 bytes; a longer span cannot be a pwd, so the pair is not
// one our script printed and the output is left alone. The reset flag that
// may come before the path is not counted.
const maxPath = 4096

// cdFailed is the script's exit status when the starting directory cannot be
// entered. 126 ("found but cannot be run") keeps it apart from the user
// command's own statuses, 127 (not found) included.
const cdFailed = "126"

// resetFlag opens the text between the markers when CommandTracked could not
// enter its directory. A pwd is absolute or empty, so it never starts with
// the flag, and output printed by scripts without the flag parses as before.
const resetFlag = "reset:"

// NewNonce returns a fresh random nonce for one exec: 32 hex characters (128
// bits) from crypto/rand, so a command cannot guess the marker it will be
// wrapped with.
func NewNonce() string {
	var b [16]byte
	// crypto/rand.Read never fails: on a broken system source it crashes the
	// program rather than return predictable bytes, so the error is always nil.
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Marker returns the marker that brackets the final working directory in the
// output of a command wrapped for nonce. Callers keep it to pass to both
// Command and Parse.
func Marker(nonce string) string {
	return "__BOXQ_CWD_" + nonce + "__"
}

// Command returns the bash script that runs userCommand starting in cwd and
// then reports the shell's final directory between two copies of marker.
//
// cwd "" leaves the directory to the gateway. "~" and a leading "~/" go
// through $HOME; any other cwd is taken literally, a relative one against the
// directory the gateway starts the shell in. If cwd cannot be entered,
// the script exits 126 before running anything.
//
// userCommand runs verbatim through eval, on its own line, so it may be any
// bash text: several lines, heredocs, even a syntax error (which then fails
// with status 2 and still reports the directory). The script exits with the
// command's status. A command that exits the shell itself (`exit 4`, `exec`)
// prints no marker, and Parse then reports no directory.
//
// The marker appears only as literal text in the script's last lines, which
// bash has not even parsed while the command runs: it is in no variable, no
// function and no trap, and $BASH_EXECUTION_STRING, which holds the whole
// script under `bash -c`, is unset before the command runs. After the
// command, the script turns off what could copy its own remaining lines
// somewhere the command set up to read them later (xtrace, verbose;
// DEBUG, ERR and RETURN traps). What stays open: a gateway that
// passes the script in bash's argv (`bash -c <script>`, as hosted gateways
// do) shows it in /proc/<pid>/cmdline to every process of the sandbox (the
// reference gateway, gateway/local, does not); and code the command runs
// inside the shell or with ptrace rights on it can still read it: a DEBUG
// trap with `shopt -s extdebug` can skip the commands that turn it off
// and then read the marker line in $BASH_COMMAND; a builtin loaded with
// `enable -f`, or a process of the same user reading /proc/<pid>/mem of
// the shell, sees its memory. Such code can cd anywhere anyway: what it
// gains is reporting a directory that is not the shell's.
func Command(userCommand, cwd, marker string) string {
	var cd string
	if cwd != "" {
		// builtin: a cd function or alias from the sandbox's environment must
		// not run instead. --: a cwd starting with '-' is not an option.
		cd = "builtin cd -- " + quoteDir(cwd) + " || exit " + cdFailed + "\n"
	}
	return script(cd, userCommand, marker, false)
}

// CommandTracked is Command for a cwd the task carried over from an earlier
// command rather than one the job named: when that directory no longer
// exists, the command runs from the sandbox's default cwd (the directory bash
// starts in; no cd at all) and the output's marker says so.
//
// Any failure to enter cwd counts (removed, replaced by a file, no longer
// searchable): a task is never stuck on a directory it cannot enter. bash's
// complaint is dropped, since ParseAll reports the reset. The flag travels
// in a readonly variable, set before the command runs on either branch,
// which the command can neither change nor unset nor shadow with a local
// (bash refuses, with status 1), so the reset is reported whatever the
// command does after: cd, exit with a status, fail. It is printed inside
// the marker line, so output cannot forge it either. When cwd can be
// entered, the script behaves exactly as Command's. cwd "" gives Command's
// script: there is nothing to reset.
func CommandTracked(userCommand, cwd, marker string) string {
	if cwd == "" {
		return Command(userCommand, cwd, marker)
	}
	cd := "if builtin cd -- " + quoteDir(cwd) + " 2>/dev/null; then builtin readonly __boxq_cwd_reset=\n" +
		"else builtin readonly __boxq_cwd_reset=" + resetFlag + "\nfi\n"
	return script(cd, userCommand, marker, true)
}

// script is the wrapped script: cd, the statements that enter the starting
// directory ("" for none), then userCommand, then the marker line, which
// holds $__boxq_cwd_reset before the directory when tracked.
func script(cd, userCommand, marker string, tracked bool) string {
	var b strings.Builder
	// The fixed text is some 470 bytes; sized up front, the script is
	// built in one allocation, not in five doublings.
	b.Grow(len(userCommand) + len(cd) + 2*len(marker) + 512)
	b.WriteString(cd)
	// Under `bash -c` the whole script, marker included, is in this
	// variable; builtin: a function named unset must not run instead.
	b.WriteString("builtin unset BASH_EXECUTION_STRING\n")
	// A pager would wait for a terminal that an exec never has; keep one the
	// caller chose on purpose.
	b.WriteString(`export GIT_PAGER="${GIT_PAGER:-cat}" PAGER="${PAGER:-cat}"` + "\n")
	// eval keeps a syntax error in the command from aborting the whole script,
	// so the status and the directory still come back. The newline before the
	// closing quote ends a heredoc whose terminator is the command's last line,
	// and a trailing comment.
	b.WriteString("eval " + quote(userCommand+"\n") + "\n")
	b.WriteString("__boxq_rc=$?")
	// Then, before bash reads a line that holds the marker, stop what the
	// command may have left on to copy those lines where it can read them
	// later (an EXIT trap runs after the marker line): xtrace and verbose
	// print them, a DEBUG trap sees them in $BASH_COMMAND, as does an ERR
	// or RETURN trap. (History turned on inside eval records nothing after
	// it.) 2>/dev/null: the trace of `set +x` itself is no output of the
	// user's. The group is not the line's first word: after an eval that
	// ended in a syntax error, bash 5.2 does not take a line's leading "{"
	// for a group.
	b.WriteString("; { builtin set +vx; builtin trap - DEBUG ERR RETURN; } 2>/dev/null\n")
	// The directory without symlinks, as pwd -P names it. `cd -P .` puts it
	// in PWD without a subshell (a command substitution costs a fork: half
	// a millisecond on every command); -ef checks that PWD does name the
	// directory, which it does not when the directory was removed (bash
	// then sets it to the old path plus "/."), nor when the command made
	// PWD readonly. Only then does pwd -P run, in a command substitution.
	// That would drop trailing newlines, which a directory name may end in,
	// so a "." after pwd's own newline protects them; the "." and then that
	// one newline (the "?") are removed again. When pwd fails too, the path
	// is empty. Errors are dropped so they do not land in the user's output.
	// builtin: the command may have defined functions named cd, pwd or
	// printf.
	b.WriteString("if builtin cd -P . 2>/dev/null && [[ $PWD -ef . ]]; then __boxq_cwd=$PWD\n")
	b.WriteString("else __boxq_cwd=$(builtin pwd -P 2>/dev/null; builtin printf .); __boxq_cwd=${__boxq_cwd%.}; __boxq_cwd=${__boxq_cwd%?}\n")
	b.WriteString("fi\n")
	// The leading \n puts the marker on a line of its own even when the output
	// does not end in one; Parse removes it again. The marker is in the
	// format, not an argument: $_, which an EXIT trap can read, keeps the
	// last argument.
	m := printfLiteral(marker)
	if tracked {
		b.WriteString(`builtin printf ` + quote(`\n`+m+`%s%s`+m+`\n`) + ` "$__boxq_cwd_reset" "$__boxq_cwd"` + "\n")
	} else {
		b.WriteString(`builtin printf ` + quote(`\n`+m+`%s`+m+`\n`) + ` "$__boxq_cwd"` + "\n")
	}
	// Quoted so that an IFS the command changed cannot split the status away.
	b.WriteString(`builtin exit "$__boxq_rc"` + "\n")
	return b.String()
}

// Parsed is what Parse reads back from a wrapped command's output.
type Parsed struct {
	// Output is the command's own output, without the marker line.
	Output string
	// Cwd is the directory the shell ended in; "" when unknown (no marker
	// line, or the directory was removed).
	Cwd string
	// CwdReset says that CommandTracked could not enter its directory, so
	// the command started in the sandbox's default cwd. Only a marker line
	// can say so: without one it is false.
	CwdReset bool
}

// Parse splits the output of a script built by Command or CommandTracked into
// the user's output and the final working directory. It is ParseAll without
// the reset flag.
func Parse(output, marker string) (clean, cwd string) {
	p := ParseAll(output, marker)
	return p.Output, p.Cwd
}

// ParseAll splits the output of a script built by Command or CommandTracked
// into the user's output, the final working directory, and whether the
// tracked directory was given up.
//
// The last marker pair wins: the closing marker is the last occurrence and the
// opening one the occurrence just before it, at most 4096 bytes (plus the
// reset flag) earlier. ParseAll removes the marker line together with the
// newline the script printed before it, and keeps anything printed after the
// line (an EXIT trap, a background job), so output without a trailing newline
// comes back byte for byte.
//
// Without such a pair (the command exited the shell, timed out, was killed, or
// the output was cut) the output is returned untouched, Cwd is "", meaning
// unknown: the caller keeps the directory it had, and CwdReset is false. An
// empty path between the markers (the directory was removed) also gives Cwd
// "".
func ParseAll(output, marker string) Parsed {
	if marker == "" {
		return Parsed{Output: output}
	}
	closeAt := strings.LastIndex(output, marker)
	if closeAt < 0 {
		return Parsed{Output: output}
	}
	openAt := strings.LastIndex(output[:closeAt], marker)
	if openAt < 0 {
		return Parsed{Output: output}
	}
	pathAt := openAt + len(marker)
	path, reset := strings.CutPrefix(output[pathAt:closeAt], resetFlag)
	if len(path) > maxPath {
		return Parsed{Output: output}
	}
	before := strings.TrimSuffix(output[:openAt], "\n")
	after := strings.TrimPrefix(output[closeAt+len(marker):], "\n")
	return Parsed{Output: before + after, Cwd: path, CwdReset: reset}
}

// quote returns s as one bash word that expands to exactly s: single quotes
// keep everything literal, and each ' closes the quote, adds an escaped ', and
// reopens it.
func quote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// printfLiteral returns s as printf format text that prints s: % and \
// doubled. A marker from Marker(NewNonce()) has neither.
func printfLiteral(s string) string {
	return strings.NewReplacer(`%`, `%%`, `\`, `\\`).Replace(s)
}

// quoteDir returns cwd as a bash word for cd. "~" and "~/..." expand through
// $HOME, which only the sandbox knows. A relative cwd gets a "./" prefix so
// that cd neither searches $CDPATH (which would also print the directory into
// the user's output) nor reads "-" as "go to $OLDPWD".
func quoteDir(cwd string) string {
	switch {
	case cwd == "~":
		return `"$HOME"`
	case strings.HasPrefix(cwd, "~/"):
		if rest := cwd[len("~/"):]; rest != "" {
			return `"$HOME"/` + quote(rest)
		}
		return `"$HOME"/`
	case !cdPathFree(cwd):
		return quote("./" + cwd)
	default:
		return quote(cwd)
	}
}

// cdPathFree reports whether bash's cd takes dir as it is, without searching
// $CDPATH: absolute paths and those starting with "." or ".." as a whole
// component.
func cdPathFree(dir string) bool {
	return strings.HasPrefix(dir, "/") ||
		dir == "." || dir == ".." ||
		strings.HasPrefix(dir, "./") || strings.HasPrefix(dir, "../")
}
