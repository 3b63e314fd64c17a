package wrap_test

import (
	"context"
	"errors"
	"flag"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/boxq/boxq/wrap"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden from the current output")

// testMarker is a fixed marker for tests whose expected text spells it out.
var testMarker = wrap.Marker("0123456789abcdef0123456789abcdef")

func TestNewNonce(t *testing.T) {
	hexOnly := regexp.MustCompile(`^[0-9a-f]{16,}$`)
	seen := make(map[string]bool)
	for range 100 {
		n := wrap.NewNonce()
		if !hexOnly.MatchString(n) {
			t.Fatalf("NewNonce() = %q, want 16+ lowercase hex characters", n)
		}
		if seen[n] {
			t.Fatalf("NewNonce() returned %q twice", n)
		}
		seen[n] = true
	}
}

func TestMarker(t *testing.T) {
	if got, want := wrap.Marker("abc123"), "__BOXQ_CWD_abc123__"; got != want {
		t.Errorf("Marker(%q) = %q, want %q", "abc123", got, want)
	}
	if a, b := wrap.Marker(wrap.NewNonce()), wrap.Marker(wrap.NewNonce()); a == b {
		t.Errorf("markers of two nonces are equal: %q", a)
	}
}

// TestCommandCwd checks how the starting directory is quoted in the cd
// statement that opens the script.
func TestCommandCwd(t *testing.T) {
	tests := []struct {
		name string
		cwd  string
		want string // the cd statement
	}{
		{"absolute", "/srv/app", `builtin cd -- '/srv/app' || exit 126`},
		{"space", "/srv/my app", `builtin cd -- '/srv/my app' || exit 126`},
		{"single quote", "/srv/it's", `builtin cd -- '/srv/it'\''s' || exit 126`},
		{"only quotes", "/''", `builtin cd -- '/'\'''\''' || exit 126`},
		{"dollar and backtick", "/a/$HOME/`id`", "builtin cd -- '/a/$HOME/`id`' || exit 126"},
		{"double quote and backslash", `/a"b\c`, `builtin cd -- '/a"b\c' || exit 126`},
		{"newline", "/a\nb", "builtin cd -- '/a\nb' || exit 126"},
		{"tilde", "~", `builtin cd -- "$HOME" || exit 126`},
		{"tilde slash", "~/", `builtin cd -- "$HOME"/ || exit 126`},
		{"tilde subdir with space", "~/x y", `builtin cd -- "$HOME"/'x y' || exit 126`},
		{"tilde subdir with quote", "~/it's", `builtin cd -- "$HOME"/'it'\''s' || exit 126`},
		{"tilde user stays literal", "~bob", `builtin cd -- './~bob' || exit 126`},
		{"tilde not leading", "/a/~", `builtin cd -- '/a/~' || exit 126`},
		{"leading dash", "-dash", `builtin cd -- './-dash' || exit 126`},
		{"lone dash is not OLDPWD", "-", `builtin cd -- './-' || exit 126`},
		{"relative skips CDPATH", "sub/dir", `builtin cd -- './sub/dir' || exit 126`},
		{"hidden relative skips CDPATH", ".cache", `builtin cd -- './.cache' || exit 126`},
		{"dot", ".", `builtin cd -- '.' || exit 126`},
		{"dot slash", "./x", `builtin cd -- './x' || exit 126`},
		{"dot dot", "..", `builtin cd -- '..' || exit 126`},
		{"dot dot slash", "../x", `builtin cd -- '../x' || exit 126`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			script := wrap.Command("true", tt.cwd, testMarker)
			got, _, _ := strings.Cut(script, " || exit 126\n")
			got += " || exit 126"
			if got != tt.want {
				t.Errorf("cd statement for cwd %q:\n got %s\nwant %s", tt.cwd, got, tt.want)
			}
		})
	}
}

