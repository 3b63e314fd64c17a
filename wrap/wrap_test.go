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
			j := strings.Index(script, "'\n__boxq_rc=$?\n")
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
		name      string
		output    string
		wantClean string
		wantCwd   string
	}{
		{"plain", "hello\n" + line("/srv"), "hello\n", "/srv"},
		{"no output", line("/srv"), "", "/srv"},
		{"no trailing newline", "hello" + line("/srv"), "hello", "/srv"},
		{"only newlines", "\n\n" + line("/srv"), "\n\n", "/srv"},
		{"crlf kept", "a\r\nb\r\n" + line("/srv"), "a\r\nb\r\n", "/srv"},
		{"carriage return at end kept", "50%\r" + line("/srv"), "50%\r", "/srv"},
		{"no marker", "hello\n", "hello\n", ""},
		{"empty output", "", "", ""},
		{"lone marker", "hello\n" + m + "/srv\n", "hello\n" + m + "/srv\n", ""},
		{"lone marker at end", "x" + m, "x" + m, ""},
		{"empty path", "hello\n" + line(""), "hello\n", ""},
		{"text after marker kept", "hello\n" + line("/srv") + "trap ran\n", "hello\ntrap ran\n", "/srv"},
		{"text after marker without newline", "hello" + "\n" + m + "/srv" + m + "bye", "hellobye", "/srv"},
		{"marker line without injected newline", "hello" + m + "/srv" + m + "\n", "hello", "/srv"},
		{"last pair wins", "a\n" + line("/one") + "b\n" + line("/two"), "a\n" + line("/one") + "b\n", "/two"},
		{"earlier lone marker ignored", "a " + m + "\n" + line("/srv"), "a " + m + "\n", "/srv"},
		{"pair is the last two occurrences", "a" + line("/srv") + m, "a\n" + m + "/srv", "\n"},
		{"path with newline", "x\n" + line("/a\nb"), "x\n", "/a\nb"},
		{"path with spaces and quotes", line(`/it's "x"`), "", `/it's "x"`},
		{"path of 4096 bytes", "x\n" + line(long), "x\n", long},
		{"opening marker too far back", "x\n" + line(long+"b"), "x\n" + line(long+"b"), ""},
		{"other nonce", "\n" + wrap.Marker("feed") + "/etc" + wrap.Marker("feed") + "\n", "\n" + wrap.Marker("feed") + "/etc" + wrap.Marker("feed") + "\n", ""},
		{"other nonce then ours", wrap.Marker("feed") + "/etc" + wrap.Marker("feed") + "\n" + line("/srv"), wrap.Marker("feed") + "/etc" + wrap.Marker("feed") + "\n", "/srv"},
		{"invalid utf-8", "\xff\xfe\x00" + line("/\xff"), "\xff\xfe\x00", "/\xff"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clean, cwd := wrap.Parse(tt.output, m)
			if clean != tt.wantClean {
				t.Errorf("clean output:\n got %q\nwant %q", clean, tt.wantClean)
			}
			if cwd != tt.wantCwd {
				t.Errorf("cwd: got %q, want %q", cwd, tt.wantCwd)
			}
		})
	}
}

func TestParseEmptyMarker(t *testing.T) {
	clean, cwd := wrap.Parse("hello\n", "")
	if clean != "hello\n" || cwd != "" {
		t.Errorf(`Parse("hello\n", "") = %q, %q; want output untouched and no cwd`, clean, cwd)
	}
}

func TestGolden(t *testing.T) {
	tests := []struct {
		name    string
		command string
		cwd     string
	}{
		{"simple", "ls -la", "/srv/app"},
		{"cwd_quote", "pwd", "/srv/it's here"},
		{"home", "ls", "~"},
		{"home_subdir", "ls", "~/a b"},
		{"dash", "ls", "-dash"},
		{"no_cwd", "echo \"$PAGER\"", ""},
		{"heredoc", "cat <<'EOF' > notes.txt\nit's $HOME\nEOF", "/tmp"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := wrap.Command(tt.command, tt.cwd, testMarker)
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
				t.Errorf("Command(%q, %q) differs from %s (-want +got):\n%s", tt.command, tt.cwd, path, diff)
			}
		})
	}
}

