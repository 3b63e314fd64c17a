package redistest

import (
	"context"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/hibiken/asynq"
	"github.com/redis/go-redis/v9"
)

// CommandCounter is a go-redis hook that counts the commands a client
// sends, each command of a pipeline one (a script call is one: what it
// runs inside Redis is CallsInRedis's).
type CommandCounter struct{ n atomic.Int64 }

// N is the count so far.
func (c *CommandCounter) N() int64 { return c.n.Load() }

func (c *CommandCounter) DialHook(next redis.DialHook) redis.DialHook { return next }

func (c *CommandCounter) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		c.n.Add(1)
		return next(ctx, cmd)
	}
}

func (c *CommandCounter) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error {
		c.n.Add(int64(len(cmds)))
		return next(ctx, cmds)
	}
}

// CallsInRedis sums the calls of INFO commandstats: every command Redis
// ran, those a script ran included (the INFO that reads them counts once,
// after it).
func CallsInRedis(tb testing.TB, rdb redis.UniversalClient) int64 {
	tb.Helper()
	info, err := rdb.Info(context.Background(), "commandstats").Result()
	if err != nil {
		tb.Fatal(err)
	}
	var n int64
	for _, line := range strings.Split(info, "\n") {
		_, rest, ok := strings.Cut(line, "calls=")
		if !ok {
			continue
		}
		calls, _, _ := strings.Cut(rest, ",")
		c, err := strconv.ParseInt(calls, 10, 64)
		if err != nil {
			tb.Fatalf("commandstats line %q: %v", line, err)
		}
		n += c
	}
	return n
}

// TaskIDs lists the ids of queue's asynq tasks, in every state, that start
// with prefix, sorted.
func TaskIDs(tb testing.TB, rdb redis.UniversalClient, queue, prefix string) []string {
	tb.Helper()
	insp := asynq.NewInspectorFromRedisClient(rdb)
	var ids []string
	for _, list := range []func(string, ...asynq.ListOption) ([]*asynq.TaskInfo, error){
		insp.ListPendingTasks, insp.ListActiveTasks, insp.ListScheduledTasks, insp.ListRetryTasks, insp.ListCompletedTasks, insp.ListArchivedTasks,
	} {
		infos, err := list(queue, asynq.PageSize(1000))
		if err != nil {
			tb.Fatal(err)
		}
		for _, info := range infos {
			if strings.HasPrefix(info.ID, prefix) {
				ids = append(ids, info.ID)
			}
		}
	}
	slices.Sort(ids)
	return slices.Compact(ids)
}