func TestCommandNoCwd(t *testing.T) {
	script := wrap.Command("true", "", testMarker)
	// After the command, `cd -P .` only names the directory it is in.
	if before, _, _ := strings.Cut(script, "eval "); strings.Contains(before, "cd ") {
		t.Errorf("script for empty cwd changes directory:\n%s", script)
	}
}

// TestCommandTrackedCwd checks the statements that enter a tracked cwd: the
// same quoting as Command's, and a readonly flag set on either branch.
func TestCommandTrackedCwd(t *testing.T) {
	tests := []struct {
		name string
		cwd  string
		want string // the word cd gets
	}{
		{"absolute", "/srv/app", `'/srv/app'`},
		{"single quote", "/srv/it's", `'/srv/it'\''s'`},
		{"tilde subdir", "~/x y", `"$HOME"/'x y'`},
		{"leading dash", "-dash", `'./-dash'`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			script := wrap.CommandTracked("true", tt.cwd, testMarker)
			want := "if builtin cd -- " + tt.want + " 2>/dev/null; then builtin readonly __boxq_cwd_reset=\n" +
				"else builtin readonly __boxq_cwd_reset=reset:\nfi\n"
			if !strings.HasPrefix(script, want) {
				t.Errorf("tracked cwd %q: script starts\n%s\nwant it to start\n%s", tt.cwd, script[:min(len(script), len(want))], want)
			}
		})
	}
}

func TestCommandTrackedNoCwd(t *testing.T) {
	if got, want := wrap.CommandTracked("ls", "", testMarker), wrap.Command("ls", "", testMarker); got != want {
		t.Errorf("CommandTracked with no cwd:\n%s\nwant Command's script:\n%s", got, want)
	}
}

// TestCommandMarkerOnlyAtEnd checks that the marker appears in the script
// only after the user's command, in the one line that prints it: there is
// no copy in a variable, a function or a trap set before the command runs.
func TestCommandMarkerOnlyAtEnd(t *testing.T) {
	for name, script := range map[string]string{
		"Command":        wrap.Command("true", "/srv", testMarker),
		"CommandTracked": wrap.CommandTracked("true", "/srv", testMarker),
	} {
		t.Run(name, func(t *testing.T) {
			lines := strings.Split(strings.TrimSuffix(script, "\n"), "\n")
			var at []int
			for i, l := range lines {
				if strings.Contains(l, testMarker) {
					at = append(at, i)
				}
			}
			if len(at) != 1 || at[0] != len(lines)-2 || strings.Count(lines[at[0]], testMarker) != 2 {
				t.Errorf("marker on lines %v of %d, want both copies on the line before the last:\n%s", at, len(lines), script)
			}
		})
	}
}

// TestCommandEval checks how the user's command is quoted into the eval line.
func TestCommandEval(t *testing.T) {
	tests := []struct {
		name    string
		command string
		want    string // the eval statement, through its closing quote
	}{
		{"simple", "ls -la", "eval 'ls -la\n'"},
		{"empty", "", "eval '\n'"},
		{"single quote", "echo 'hi'", "eval 'echo '\\''hi'\\''\n'"},
		{"double quote dollar backtick backslash", "echo \"$HOME\" `id` \\n", "eval 'echo \"$HOME\" `id` \\n\n'"},
		{"trailing newline kept", "ls\n", "eval 'ls\n\n'"},
		{"heredoc", "cat <<EOF\nhi\nEOF", "eval 'cat <<EOF\nhi\nEOF\n'"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			script := wrap.Command(tt.command, "", testMarker)
			i := strings.Index(script, "\neval '")
			j := strings.Index(script, "'\n__boxq_rc=$?;")
			if i < 0 || j < 0 {
				t.Fatalf("no eval statement in script:\n%s", script)
			}
			if got := script[i+1 : j+1]; got != tt.want {
				t.Errorf("eval statement:\n got %q\nwant %q", got, tt.want)
			}
		})
	}
}

