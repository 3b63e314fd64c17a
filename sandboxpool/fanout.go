package sandboxpool

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strings"

	"github.com/redis/go-redis/v9"
)

// The fan-out index (key P tasks) is a sorted set of the task ids that
// have a record, every score 0, so that Redis orders it by the ids' bytes
// and ZRANGE BYLEX reads the ids that start with a prefix at a cost that
// follows how many do, not the pool's size. reserveScript adds a task when
// it creates its record and deleteScript removes it with the record, in
// the same atomic steps: the index holds exactly the tasks with a record.

// GlobSyntax describes the task globs Match takes, for help texts.
const GlobSyntax = `A task glob matches task ids whole:
  *       any run of characters except '/'
  **      any run of characters, '/' included
  ?       one character except '/'
  [a-z]   one character of the class; [!a-z] or [^a-z]: one not in it
  \c      the character c itself (\*, \?, \[, \\)
Everything else matches itself. The glob's literal prefix (the text before
its first wildcard) is looked up in the pool's index of task ids, so the cost
follows the tasks that start with it; a glob that starts with a wildcard
reads the whole index.`

// Glob is a compiled task glob (GlobSyntax).
type Glob struct {
	pattern string
	prefix  string
	re      *regexp.Regexp // nil: the pattern is all literal (prefix)
}

// CompileGlob parses a task glob.
func CompileGlob(pattern string) (*Glob, error) {
	if pattern == "" {
		return nil, errors.New("sandboxpool: empty task glob")
	}
	var (
		re      strings.Builder
		prefix  strings.Builder
		literal = true // still in the literal prefix
	)
	re.WriteString("^")
	lit := func(s string) {
		re.WriteString(regexp.QuoteMeta(s))
		if literal {
			prefix.WriteString(s)
		}
	}
	for i := 0; i < len(pattern); i++ {
		c := pattern[i]
		switch c {
		case '\\':
			if i+1 == len(pattern) {
				return nil, fmt.Errorf("sandboxpool: task glob %q ends with a lone \\", pattern)
			}
			i++
			lit(pattern[i : i+1])
		case '*':
			literal = false
			if i+1 < len(pattern) && pattern[i+1] == '*' {
				re.WriteString(".*")
				i++
			} else {
				re.WriteString("[^/]*")
			}
		case '?':
			literal = false
			re.WriteString("[^/]")
		case '[':
			literal = false
			end := strings.IndexByte(pattern[i+1:], ']')
			if end == 0 || (end > 0 && (pattern[i+1] == '!' || pattern[i+1] == '^') && end == 1) {
				// "[]…]" or "[!]…]": the first ] is a member.
				next := strings.IndexByte(pattern[i+1+end+1:], ']')
				if next < 0 {
					end = -1
				} else {
					end += 1 + next
				}
			}
			if end < 0 {
				return nil, fmt.Errorf("sandboxpool: task glob %q has a [ without its ]", pattern)
			}
			class := pattern[i+1 : i+1+end]
			neg := strings.HasPrefix(class, "!") || strings.HasPrefix(class, "^")
			if neg {
				class = class[1:]
			}
			re.WriteString("[")
			if neg {
				re.WriteString("^/")
			}
			for _, r := range class {
				if strings.ContainsRune(`\]^[`, r) {
					re.WriteByte('\\')
				}
				re.WriteRune(r) // '-' stays a range; other metacharacters are plain in a class
			}
			re.WriteString("]")
			i += end + 1
		default:
			lit(pattern[i : i+1])
		}
	}
	g := &Glob{pattern: pattern, prefix: prefix.String()}
	if !literal {
		re.WriteString("$")
		var err error
		if g.re, err = regexp.Compile(re.String()); err != nil {
			return nil, fmt.Errorf("sandboxpool: task glob %q: %w", pattern, err)
		}
	}
	return g, nil
}

// String returns the glob as written.
func (g *Glob) String() string { return g.pattern }

// Prefix returns the glob's literal prefix: every match starts with it.
func (g *Glob) Prefix() string { return g.prefix }

// Match reports whether taskID matches the glob.
func (g *Glob) Match(taskID string) bool {
	if g.re == nil {
		return taskID == g.prefix
	}
	return g.re.MatchString(taskID)
}

// Index reads the fan-out index. It needs only Redis: producers use it
// without a gateway.
type Index struct {
	rdb                              redis.UniversalClient
	tasksKey, indexKey, recordPrefix string
}

