package sandboxpool

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/boxq/boxq/internal/redistest"
	"github.com/google/go-cmp/cmp"
	"github.com/redis/go-redis/v9"
)

func TestGlob(t *testing.T) {
	tests := []struct {
		glob, prefix string
		match, not   []string
	}{
		{"eval-42/*", "eval-42/", []string{"eval-42/1", "eval-42/"}, []string{"eval-42/1/x", "eval-421/1", "eval-4"}},
		{"eval-42/**", "eval-42/", []string{"eval-42/1", "eval-42/1/x"}, []string{"eval-43/1"}},
		{"**", "", []string{"a", "a/b/c", ""}, nil},
		{"*", "", []string{"a", "abc"}, []string{"a/b"}},
		{"t?", "t", []string{"t1", "tx"}, []string{"t", "t12", "t/"}},
		{"t[0-3]", "t", []string{"t0", "t3"}, []string{"t4", "t"}},
		{"t[!0-3]", "t", []string{"t4", "tx"}, []string{"t0", "t/"}},
		{"t[]x]", "t", []string{"t]", "tx"}, []string{"ty"}},
		{`a\*b*`, "a*b", []string{"a*b", "a*bc"}, []string{"axb"}},
		{"plain.id", "plain.id", []string{"plain.id"}, []string{"plainxid", "plain.id2"}},
		{"x.y*", "x.y", []string{"x.y1"}, []string{"xzy1"}},
	}
	for _, tt := range tests {
		t.Run(tt.glob, func(t *testing.T) {
			g, err := CompileGlob(tt.glob)
			if err != nil {
				t.Fatal(err)
			}
			if g.Prefix() != tt.prefix {
				t.Errorf("Prefix() = %q, want %q", g.Prefix(), tt.prefix)
			}
			for _, s := range tt.match {
				if !g.Match(s) {
					t.Errorf("%q does not match %q", tt.glob, s)
				}
			}
			for _, s := range tt.not {
				if g.Match(s) {
					t.Errorf("%q matches %q", tt.glob, s)
				}
			}
		})
	}
	for _, bad := range []string{"", "a[b", `a\`} {
		if _, err := CompileGlob(bad); err == nil {
			t.Errorf("CompileGlob(%q) took it", bad)
		}
	}
}

// TestMatchCostFollowsThePrefix: the index holds exactly the tasks with a
// record (created, terminated, reaped), and Match reads the prefix's
// entries only: the same number of commands for 10 matches in a pool of
// 210 and in one of 100,210 index entries.
func TestMatchCostFollowsThePrefix(t *testing.T) {
	ctx := context.Background()
	p, rdb := newPool(t, &instantGateway{}, Config{})
	var tasks []string
	var want []string
	for i := range 11 {
		tasks = append(tasks, fmt.Sprintf("eval-42/%02d", i))
		want = append(want, fmt.Sprintf("eval-42/%02d", i))
	}
	for i := range 200 {
		tasks = append(tasks, fmt.Sprintf("other-%03d", i))
	}
	tasks = append(tasks, "eval-42/sub/deep", "eval-421/x")
	for _, task := range tasks {
		mustRelease(t, p, mustAcquire(t, p, task, Spec{}), "")
	}
	// A terminated task leaves the index with its record.
	if err := p.Terminate(ctx, "eval-42/10"); err != nil {
		t.Fatal(err)
	}
	want = want[:10]
	cost := func(glob string) ([]string, int64) {
		t.Helper()
		g, err := CompileGlob(glob)
		if err != nil {
			t.Fatal(err)
		}
		var c redistest.CommandCounter
		counted := redis.NewClient(rdb.Options())
		defer counted.Close()
		// Connected first: the handshake is not the fan-out's cost.
		if err := counted.Ping(ctx).Err(); err != nil {
			t.Fatal(err)
		}
		counted.AddHook(&c)
		q, err := New(counted, p.gw, Config{})
		if err != nil {
			t.Fatal(err)
		}
		got, err := q.Index().Match(ctx, g)
		if err != nil {
			t.Fatal(err)
		}
		return got, c.N()
	}
	got, small := cost("eval-42/*")
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("Match(eval-42/*) (-want +got):\n%s", diff)
	}
	if got, _ := cost("eval-42/**"); len(got) != 11 || !slices.Contains(got, "eval-42/sub/deep") {
		t.Errorf("Match(eval-42/**) = %q", got)
	}
	if got, _ := cost("**"); len(got) != len(tasks)-1 {
		t.Errorf("Match(**) found %d tasks, want %d", len(got), len(tasks)-1)
	}

	// 100,000 more tasks elsewhere in the index (written straight in: what
	// matters is the index's size).
	pipe := rdb.Pipeline()
	for i := range 100_000 {
		pipe.ZAdd(ctx, p.tasksKey, redis.Z{Member: fmt.Sprintf("bulk-%06d", i)})
		if i%10_000 == 9_999 {
			if _, err := pipe.Exec(ctx); err != nil {
				t.Fatal(err)
			}
		}
	}
	got, large := cost("eval-42/*")
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("Match(eval-42/*) in the large pool (-want +got):\n%s", diff)
	}
	t.Logf("Redis commands of a fan-out over %d matches: %d in a pool of %d, %d in one of %d", len(want), small, len(tasks)-1, large, len(tasks)-1+100_000)
	if large != small || large != 1 {
		t.Errorf("Match cost %d commands with 100,000 more tasks, %d without: want one", large, small)
	}
}

// TestBackfillIndex: records made before the index existed are found once
// a worker has backfilled it, and the backfill runs once.
func TestBackfillIndex(t *testing.T) {
	ctx := context.Background()
	p, rdb := newPool(t, &instantGateway{}, Config{})
	for _, task := range []string{"old/1", "old/2", "new/1"} {
		mustRelease(t, p, mustAcquire(t, p, task, Spec{}), "")
	}
	// As an older boxq left them: records and idle index, no fan-out index.
	if err := rdb.Del(ctx, p.tasksKey).Err(); err != nil {
		t.Fatal(err)
	}
	// A stale idle-index entry without a record is not indexed.
	rdb.ZAdd(ctx, p.indexKey, redis.Z{Score: float64(time.Now().UnixMilli()), Member: "old/gone"})
	n, err := p.Index().Backfill(ctx)
	if err != nil || n != 3 {
		t.Fatalf("Backfill = %d, %v; want 3", n, err)
	}
	g, _ := CompileGlob("old/*")
	got, err := p.Index().Match(ctx, g)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"old/1", "old/2"}, got); diff != "" {
		t.Errorf("Match after backfill (-want +got):\n%s", diff)
	}
	if n, err := p.Index().Backfill(ctx); err != nil || n != 0 {
		t.Errorf("second Backfill = %d, %v; want 0 (done once)", n, err)
	}
}

// TestBackfillWhileTasksAreUsed: tasks used while the backfill runs move
// to the end of the idle index (ordered by last use); the backfill still
// indexes every record, none skipped at a page's edge.
func TestBackfillWhileTasksAreUsed(t *testing.T) {
	ctx := context.Background()
	p, rdb := newPool(t, &instantGateway{}, Config{})
	const n = 2500
	pipe := rdb.Pipeline()
	for i := range n {
		task := fmt.Sprintf("old/%04d", i)
		pipe.HSet(ctx, p.recordKey(task), "sandbox_id", "sb-"+task, "gen", 1)
		pipe.ZAdd(ctx, p.indexKey, redis.Z{Score: float64(1000 + i), Member: task})
	}
	if _, err := pipe.Exec(ctx); err != nil {
		t.Fatal(err)
	}
	idx := p.Index()
	used := false
	idx.afterPage = func() {
		if used {
			return
		}
		used = true
		// Jobs use 100 of the least recently used tasks meanwhile.
		for i := range 100 {
			rdb.ZAdd(ctx, p.indexKey, redis.Z{Score: float64(time.Now().UnixMilli()), Member: fmt.Sprintf("old/%04d", i)})
		}
	}
	added, err := idx.Backfill(ctx)
	if err != nil {
		t.Fatal(err)
	}
	g, _ := CompileGlob("old/*")
	got, err := idx.Match(ctx, g)
	if err != nil {
		t.Fatal(err)
	}
	if added != n || len(got) != n {
		t.Errorf("Backfill added %d, Match finds %d; want %d: tasks skipped", added, len(got), n)
	}
}
