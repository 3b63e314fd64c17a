package wrap_test

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/boxq/boxq/wrap"
)

// FuzzRoundTrip checks Parse and ParseAll on arbitrary bytes, and runs wrapped
// commands in real bash: a command built from the fuzzed data, started in a
// directory named by the fuzzed cwd, must come back with its exact output,
// its exit status and that directory, with Command and with CommandTracked;
// and with CommandTracked given a directory that does not exist, it must
// come back the same from the directory bash started in, with the reset
// reported.
func FuzzRoundTrip(f *testing.F) {
	seeds := []struct{ data, cwd string }{
		{"hello\n", "dir"},
		{"out", "/srv/it's"},
		{"no trailing newline", "d"},
		{"", ""},
		{"\n\n\n", "-"},
		{"-", "-dash"},
		{`it's "quoted" $HOME ${x} $(id) ` + "`id` \\ \\n !", "it's here"},
		{"a\r\nb\r\n", "~"},
		{"cat <<EOF\nEOF\n", "~/x y"},
		{"'\\''", "'\\''"},
		{"\n" + wrap.Marker("0") + "/etc" + wrap.Marker("0") + "\n", ".hidden"},
		{testMarker + "/etc" + testMarker, "/" + testMarker},
		{"\n__BOXQ_CWD_", "__BOXQ_CWD_x__"},
		{"\xff\xfe\x01\x7f binary \x80", "\xff\x01"},
		{strings.Repeat("x", 5000), "d\nwith newline"},
		{strings.Repeat("\n", 300), strings.Repeat("n", 255)},
	}
	for _, s := range seeds {
		f.Add(s.data, s.cwd)
	}
	f.Fuzz(func(t *testing.T, data, cwd string) {
		checkParse(t, data, cwd)
		checkBash(t, data, cwd)
	})
}

// checkParse holds for any bytes: Parse does not panic whatever the output
// and the marker, leaves output without the marker alone, and takes back
// exactly what the script's marker line added.
func checkParse(t *testing.T, data, cwd string) {
	wrap.Parse(data, cwd)
	wrap.Parse(data, data)
	wrap.ParseAll(data, cwd)
	wrap.ParseAll(data, data)
	if !strings.Contains(data, testMarker) {
		if got := wrap.ParseAll(data, testMarker); got != (wrap.Parsed{Output: data}) {
			t.Errorf("ParseAll changed marker-free output %q: got %+v", data, got)
		}
	}
	// pwd -P prints an absolute path (or nothing), at most PATH_MAX bytes.
	if cwd != "" && (cwd[0] != '/' || len(cwd) > 4096 || strings.Contains(cwd, testMarker)) {
		return
	}
	for _, reset := range []bool{false, true} {
		flag := ""
		if reset {
			flag = "reset:"
		}
		out := data + "\n" + testMarker + flag + cwd + testMarker + "\n"
		want := wrap.Parsed{Output: data, Cwd: cwd, CwdReset: reset}
		if got := wrap.ParseAll(out, testMarker); got != want {
			t.Errorf("ParseAll(%q) = %+v; want %+v", out, got, want)
		}
		if clean, got := wrap.Parse(out, testMarker); clean != data || got != cwd {
			t.Errorf("Parse(%q) = %q, %q; want %q, %q", out, clean, got, data, cwd)
		}
	}
}

// checkBash runs `printf '%s' <data>; (exit <n>)` wrapped to start in a
// directory named after cwd, and checks output, status and directory.
func checkBash(t *testing.T, data, cwd string) {
	if strings.ContainsRune(data, 0) || len(data) > 16<<10 {
		return // an exec argument cannot carry NUL; keep iterations fast
	}
	name := strings.Map(func(r rune) rune {
		if r == '/' || r == 0 {
			return -1
		}
		return r
	}, cwd)
	if name == "" || name == "." || name == ".." || len(name) > 255 {
		name = "d"
	}
	tmp := t.TempDir()
	dir := filepath.Join(tmp, name)
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// The first byte of cwd picks how the directory is named, so each of the
	// ways Command quotes a directory gets fuzzed.
	start := dir
	switch {
	case strings.HasPrefix(cwd, "~"):
		start = "~/" + name // HOME is tmp below
	case strings.HasPrefix(cwd, "-"), strings.HasPrefix(cwd, "."):
		start = name // relative to tmp, where bash starts
	}

	var sum int
	for _, c := range []byte(data) {
		sum += int(c)
	}
	rc := sum % 256
	command := "printf '%s' " + doubleQuote(data) + "\n(exit " + strconv.Itoa(rc) + ")"

	runs := []struct {
		name  string
		wrap  func(userCommand, cwd, marker string) string
		start string
		want  wrap.Parsed
	}{
		{"Command", wrap.Command, start, wrap.Parsed{Output: data, Cwd: realPath(t, dir)}},
		{"CommandTracked", wrap.CommandTracked, start, wrap.Parsed{Output: data, Cwd: realPath(t, dir)}},
		// Nothing by that name: the command runs in tmp, where bash starts.
		{"CommandTracked, missing", wrap.CommandTracked, start + "-gone", wrap.Parsed{Output: data, Cwd: realPath(t, tmp), CwdReset: true}},
	}
	for _, r := range runs {
		m := wrap.Marker(wrap.NewNonce())
		out, gotRC := runBash(t, tmp, tmp, r.wrap(command, r.start, m))
		if got := wrap.ParseAll(out, m); got != r.want || gotRC != rc {
			t.Errorf("%s: command %q in %q:\n got %+v, rc %d\nwant %+v, rc %d",
				r.name, command, r.start, got, gotRC, r.want, rc)
		}
	}
}

// doubleQuote quotes s for bash with double quotes. It is deliberately not
// the single-quote scheme Command uses, so a shared mistake cannot hide, and
// it leaves ' raw in the command, which Command must then get through eval.
func doubleQuote(s string) string {
	var b strings.Builder
	b.WriteByte('"')
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '\\', '"', '$', '`':
			b.WriteByte('\\')
			b.WriteByte(c)
		default:
			b.WriteByte(c)
		}
	}
	b.WriteByte('"')
	return b.String()
}
