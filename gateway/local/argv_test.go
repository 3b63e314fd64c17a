package local

import (
	"fmt"
	"strings"
	"testing"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/wrap"
)

// forgeAtExit is shell text that, when the shell exits (after the wrapped
// script's own marker line), prints a marker line naming /forged for every
// marker the command wrote down in $HOME/g. The last line wins, so a marker
// of this exec's found there sets the cwd; markers of other execs (any
// process on the host is visible without isolation) change nothing.
const forgeAtExit = `trap 'for m in $(grep -ao "__BOXQ_CWD_[0-9a-f]\{32\}__" "$HOME/g" | sort -u); do printf "\n%s/forged%s\n" "$m" "$m"; done' EXIT` + "\n"

// fdsOf is shell text that prints what can be read through each descriptor
// of the processes in its arguments, except the exec's output pipe, which
// reading would steal from.
const fdsOf = `fdsOf() { local out f; out=$(readlink /proc/$$/fd/1); for p; do for f in /proc/$p/fd/*; do [ "$(readlink "$f")" = "$out" ] || timeout 0.5 cat "$f"; done; done 2>/dev/null; }` + "\n"

// TestMarkerNotReadable runs wrapped commands that hunt for their own marker
// where a process of the sandbox can look: in argv, in environments, through
// open descriptors, in the shell's variables. None may find it; the
// controls show that a command that does find it sets the cwd.
func TestMarkerNotReadable(t *testing.T) {
	eachIsolation(t, func(t *testing.T, mode Isolation) {
		g := newGateway(t, Config{Isolation: mode})
		sb := g.newSandbox(t)
		home := strings.TrimSuffix(g.mustRun(t, sb, "pwd -P"), "\n")

		tests := []struct {
			name    string
			gather  string // writes what it finds to $HOME/g
			bwrap   bool   // runs only under bubblewrap
			control bool   // finds the marker
		}{
			{name: "BASH_EXECUTION_STRING", gather: `echo "${BASH_EXECUTION_STRING-}"`},
			{name: "the shell's argv", gather: `tr '\0' ' ' < /proc/$$/cmdline`},
			{name: "own argv", gather: `tr '\0' ' ' < /proc/self/cmdline; cat /proc/self/cmdline`},
			{name: "the parent's argv", gather: `tr '\0' ' ' < /proc/$PPID/cmdline`},
			{name: "pid 1's argv", gather: `tr '\0' ' ' < /proc/1/cmdline`},
			{name: "every process's argv", gather: `cat /proc/[0-9]*/cmdline`},
			{name: "environments", gather: `cat /proc/$$/environ /proc/self/environ /proc/1/environ; env`},
			{name: "the shell's descriptors", gather: fdsOf + `fdsOf $$ self`},
			{name: "the shell's descriptor 3", gather: `cat /dev/fd/3 /proc/$$/fd/3; ls -l /proc/$$/fd/`},
			{name: "pid 1's descriptors", gather: fdsOf + `fdsOf 1`, bwrap: true},
			{name: "set, declare", gather: `set; declare -p; declare -f; export -p; trap -p`},
			{name: "control: the command knows it", gather: `echo "$known"`, control: true},
			// Known limit: a process of the sandbox's user may read the
			// shell's memory, where the script waits to be run.
			{name: "control: the shell's memory", control: true,
				gather: `r=$(grep -F '[heap]' /proc/$$/maps); a=${r%%-*}; b=${r#*-}; b=${b%% *}; dd if=/proc/$$/mem bs=4096 skip=$((0x$a/4096)) count=$(((0x$b-0x$a)/4096))`},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				if tt.bwrap && mode != IsolationBwrap {
					t.Skip("without isolation, pid 1 is the host's")
				}
				m := wrap.Marker(wrap.NewNonce())
				command := forgeAtExit + "{ " + tt.gather + "\n} > \"$HOME/g\" 2>&1; true"
				if tt.control {
					// Only a control learns the marker from the test.
					command = "known=" + m + "\n" + command
				}
				st := g.exec(t, sb, gateway.StartRequest{Command: wrap.Command(command, "", m), TimeoutMs: 20_000})
				got := wrap.ParseAll(st.Output, m)
				want := home
				if tt.control {
					want = "/forged"
				}
				if got.Cwd != want || st.Status != gateway.StatusCompleted {
					t.Errorf("%s: got %s/%d, cwd %q, want completed, cwd %q; output %q", mode, st.Status, st.RC(), got.Cwd, want, got.Output)
				}
				if !tt.control && strings.Contains(got.Output, m) {
					t.Errorf("%s: the marker is in the output %q", mode, got.Output)
				}
			})
		}
	})
}