// result is one wrapped command run in bash and parsed.
type result struct {
	Clean string
	Cwd   string
	RC    int
}

// run wraps command with a fresh nonce, runs the script with bash in dir with
// HOME set to home, and parses its combined output.
func run(t *testing.T, dir, home, command, cwd string) result {
	t.Helper()
	m := wrap.Marker(wrap.NewNonce())
	out, rc := runBash(t, dir, home, wrap.Command(command, cwd, m))
	clean, gotCwd := wrap.Parse(out, m)
	return result{Clean: clean, Cwd: gotCwd, RC: rc}
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
	// In the table, {dir} is the directory bash starts in and {home} is $HOME.
	tests := []struct {
		name    string
		command string
		cwd     string
		want    result
		stderr  string // if set, Clean must contain it and want.Clean is ""
	}{
		{"exit 0", "echo ok", "", result{"ok\n", "{dir}", 0}, ""},
		{"exit 1", "false", "", result{"", "{dir}", 1}, ""},
		{"exit 3", "(exit 3)", "", result{"", "{dir}", 3}, ""},
		{"exit 127", "no_such_command_boxq", "", result{"", "{dir}", 127}, "command not found"},
		{"syntax error still reports", "echo 'unterminated", "", result{"", "{dir}", 2}, "unexpected EOF"},
		{"cd inside command", "cd sub", "", result{"", "{dir}/sub", 0}, ""},
		{"starts in cwd", "pwd -P", "{dir}/sub", result{"{dir}/sub\n", "{dir}/sub", 0}, ""},
		{"missing cwd", "echo never", "{dir}/missing", result{"", "", 126}, "No such file or directory"},
		{"no trailing newline", "printf 'no newline'", "", result{"no newline", "{dir}", 0}, ""},
		{"only a newline", "echo", "", result{"\n", "{dir}", 0}, ""},
		{"blank lines at end", "printf 'a\\n\\n\\n'", "", result{"a\n\n\n", "{dir}", 0}, ""},
		{"heredoc", "cat <<EOF\nhello\nEOF", "", result{"hello\n", "{dir}", 0}, ""},
		{"quoted heredoc", "cat <<'EOF'\n'single' \"double\" $HOME `id` \\back\\slash\nEOF", "", result{"'single' \"double\" $HOME `id` \\back\\slash\n", "{dir}", 0}, ""},
		{"quotes and specials verbatim", `printf '%s|' 'it'\''s' "d\"q" '$HOME' '` + "`id`" + `' 'a\\b' "$((1+2))"`, "", result{`it's|d"q|$HOME|` + "`id`" + `|a\\b|3|`, "{dir}", 0}, ""},
		{"trailing comment", "echo hi # done", "", result{"hi\n", "{dir}", 0}, ""},
		{"forged marker other nonce", "echo; echo " + wrap.Marker("feedface") + "/etc" + wrap.Marker("feedface"), "", result{"\n" + wrap.Marker("feedface") + "/etc" + wrap.Marker("feedface") + "\n", "{dir}", 0}, ""},
		{"forged marker no newline", "printf %s " + wrap.Marker("feedface") + "/etc" + wrap.Marker("feedface"), "", result{wrap.Marker("feedface") + "/etc" + wrap.Marker("feedface"), "{dir}", 0}, ""},
		{"user exit", "echo bye; exit 4", "", result{"bye\n", "", 4}, ""},
		{"exit trap output kept", "trap 'echo trapped' EXIT; echo body", "", result{"body\ntrapped\n", "{dir}", 0}, ""},
		{"tilde", "pwd -P", "~", result{"{home}\n", "{home}", 0}, ""},
		{"tilde subdir", "pwd -P", "~/a b", result{"{home}/a b\n", "{home}/a b", 0}, ""},
		{"leading dash", "pwd -P", "-dash", result{"{dir}/-dash\n", "{dir}/-dash", 0}, ""},
		{"lone dash", "pwd -P", "-", result{"{dir}/-\n", "{dir}/-", 0}, ""},
		{"quote in cwd", "pwd -P", "it's", result{"{dir}/it's\n", "{dir}/it's", 0}, ""},
		{"cwd ending in newlines", "pwd -P", "{dir}/nl\n\n", result{"{dir}/nl\n\n\n", "{dir}/nl\n\n", 0}, ""},
		{"cd into dir ending in newline", "cd 'nl\n\n'", "", result{"", "{dir}/nl\n\n", 0}, ""},
		{"cwd with invalid utf-8", "pwd -P", "{dir}/\xff\xfe", result{"{dir}/\xff\xfe\n", "{dir}/\xff\xfe", 0}, ""},
		{"pager defaults", `echo "$GIT_PAGER $PAGER"`, "", result{"cat cat\n", "{dir}", 0}, ""},
		{"pager kept", `export PAGER=less; echo "$PAGER"`, "", result{"less\n", "{dir}", 0}, ""},
		{"printf function", "printf() { echo hijacked; }; pwd() { echo hijacked; }", "", result{"", "{dir}", 0}, ""},
		{"errexit", "set -e; false; echo not here", "", result{"", "", 1}, ""},
		{"ifs", "IFS=0123456789; (exit 7)", "", result{"", "{dir}", 7}, ""},
		{"removed cwd", "mkdir gone && cd gone && rmdir ../gone", "", result{"", "", 0}, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir, home := t.TempDir(), t.TempDir()
			for _, d := range []string{"sub", "-dash", "-", "it's", "nl\n\n", "\xff\xfe"} {
				mkdir(t, filepath.Join(dir, d))
			}
			mkdir(t, filepath.Join(home, "a b"))
			expand := strings.NewReplacer("{dir}", realPath(t, dir), "{home}", realPath(t, home)).Replace
			// The cwd passed in uses the literal paths; only expectations
			// need symlinks resolved.
			cwd := strings.NewReplacer("{dir}", dir, "{home}", home).Replace(tt.cwd)
			want := result{Clean: expand(tt.want.Clean), Cwd: expand(tt.want.Cwd), RC: tt.want.RC}
			got := run(t, dir, home, tt.command, cwd)
			if tt.stderr != "" {
				// bash's own messages differ between versions: only look
				// for the gist, and compare the rest exactly.
				if !strings.Contains(got.Clean, tt.stderr) {
					t.Errorf("output %q does not contain %q", got.Clean, tt.stderr)
				}
				got.Clean = ""
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("command %q in %q (-want +got):\n%s", tt.command, cwd, diff)
			}
		})
	}
}

