package wrap_test

import (
	"fmt"

	"github.com/boxq/boxq/wrap"
)

func ExampleCommand() {
	// A real caller uses wrap.NewNonce(); a fixed one keeps the output stable.
	m := wrap.Marker("5f1d2c")
	fmt.Print(wrap.Command("git log -1 --format='%s'", "~/src/app", m))
	// Output:
	// builtin cd -- "$HOME"/'src/app' || exit 126
	// export GIT_PAGER="${GIT_PAGER:-cat}" PAGER="${PAGER:-cat}"
	// eval 'git log -1 --format='\''%s'\''
	// '
	// __boxq_rc=$?
	// if builtin cd -P . 2>/dev/null && [[ $PWD -ef . ]]; then __boxq_cwd=$PWD
	// else __boxq_cwd=$(builtin pwd -P 2>/dev/null; builtin printf .); __boxq_cwd=${__boxq_cwd%.}; __boxq_cwd=${__boxq_cwd%?}
	// fi
	// builtin printf '\n%s%s%s\n' '__BOXQ_CWD_5f1d2c__' "$__boxq_cwd" '__BOXQ_CWD_5f1d2c__'
	// builtin exit "$__boxq_rc"
}

func ExampleParse() {
	m := wrap.Marker("5f1d2c")
	// What the script above prints when the command outputs "fix: typo"
	// without a newline and ends in /root/src/app.
	output := "fix: typo" + "\n" + m + "/root/src/app" + m + "\n"
	clean, cwd := wrap.Parse(output, m)
	fmt.Printf("%q\n%q\n", clean, cwd)
	// Output:
	// "fix: typo"
	// "/root/src/app"
}
