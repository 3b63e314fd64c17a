package wrap_test

import (
	"strings"
	"testing"

	"github.com/boxq/boxq/wrap"
)

// forgeFunc defines __forge, which looks for a marker of ours in the file
// $HOME/g and, when one is there, prints a marker line of its own naming
// /forged and exits 0, so that no later marker line can follow it.
const forgeFunc = `__forge() { local m; m=$(grep -ao '__BOXQ_CWD_[0-9a-f]\{32\}__' "$HOME/g" | head -n 1); if [ -n "$m" ]; then printf '\n%s/forged%s\n' "$m" "$m"; exit 0; fi; }` + "\n"

// TestBashForge runs commands that hunt for the marker from inside the shell
// and use it to report a directory of their choice. Those that look after
// the fact (an EXIT trap runs after the marker line) first leave something
// on that could copy the script's last lines somewhere they can read.
// None may find the marker, except where the case says it is a known hole
// (see Command); those cases show that the probe works.
func TestBashForge(t *testing.T) {
	tests := []struct {
		name    string
		command string
		known   bool // a documented hole: the marker is found
		noCwd   bool // no marker line comes out: the cwd is unknown
	}{
		{"BASH_EXECUTION_STRING", `echo "${BASH_EXECUTION_STRING-}" > "$HOME/g"; __forge`, false, false},
		{"set", `set > "$HOME/g"; __forge`, false, false},
		{"declare -p", `declare -p > "$HOME/g"; __forge`, false, false},
		{"declare -f", `declare -f > "$HOME/g"; __forge`, false, false},
		{"export -p, alias, trap -p, shopt", `{ export -p; alias; trap -p; shopt; set -o; } > "$HOME/g"; __forge`, false, false},
		{"every variable by name", `for v in $(compgen -v); do printf '%s\n' "${!v}"; done > "$HOME/g" 2>&1; __forge`, false, false},
		{"history, read at exit", `set -o history; trap 'history > "$HOME/g"; __forge' EXIT`, false, false},
		{"$_ at exit", `trap 'echo "$_" > "$HOME/g"; __forge' EXIT`, false, false},
		{"BASH_COMMAND at exit", `trap 'echo "$BASH_COMMAND" > "$HOME/g"; __forge' EXIT`, false, false},
		{"xtrace to a file", `exec 7>"$HOME/g"; BASH_XTRACEFD=7; set -x; trap __forge EXIT`, false, false},
		{"xtrace on stderr to a file", `exec 2>"$HOME/g"; set -x; trap __forge EXIT`, false, false},
		{"PS4 runs code", `PS4='$(echo "$BASH_COMMAND" >> "$HOME/g")+ '; set -x; trap __forge EXIT`, false, false},
		{"verbose to a file", `exec 2>"$HOME/g"; set -v; trap __forge EXIT`, false, false},
		{"DEBUG trap", `trap 'echo "$BASH_COMMAND" >> "$HOME/g"' DEBUG; trap __forge EXIT`, false, false},
		{"DEBUG trap with functrace", `set -T; trap 'echo "$BASH_COMMAND" >> "$HOME/g"' DEBUG; trap __forge EXIT`, false, false},
		// The marker line fails to print, and the ERR trap then runs.
		{"ERR trap, stdout closed", `exec 9>&1 >&-; set -E; trap 'echo "$BASH_COMMAND" >> "$HOME/g"' ERR; trap '__forge >&9' EXIT`, false, true},
		{"RETURN trap", `set -T; trap 'echo "$BASH_COMMAND" >> "$HOME/g"' RETURN; trap __forge EXIT`, false, false},
		{"readonly PWD", `readonly PWD; exec 2>"$HOME/g"; set -x; trap __forge EXIT`, false, false},
		// Known: bash -c puts the script in argv (the reference gateway
		// does not; gateway/local's tests check it there).
		{"argv under bash -c", `tr '\0' ' ' < /proc/$$/cmdline > "$HOME/g"; __forge`, true, false},
		// Known: with extdebug, a DEBUG trap that fails skips the command,
		// so it can keep itself set and read the marker line.
		{"DEBUG trap with extdebug", `shopt -s extdebug; trap 'case $BASH_COMMAND in "builtin set +vx"*|"builtin trap - DEBUG"*) false;; *) echo "$BASH_COMMAND" >> "$HOME/g";; esac' DEBUG; trap __forge EXIT`, true, false},
	}
	for _, tt := range tests {
		for _, tracked := range []bool{false, true} {
			name := tt.name
			if tracked {
				name += " (tracked)"
			}
			t.Run(name, func(t *testing.T) {
				dir, home := t.TempDir(), t.TempDir()
				m := wrap.Marker(wrap.NewNonce())
				wrapCmd := wrap.Command
				if tracked {
					wrapCmd = wrap.CommandTracked
				}
				out, rc := runBash(t, dir, home, wrapCmd(forgeFunc+tt.command, dir, m))
				got := wrap.ParseAll(out, m)
				if tt.known {
					if got.Cwd != "/forged" {
						t.Errorf("known hole: want the probe to forge the cwd, got %+v, rc %d", got, rc)
					}
					return
				}
				want := realPath(t, dir)
				if tt.noCwd {
					want = ""
				}
				if got.Cwd != want || rc != 0 {
					t.Errorf("got cwd %q, rc %d; want %q, 0 (output %q)", got.Cwd, rc, want, got.Output)
				}
				if strings.Contains(got.Output, m) {
					t.Errorf("the marker is in the command's output %q", got.Output)
				}
			})
		}
	}
}
