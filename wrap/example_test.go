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
	// builtin unset BASH_EXECUTION_STRING
	// export GIT_PAGER="${GIT_PAGER:-cat}" PAGER="${PAGER:-cat}"
	// eval 'git log -1 --format='\''%s'\''
	// '
	// __boxq_rc=$?; { builtin set +vx; builtin trap - DEBUG ERR RETURN; } 2>/dev/null
	// if builtin cd -P . 2>/dev/null && [[ $PWD -ef . ]]; then __boxq_cwd=$PWD
	// else __boxq_cwd=$(builtin pwd -P 2>/dev/null; builtin printf .); __boxq_cwd=${__boxq_cwd%.}; __boxq_cwd=${__boxq_cwd%?}
	// fi
	// builtin printf '\n__BOXQ_CWD_5f1d2c__%s__BOXQ_CWD_5f1d2c__\n' "$__boxq_cwd"
	// builtin exit "$__boxq_rc"
}

func ExampleCommandTracked() {
	m := wrap.Marker("5f1d2c")
	fmt.Print(wrap.CommandTracked("make", "/root/src/app", m))
	// Output:
	// if builtin cd -- '/root/src/app' 2>/dev/null; then builtin readonly __boxq_cwd_reset=
	// else builtin readonly __boxq_cwd_reset=reset:
	// fi
	// builtin unset BASH_EXECUTION_STRING
	// export GIT_PAGER="${GIT_PAGER:-cat}" PAGER="${PAGER:-cat}"
	// eval 'make
	// '
	// __boxq_rc=$?; { builtin set +vx; builtin trap - DEBUG ERR RETURN; } 2>/dev/null
	// if builtin cd -P . 2>/dev/null && [[ $PWD -ef . ]]; then __boxq_cwd=$PWD
	// else __boxq_cwd=$(builtin pwd -P 2>/dev/null; builtin printf .); __boxq_cwd=${__boxq_cwd%.}; __boxq_cwd=${__boxq_cwd%?}
	// fi
	// builtin printf '\n__BOXQ_CWD_5f1d2c__%s%s__BOXQ_CWD_5f1d2c__\n' "$__boxq_cwd_reset" "$__boxq_cwd"
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

func ExampleParseAll() {
	m := wrap.Marker("5f1d2c")
	// What CommandTracked's script prints when /root/src/app was removed:
	// the command ran in the sandbox's default cwd, /root, and printed
	// "built".
	output := "built\n" + "\n" + m + "reset:/root" + m + "\n"
	p := wrap.ParseAll(output, m)
	fmt.Printf("%q\n%q\n%v\n", p.Output, p.Cwd, p.CwdReset)
	// Output:
	// "built\n"
	// "/root"
	// true
}