func TestParse(t *testing.T) {
	m := testMarker
	line := func(cwd string) string { return "\n" + m + cwd + m + "\n" }
	long := "/" + strings.Repeat("a", 4095) // 4096 bytes: the longest accepted path
	tests := []struct {
		name   string
		output string
		want   wrap.Parsed
	}{
		{"plain", "hello\n" + line("/srv"), wrap.Parsed{Output: "hello\n", Cwd: "/srv"}},
		{"no output", line("/srv"), wrap.Parsed{Output: "", Cwd: "/srv"}},
		{"no trailing newline", "hello" + line("/srv"), wrap.Parsed{Output: "hello", Cwd: "/srv"}},
		{"only newlines", "\n\n" + line("/srv"), wrap.Parsed{Output: "\n\n", Cwd: "/srv"}},
		{"crlf kept", "a\r\nb\r\n" + line("/srv"), wrap.Parsed{Output: "a\r\nb\r\n", Cwd: "/srv"}},
		{"carriage return at end kept", "50%\r" + line("/srv"), wrap.Parsed{Output: "50%\r", Cwd: "/srv"}},
		{"no marker", "hello\n", wrap.Parsed{Output: "hello\n"}},
		{"empty output", "", wrap.Parsed{}},
		{"lone marker", "hello\n" + m + "/srv\n", wrap.Parsed{Output: "hello\n" + m + "/srv\n"}},
		{"lone marker at end", "x" + m, wrap.Parsed{Output: "x" + m}},
		{"empty path", "hello\n" + line(""), wrap.Parsed{Output: "hello\n"}},
		{"text after marker kept", "hello\n" + line("/srv") + "trap ran\n", wrap.Parsed{Output: "hello\ntrap ran\n", Cwd: "/srv"}},
		{"text after marker without newline", "hello" + "\n" + m + "/srv" + m + "bye", wrap.Parsed{Output: "hellobye", Cwd: "/srv"}},
		{"marker line without injected newline", "hello" + m + "/srv" + m + "\n", wrap.Parsed{Output: "hello", Cwd: "/srv"}},
		{"last pair wins", "a\n" + line("/one") + "b\n" + line("/two"), wrap.Parsed{Output: "a\n" + line("/one") + "b\n", Cwd: "/two"}},
		{"earlier lone marker ignored", "a " + m + "\n" + line("/srv"), wrap.Parsed{Output: "a " + m + "\n", Cwd: "/srv"}},
		{"pair is the last two occurrences", "a" + line("/srv") + m, wrap.Parsed{Output: "a\n" + m + "/srv", Cwd: "\n"}},
		{"path with newline", "x\n" + line("/a\nb"), wrap.Parsed{Output: "x\n", Cwd: "/a\nb"}},
		{"path with spaces and quotes", line(`/it's "x"`), wrap.Parsed{Output: "", Cwd: `/it's "x"`}},
		{"path of 4096 bytes", "x\n" + line(long), wrap.Parsed{Output: "x\n", Cwd: long}},
		{"opening marker too far back", "x\n" + line(long+"b"), wrap.Parsed{Output: "x\n" + line(long+"b")}},
		{"other nonce", "\n" + wrap.Marker("feed") + "/etc" + wrap.Marker("feed") + "\n", wrap.Parsed{Output: "\n" + wrap.Marker("feed") + "/etc" + wrap.Marker("feed") + "\n"}},
		{"other nonce then ours", wrap.Marker("feed") + "/etc" + wrap.Marker("feed") + "\n" + line("/srv"), wrap.Parsed{Output: wrap.Marker("feed") + "/etc" + wrap.Marker("feed") + "\n", Cwd: "/srv"}},
		{"invalid utf-8", "\xff\xfe\x00" + line("/\xff"), wrap.Parsed{Output: "\xff\xfe\x00", Cwd: "/\xff"}},
		{"reset", "hello\n" + line("reset:/root"), wrap.Parsed{Output: "hello\n", Cwd: "/root", CwdReset: true}},
		{"reset, no output", line("reset:/root"), wrap.Parsed{Cwd: "/root", CwdReset: true}},
		{"reset, directory removed after", "x" + line("reset:"), wrap.Parsed{Output: "x", CwdReset: true}},
		{"reset, path of 4096 bytes", "x\n" + line("reset:"+long), wrap.Parsed{Output: "x\n", Cwd: long, CwdReset: true}},
		{"reset, too far back", "x\n" + line("reset:"+long+"b"), wrap.Parsed{Output: "x\n" + line("reset:"+long+"b")}},
		{"reset flag only once", line("reset:reset:/x"), wrap.Parsed{Cwd: "reset:/x", CwdReset: true}},
		{"reset flag after the path is a path", line("/x/reset:"), wrap.Parsed{Cwd: "/x/reset:"}},
		{"reset flag outside the markers", "reset:" + line("/srv"), wrap.Parsed{Output: "reset:", Cwd: "/srv"}},
		{"reset in an earlier pair only", line("reset:/one") + line("/two"), wrap.Parsed{Output: line("reset:/one"), Cwd: "/two"}},
		{"reset with another nonce", "\n" + wrap.Marker("feed") + "reset:/etc" + wrap.Marker("feed") + "\n" + line("/srv"), wrap.Parsed{Output: "\n" + wrap.Marker("feed") + "reset:/etc" + wrap.Marker("feed") + "\n", Cwd: "/srv"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := wrap.ParseAll(tt.output, m)
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("ParseAll(%q) (-want +got):\n%s", tt.output, diff)
			}
			clean, cwd := wrap.Parse(tt.output, m)
			if clean != tt.want.Output || cwd != tt.want.Cwd {
				t.Errorf("Parse(%q) = %q, %q; want %q, %q", tt.output, clean, cwd, tt.want.Output, tt.want.Cwd)
			}
		})
	}
}

