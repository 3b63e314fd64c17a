// Package wrap turns a user's shell command into the bash script boxq sends to
// a sandbox, and turns that script's output back into the user's output and
// the shell's final working directory.
//
// The gateway runs every exec in a fresh shell, so a `cd` in one command would
// be lost before the next. The wrapped script therefore starts in the tracked
// directory and, after the user's command, prints the directory it ended in
// between two copies of a per-exec marker. The marker carries a random nonce
// that the user's command never sees, so nothing the command prints can forge
// the reported directory.
package wrap

import (
	"crypto/rand"
	"encoding/hex"
	"strings"
)

// maxPath bounds the text between the opening and the closing marker. Linux's
// PATH_MAX is 4096 bytes; a longer span cannot be a pwd, so the pair is not
// one our script printed and the output is left alone.
const maxPath = 4096

// cdFailed is the script's exit status when the starting directory cannot be
// entered. 126 ("found but cannot be run") keeps it apart from the user
// command's own statuses, 127 (not found) included.
const cdFailed = "126"

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
func Command(userCommand, cwd, marker string) string {
	var b strings.Builder
	// The fixed text is some 450 bytes; sized up front, the script is
	// built in one allocation, not in five doublings.
	b.Grow(len(userCommand) + len(cwd) + 2*len(marker) + 512)
	if cwd != "" {
		// builtin: a cd function or alias from the sandbox's environment must
		// not run instead. --: a cwd starting with '-' is not an option.
		b.WriteString("builtin cd -- " + quoteDir(cwd) + " || exit " + cdFailed + "\n")
	}
	// A pager would wait for a terminal that an exec never has; keep one the
	// caller chose on purpose.
	b.WriteString(`export GIT_PAGER="${GIT_PAGER:-cat}" PAGER="${PAGER:-cat}"` + "\n")
	// eval keeps a syntax error in the command from aborting the whole script,
	// so the status and the directory still come back. The newline before the
	// closing quote ends a heredoc whose terminator is the command's last line,
	// and a trailing comment.
	b.WriteString("eval " + quote(userCommand+"\n") + "\n")
	b.WriteString("__boxq_rc=$?\n")
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
	// does not end in one; Parse removes it again.
	b.WriteString(`builtin printf '\n%s%s%s\n' ` + quote(marker) + ` "$__boxq_cwd" ` + quote(marker) + "\n")
	// Quoted so that an IFS the command changed cannot split the status away.
	b.WriteString(`builtin exit "$__boxq_rc"` + "\n")
	return b.String()
}

// Parse splits the output of a script built by Command into the user's output
// and the final working directory.
//
// The last marker pair wins: the closing marker is the last occurrence and the
// opening one the occurrence just before it, at most 4096 bytes earlier. Parse
// removes the marker line together with the newline the script printed before
// it, and keeps anything printed after the line (an EXIT trap, a background
// job), so output without a trailing newline comes back byte for byte.
//
// Without such a pair (the command exited the shell, timed out, was killed, or
// the output was cut) the output is returned untouched and cwd is "", meaning
// unknown: the caller keeps the directory it had. An empty path between the
// markers (the directory was removed) also gives cwd "".
func Parse(output, marker string) (clean, cwd string) {
	if marker == "" {
		return output, ""
	}
	closeAt := strings.LastIndex(output, marker)
	if closeAt < 0 {
		return output, ""
	}
	openAt := strings.LastIndex(output[:closeAt], marker)
	if openAt < 0 {
		return output, ""
	}
	pathAt := openAt + len(marker)
	if closeAt-pathAt > maxPath {
		return output, ""
	}
	before := strings.TrimSuffix(output[:openAt], "\n")
	after := strings.TrimPrefix(output[closeAt+len(marker):], "\n")
	return before + after, output[pathAt:closeAt]
}

// quote returns s as one bash word that expands to exactly s: single quotes
// keep everything literal, and each ' closes the quote, adds an escaped ', and
// reopens it.
func quote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
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