// NewIndex returns the fan-out index of the pool whose keys start with
// prefix ("" for DefaultPrefix).
func NewIndex(rdb redis.UniversalClient, prefix string) *Index {
	if prefix == "" {
		prefix = DefaultPrefix
	}
	return &Index{rdb: rdb, tasksKey: prefix + "tasks", indexKey: prefix + "sandboxes", recordPrefix: prefix + "sandbox:"}
}

// Index returns the pool's fan-out index.
func (p *Pool) Index() *Index { return NewIndex(p.rdb, p.cfg.Prefix) }

// matchPage is how many index entries one ZRANGE BYLEX reads.
const matchPage = 1000

// Match returns the tasks with a record whose id matches g, in byte order.
// It reads the index entries that start with g's literal prefix, a page
// of matchPage per command: one command for a prefix with fewer entries,
// whatever the pool's size.
func (p *Index) Match(ctx context.Context, g *Glob) ([]string, error) {
	if g.re == nil {
		// No wildcard: one task, if it has a record.
		_, err := p.rdb.ZScore(ctx, p.tasksKey, g.prefix).Result()
		if errors.Is(err, redis.Nil) {
			return nil, nil
		}
		if err != nil {
			return nil, fmt.Errorf("sandboxpool: match %q: %w", g, err)
		}
		return []string{g.prefix}, nil
	}
	// Task ids are UTF-8, which never holds the byte 0xff: every id that
	// starts with the prefix sorts before prefix+"\xff".
	start, stop := "-", "+"
	if g.prefix != "" {
		start, stop = "["+g.prefix, "["+g.prefix+"\xff"
	}
	var out []string
	for {
		ids, err := p.rdb.ZRangeArgs(ctx, redis.ZRangeArgs{Key: p.tasksKey, Start: start, Stop: stop, ByLex: true, Count: matchPage}).Result()
		if err != nil {
			return nil, fmt.Errorf("sandboxpool: match %q: %w", g, err)
		}
		for _, id := range ids {
			if g.re.MatchString(id) {
				out = append(out, id)
			}
		}
		if len(ids) < matchPage {
			return out, nil
		}
		start = "(" + ids[len(ids)-1]
	}
}

// backfillScript adds to the fan-out index the tasks of a page of the idle
// index that have a record.
//
// KEYS: fan-out index, then the record of each task. ARGV: the task ids.
var backfillScript = redis.NewScript(`
local n = 0
for i = 1, #ARGV do
	if redis.call('EXISTS', KEYS[i + 1]) == 1 then
		n = n + redis.call('ZADD', KEYS[1], 0, ARGV[i])
	end
end
return n
`)

// Backfill adds to the fan-out index the records created before it
// existed (by an older boxq), reading the idle index, which lists every
// record, a page at a time. Workers call it when they start; once it has
// run to the end it leaves a mark (P tasks:backfilled), and later calls
// cost one command. It returns how many tasks it added.
func (p *Index) Backfill(ctx context.Context) (int, error) {
	mark := p.tasksKey + ":backfilled"
	if n, err := p.rdb.Exists(ctx, mark).Result(); err != nil {
		return 0, fmt.Errorf("sandboxpool: backfill the task index: %w", err)
	} else if n == 1 {
		return 0, nil
	}
	added := 0
	for start := int64(0); ; start += matchPage {
		ids, err := p.rdb.ZRange(ctx, p.indexKey, start, start+matchPage-1).Result()
		if err != nil {
			return added, fmt.Errorf("sandboxpool: backfill the task index: %w", err)
		}
		if len(ids) > 0 {
			keys := make([]string, 0, len(ids)+1)
			args := make([]any, 0, len(ids))
			keys = append(keys, p.tasksKey)
			for _, id := range ids {
				keys = append(keys, p.recordPrefix+id)
				args = append(args, id)
			}
			n, err := backfillScript.Run(ctx, p.rdb, keys, args...).Int()
			if err != nil {
				return added, fmt.Errorf("sandboxpool: backfill the task index: %w", err)
			}
			added += n
		}
		if len(ids) < matchPage {
			break
		}
	}
	if err := p.rdb.Set(ctx, mark, "1", 0).Err(); err != nil {
		return added, fmt.Errorf("sandboxpool: backfill the task index: %w", err)
	}
	return added, nil
}