func TestParseEmptyMarker(t *testing.T) {
	clean, cwd := wrap.Parse("hello\n", "")
	if clean != "hello\n" || cwd != "" {
		t.Errorf(`Parse("hello\n", "") = %q, %q; want output untouched and no cwd`, clean, cwd)
	}
	if got := wrap.ParseAll("\nreset:/x\n", ""); got != (wrap.Parsed{Output: "\nreset:/x\n"}) {
		t.Errorf(`ParseAll with marker "" = %+v, want output untouched`, got)
	}
}

func TestGolden(t *testing.T) {
	tests := []struct {
		name    string
		command string
		cwd     string
		tracked bool // CommandTracked, not Command
	}{
		{"simple", "ls -la", "/srv/app", false},
		{"cwd_quote", "pwd", "/srv/it's here", false},
		{"home", "ls", "~", false},
		{"home_subdir", "ls", "~/a b", false},
		{"dash", "ls", "-dash", false},
		{"no_cwd", "echo \"$PAGER\"", "", false},
		{"heredoc", "cat <<'EOF' > notes.txt\nit's $HOME\nEOF", "/tmp", false},
		{"tracked", "ls -la", "/srv/app", true},
		{"tracked_quote", "pwd", "/srv/it's here", true},
		{"tracked_home_subdir", "ls", "~/a b", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			wrapCmd := wrap.Command
			if tt.tracked {
				wrapCmd = wrap.CommandTracked
			}
			got := wrapCmd(tt.command, tt.cwd, testMarker)
			path := filepath.Join("testdata", tt.name+".golden")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if diff := cmp.Diff(string(want), got); diff != "" {
				t.Errorf("%s: script for %q in %q differs from %s (-want +got):\n%s", tt.name, tt.command, tt.cwd, path, diff)
			}
		})
	}
}

// result is one wrapped command run in bash and parsed.
type result struct {
	Clean string
	Cwd   string
	RC    int
	Reset bool
}