// TestExecScript checks how the script reaches bash: not in its argv, its
// descriptor closed before the script's first command, lines counted as
// under bash -c, a script far longer than a pipe's buffer whole, with stdin
// left to the command.
func TestExecScript(t *testing.T) {
	eachIsolation(t, func(t *testing.T, mode Isolation) {
		g := newGateway(t, Config{Isolation: mode})
		sb := g.newSandbox(t)
		big := strings.Repeat("x", 3<<20) // a 3 MiB word

		tests := []struct {
			name       string
			req        gateway.StartRequest
			wantStatus string
			wantRC     int
			wantOutput string
		}{
			{name: "argv", req: gateway.StartRequest{Command: `tr '\0' ' ' < /proc/$$/cmdline # not in argv`},
				wantStatus: gateway.StatusCompleted, wantOutput: "bash -c " + bashLoader + " "},
			{name: "descriptor 3 closed", req: gateway.StartRequest{Command: `[ -e /proc/$$/fd/3 ] && echo open; sh -c '[ -e /proc/$$/fd/3 ] && echo inherited'; echo done`},
				wantStatus: gateway.StatusCompleted, wantOutput: "done\n"},
			{name: "line numbers", req: gateway.StartRequest{Command: "echo $LINENO\n\necho $LINENO"},
				wantStatus: gateway.StatusCompleted, wantOutput: "1\n3\n"},
			{name: "syntax error on the first line", req: gateway.StartRequest{Command: ")\necho not here"},
				wantStatus: gateway.StatusFailed, wantRC: 2, wantOutput: "bash: eval: line 1: syntax error near unexpected token `)'\nbash: eval: line 1: `unset __boxq_script; )'\n"},
			{name: "error messages as under bash -c", req: gateway.StartRequest{Command: "\nno_such_command_boxq 2>&1 | sed 's/:.*:/:/'"},
				wantStatus: gateway.StatusCompleted, wantOutput: "bash: command not found\n"},
			{name: "error line numbers as under bash -c", req: gateway.StartRequest{Command: "\n\nno_such_command_boxq 2>&1 | cut -d: -f1,2"},
				wantStatus: gateway.StatusCompleted, wantOutput: "bash: line 3\n"},
			{name: "$0 and BASH_SOURCE as under bash -c", req: gateway.StartRequest{Command: `echo "$0|${BASH_SOURCE[*]}|${FUNCNAME[*]}"`},
				wantStatus: gateway.StatusCompleted, wantOutput: "bash||\n"},
			{name: "return refused as under bash -c", req: gateway.StartRequest{Command: "return 3 2>/dev/null; echo after $?"},
				wantStatus: gateway.StatusCompleted, wantOutput: "after 2\n"},
			// -N counts characters: multibyte ones come through whole.
			{name: "multibyte characters kept", req: gateway.StartRequest{Command: "printf '%s' 'é€😀 \r' | od -An -tx1"},
				wantStatus: gateway.StatusCompleted, wantOutput: " c3 a9 e2 82 ac f0 9f 98 80 20 0d\n"},
			{name: "NUL refused", req: gateway.StartRequest{Command: "echo a\x00b"},
				wantStatus: gateway.StatusFailed, wantRC: 126, wantOutput: "gateway: start: the command holds a NUL byte\n"},
			{name: "exit status", req: gateway.StartRequest{Command: "(exit 7)"},
				wantStatus: gateway.StatusFailed, wantRC: 7, wantOutput: ""},
			{name: "only a comment", req: gateway.StartRequest{Command: "# nothing"},
				wantStatus: gateway.StatusCompleted, wantOutput: ""},
			{name: "long script and stdin", req: gateway.StartRequest{Command: "x=" + big + "\nread -r a; echo ${#x} $a; cat", StdinData: "one\ntwo\n"},
				wantStatus: gateway.StatusCompleted, wantOutput: fmt.Sprintf("%d one\ntwo\n", len(big))},
		}
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				tt.req.TimeoutMs = 20_000
				st := g.exec(t, sb, tt.req)
				if st.Status != tt.wantStatus || st.RC() != tt.wantRC || st.Output != tt.wantOutput {
					t.Errorf("%s: got %s/%d %q, want %s/%d %q", mode, st.Status, st.RC(), st.Output, tt.wantStatus, tt.wantRC, tt.wantOutput)
				}
			})
		}
	})
}