// TestBashCwdCarries runs two wrapped commands the way a task does: the second
// starts where Parse said the first ended.
func TestBashCwdCarries(t *testing.T) {
	dir, home := t.TempDir(), t.TempDir()
	first := run(t, dir, home, "cd /tmp", "")
	if want := realPath(t, "/tmp"); first.Cwd != want || first.RC != 0 {
		t.Fatalf("after cd /tmp: cwd %q rc %d, want %q rc 0", first.Cwd, first.RC, want)
	}
	second := run(t, dir, home, "pwd -P", first.Cwd)
	if want := first.Cwd + "\n"; second.Clean != want {
		t.Errorf("second command printed %q, want %q", second.Clean, want)
	}
	if second.Cwd != first.Cwd {
		t.Errorf("second command ended in %q, want %q", second.Cwd, first.Cwd)
	}
}

// TestBashCDPATH checks that a relative cwd is not looked up in $CDPATH, which
// would both pick another directory and print it into the output.
func TestBashCDPATH(t *testing.T) {
	dir, elsewhere := t.TempDir(), t.TempDir()
	mkdir(t, filepath.Join(dir, "x"))
	mkdir(t, filepath.Join(elsewhere, "x"))
	m := wrap.Marker(wrap.NewNonce())
	script := "CDPATH=" + elsewhere + "\n" + wrap.Command("true", "x", m)
	out, rc := runBash(t, dir, dir, script)
	clean, cwd := wrap.Parse(out, m)
	want := result{Clean: "", Cwd: realPath(t, filepath.Join(dir, "x")), RC: 0}
	if diff := cmp.Diff(want, result{clean, cwd, rc}); diff != "" {
		t.Errorf("relative cwd with CDPATH set (-want +got):\n%s", diff)
	}
}