// run wraps command with a fresh nonce, with CommandTracked when tracked and
// Command otherwise, runs the script with bash in dir with HOME set to home,
// and parses its combined output.
func run(t *testing.T, dir, home, command, cwd string, tracked bool) result {
	t.Helper()
	m := wrap.Marker(wrap.NewNonce())
	wrapCmd := wrap.Command
	if tracked {
		wrapCmd = wrap.CommandTracked
	}
	out, rc := runBash(t, dir, home, wrapCmd(command, cwd, m))
	p := wrap.ParseAll(out, m)
	return result{Clean: p.Output, Cwd: p.Cwd, RC: rc, Reset: p.CwdReset}
}

// runBash runs script with `bash -c` in a small, fixed environment, and
// returns its combined output and exit status.
func runBash(t testing.TB, dir, home, script string) (string, int) {
	t.Helper()
	bash, err := exec.LookPath("bash")
	if err != nil {
		t.Skip("bash not found:", err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bash, "-c", script)
	cmd.Dir = dir
	cmd.Env = []string{"PATH=" + os.Getenv("PATH"), "HOME=" + home, "LC_ALL=C"}
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		t.Fatalf("bash did not finish: %v\nscript:\n%s", ctx.Err(), script)
	}
	var exitErr *exec.ExitError
	if err != nil && !errors.As(err, &exitErr) {
		t.Fatalf("running bash: %v", err)
	}
	return string(out), cmd.ProcessState.ExitCode()
}

func mkdir(t *testing.T, path string) {
	t.Helper()
	if err := os.Mkdir(path, 0o755); err != nil {
		t.Fatal(err)
	}
}

// realPath resolves symlinks, as pwd -P does, so expected directories compare
// equal on systems where the temp dir is behind a link.
func realPath(t *testing.T, path string) string {
	t.Helper()
	p, err := filepath.EvalSymlinks(path)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func TestBash(t *testing.T) {
	// In the table, {dir} is the directory bash starts in and {home} is $HOME;
	// {dir}/missing does not exist and {dir}/file is a file. Every case that
	// is not tracked and starts in a directory that exists also runs with
	// CommandTracked, which must give the same result.
	tests := []struct {
		name    string
		command string
		cwd     string
		tracked bool // CommandTracked, not Command
		want    result
		stderr  string // if set, Clean must contain it and want.Clean is ""
	}{
		{"exit 0", "echo ok", "", false, result{"ok\n", "{dir}", 0, false}, ""},
		{"exit 1", "false", "", false, result{"", "{dir}", 1, false}, ""},
		{"exit 3", "(exit 3)", "", false, result{"", "{dir}", 3, false}, ""},
		{"exit 127", "no_such_command_boxq", "", false, result{"", "{dir}", 127, false}, "command not found"},
		{"syntax error still reports", "echo 'unterminated", "", false, result{"", "{dir}", 2, false}, "unexpected EOF"},
		{"syntax error in a cwd", "if", "{dir}/sub", false, result{"", "{dir}/sub", 2, false}, "syntax error"},
		{"cd inside command", "cd sub", "", false, result{"", "{dir}/sub", 0, false}, ""},
		{"starts in cwd", "pwd -P", "{dir}/sub", false, result{"{dir}/sub\n", "{dir}/sub", 0, false}, ""},
		{"missing cwd", "echo never", "{dir}/missing", false, result{"", "", 126, false}, "No such file or directory"},
		{"cwd is a file", "echo never", "{dir}/file", false, result{"", "", 126, false}, "Not a directory"},
		{"no trailing newline", "printf 'no newline'", "", false, result{"no newline", "{dir}", 0, false}, ""},
		{"only a newline", "echo", "", false, result{"\n", "{dir}", 0, false}, ""},
		{"blank lines at end", "printf 'a\\n\\n\\n'", "", false, result{"a\n\n\n", "{dir}", 0, false}, ""},
		{"heredoc", "cat <<EOF\nhello\nEOF", "", false, result{"hello\n", "{dir}", 0, false}, ""},
		{"quoted heredoc", "cat <<'EOF'\n'single' \"double\" $HOME `id` \\back\\slash\nEOF", "", false, result{"'single' \"double\" $HOME `id` \\back\\slash\n", "{dir}", 0, false}, ""},
		{"quotes and specials verbatim", `printf '%s|' 'it'\''s' "d\"q" '$HOME' '` + "`id`" + `' 'a\\b' "$((1+2))"`, "", false, result{`it's|d"q|$HOME|` + "`id`" + `|a\\b|3|`, "{dir}", 0, false}, ""},
		{"trailing comment", "echo hi # done", "", false, result{"hi\n", "{dir}", 0, false}, ""},
		{"forged marker other nonce", "echo; echo " + wrap.Marker("feedface") + "/etc" + wrap.Marker("feedface"), "", false, result{"\n" + wrap.Marker("feedface") + "/etc" + wrap.Marker("feedface") + "\n", "{dir}", 0, false}, ""},
		{"forged marker no newline", "printf %s " + wrap.Marker("feedface") + "/etc" + wrap.Marker("feedface"), "", false, result{wrap.Marker("feedface") + "/etc" + wrap.Marker("feedface"), "{dir}", 0, false}, ""},
		{"user exit", "echo bye; exit 4", "", false, result{"bye\n", "", 4, false}, ""},
		{"exit trap output kept", "trap 'echo trapped' EXIT; echo body", "", false, result{"body\ntrapped\n", "{dir}", 0, false}, ""},
		{"tilde", "pwd -P", "~", false, result{"{home}\n", "{home}", 0, false}, ""},
		{"tilde subdir", "pwd -P", "~/a b", false, result{"{home}/a b\n", "{home}/a b", 0, false}, ""},
		{"leading dash", "pwd -P", "-dash", false, result{"{dir}/-dash\n", "{dir}/-dash", 0, false}, ""},
		{"lone dash", "pwd -P", "-", false, result{"{dir}/-\n", "{dir}/-", 0, false}, ""},
		{"quote in cwd", "pwd -P", "it's", false, result{"{dir}/it's\n", "{dir}/it's", 0, false}, ""},
		{"cwd ending in newlines", "pwd -P", "{dir}/nl\n\n", false, result{"{dir}/nl\n\n\n", "{dir}/nl\n\n", 0, false}, ""},
		{"cd into dir ending in newline", "cd 'nl\n\n'", "", false, result{"", "{dir}/nl\n\n", 0, false}, ""},
		{"cwd with invalid utf-8", "pwd -P", "{dir}/\xff\xfe", false, result{"{dir}/\xff\xfe\n", "{dir}/\xff\xfe", 0, false}, ""},
		{"pager defaults", `echo "$GIT_PAGER $PAGER"`, "", false, result{"cat cat\n", "{dir}", 0, false}, ""},
		{"pager kept", `export PAGER=less; echo "$PAGER"`, "", false, result{"less\n", "{dir}", 0, false}, ""},
		{"printf function", "printf() { echo hijacked; }; pwd() { echo hijacked; }", "", false, result{"", "{dir}", 0, false}, ""},
		{"errexit", "set -e; false; echo not here", "", false, result{"", "", 1, false}, ""},
		{"ifs", "IFS=0123456789; (exit 7)", "", false, result{"", "{dir}", 7, false}, ""},
		{"removed cwd", "mkdir gone && cd gone && rmdir ../gone", "", false, result{"", "", 0, false}, ""},
		{"xtrace does not show the wrapper", "set -x; true", "", false, result{"++ true\n+ __boxq_rc=0\n", "{dir}", 0, false}, ""},
		{"verbose does not show the wrapper", "set -v", "", false, result{"__boxq_rc=$?; { builtin set +vx; builtin trap - DEBUG ERR RETURN; } 2>/dev/null\n", "{dir}", 0, false}, ""},
		{"nounset", "set -u", "{dir}/sub", false, result{"", "{dir}/sub", 0, false}, ""},

		// A tracked cwd that cannot be entered: the command runs where bash
		// started, whatever it then does, and the marker says so.
		{"tracked missing", "pwd -P", "{dir}/missing", true, result{"{dir}\n", "{dir}", 0, true}, ""},
		{"tracked missing keeps the status", "echo out; (exit 3)", "{dir}/missing", true, result{"out\n", "{dir}", 3, true}, ""},
		{"tracked missing, then cd", "cd sub", "{dir}/missing", true, result{"", "{dir}/sub", 0, true}, ""},
		{"tracked missing, then cd home", "cd", "{dir}/missing", true, result{"", "{home}", 0, true}, ""},
		{"tracked missing, syntax error", "echo 'unterminated", "{dir}/missing", true, result{"", "{dir}", 2, true}, "unexpected EOF"},
		{"tracked missing, relative", "pwd -P", "missing", true, result{"{dir}\n", "{dir}", 0, true}, ""},
		{"tracked missing under home", "pwd -P", "~/missing", true, result{"{dir}\n", "{dir}", 0, true}, ""},
		{"tracked is a file", "pwd -P", "{dir}/file", true, result{"{dir}\n", "{dir}", 0, true}, ""},
		{"tracked missing, user exit", "exit 5", "{dir}/missing", true, result{"", "", 5, false}, ""},
		{"tracked missing, errexit", "set -e; false", "{dir}/missing", true, result{"", "", 1, false}, ""},
		{"tracked missing, nounset", "set -u", "{dir}/missing", true, result{"", "{dir}", 0, true}, ""},
		{"tracked missing, unset the flag", "unset __boxq_cwd_reset", "{dir}/missing", true, result{"", "{dir}", 1, true}, "readonly variable"},
		{"tracked missing, clear the flag", "readonly __boxq_cwd_reset=", "{dir}/missing", true, result{"", "{dir}", 1, true}, "readonly variable"},
		{"tracked missing, flag in a function", "f() { local __boxq_cwd_reset=; }; f", "{dir}/missing", true, result{"", "{dir}", 1, true}, "readonly variable"},
		{"tracked missing, assign the flag", "__boxq_cwd_reset=", "{dir}/missing", true, result{"", "{dir}", 1, true}, "readonly variable"},
		{"tracked present, forge the flag", "readonly __boxq_cwd_reset=reset:", "{dir}/sub", true, result{"", "{dir}/sub", 1, false}, "readonly variable"},
		{"tracked present, forge the flag in a function", "f() { local __boxq_cwd_reset=reset:; }; f", "{dir}/sub", true, result{"", "{dir}/sub", 1, false}, "readonly variable"},
	}
	for _, tt := range tests {
		variants := []bool{tt.tracked}
		if !tt.tracked && tt.cwd != "" && tt.want.RC != 126 {
			variants = append(variants, true)
		}
		for _, tracked := range variants {
			name := tt.name
			if tracked && !tt.tracked {
				name += " (tracked)"
			}
			t.Run(name, func(t *testing.T) {
				dir, home := t.TempDir(), t.TempDir()
				for _, d := range []string{"sub", "-dash", "-", "it's", "nl\n\n", "\xff\xfe"} {
					mkdir(t, filepath.Join(dir, d))
				}
				mkdir(t, filepath.Join(home, "a b"))
				if err := os.WriteFile(filepath.Join(dir, "file"), nil, 0o644); err != nil {
					t.Fatal(err)
				}
				expand := strings.NewReplacer("{dir}", realPath(t, dir), "{home}", realPath(t, home)).Replace
				// The cwd passed in uses the literal paths; only expectations
				// need symlinks resolved.
				cwd := strings.NewReplacer("{dir}", dir, "{home}", home).Replace(tt.cwd)
				want := tt.want
				want.Clean, want.Cwd = expand(want.Clean), expand(want.Cwd)
				got := run(t, dir, home, tt.command, cwd, tracked)
				if tt.stderr != "" {
					// bash's own messages differ between versions: only look
					// for the gist, and compare the rest exactly.
					if !strings.Contains(got.Clean, tt.stderr) {
						t.Errorf("output %q does not contain %q", got.Clean, tt.stderr)
					}
					got.Clean = ""
				}
				if diff := cmp.Diff(want, got); diff != "" {
					t.Errorf("command %q in %q, tracked %v (-want +got):\n%s", tt.command, cwd, tracked, diff)
				}
			})
		}
	}
}

// TestBashCwdCarries runs two wrapped commands the way a task does: the second
// starts where Parse said the first ended.
func TestBashCwdCarries(t *testing.T) {
	dir, home := t.TempDir(), t.TempDir()
	first := run(t, dir, home, "cd /tmp", "", false)
	if want := realPath(t, "/tmp"); first.Cwd != want || first.RC != 0 {
		t.Fatalf("after cd /tmp: cwd %q rc %d, want %q rc 0", first.Cwd, first.RC, want)
	}
	second := run(t, dir, home, "pwd -P", first.Cwd, true)
	want := result{Clean: first.Cwd + "\n", Cwd: first.Cwd}
	if diff := cmp.Diff(want, second); diff != "" {
		t.Errorf("second command (-want +got):\n%s", diff)
	}
}

// TestBashRemovedCwd is issue 12's sequence: a task cds into a directory,
// the next command removes it, and the one after that must still run. With
// the tracked cwd it starts where bash starts and says so; the task then
// tracks that directory, and the next command is back to normal. An
// explicit cwd that does not exist still fails with 126.
func TestBashRemovedCwd(t *testing.T) {
	dir, home := t.TempDir(), t.TempDir()
	real := realPath(t, dir)
	steps := []struct {
		command string
		want    result
	}{
		{"mkdir -p g && cd g", result{Cwd: real + "/g"}},
		{"rmdir " + real + "/g", result{Cwd: ""}}, // ended in a removed directory: unknown
		{"pwd -P", result{Clean: real + "\n", Cwd: real, Reset: true}},
		{"pwd -P", result{Clean: real + "\n", Cwd: real}},
	}
	cwd := ""
	for i, s := range steps {
		got := run(t, dir, home, s.command, cwd, true)
		if diff := cmp.Diff(s.want, got); diff != "" {
			t.Fatalf("step %d, %q in tracked cwd %q (-want +got):\n%s", i+1, s.command, cwd, diff)
		}
		if got.Cwd != "" {
			cwd = got.Cwd
		}
	}
	got := run(t, dir, home, "pwd -P", real+"/g", false)
	if want := (result{RC: 126}); got.RC != want.RC || got.Reset || got.Cwd != "" {
		t.Errorf("explicit removed cwd: got %+v, want rc 126, no cwd, no reset", got)
	}
}

// TestBashCDPATH checks that a relative cwd is not looked up in $CDPATH, which
// would both pick another directory and print it into the output.
func TestBashCDPATH(t *testing.T) {
	dir, elsewhere := t.TempDir(), t.TempDir()
	mkdir(t, filepath.Join(dir, "x"))
	mkdir(t, filepath.Join(elsewhere, "x"))
	for _, tracked := range []bool{false, true} {
		m := wrap.Marker(wrap.NewNonce())
		wrapCmd := wrap.Command
		if tracked {
			wrapCmd = wrap.CommandTracked
		}
		script := "CDPATH=" + elsewhere + "\n" + wrapCmd("true", "x", m)
		out, rc := runBash(t, dir, dir, script)
		p := wrap.ParseAll(out, m)
		want := result{Clean: "", Cwd: realPath(t, filepath.Join(dir, "x")), RC: 0}
		if diff := cmp.Diff(want, result{p.Output, p.Cwd, rc, p.CwdReset}); diff != "" {
			t.Errorf("relative cwd with CDPATH set, tracked %v (-want +got):\n%s", tracked, diff)
		}
	}
}
