package sandboxpool

import (
	"context"
	"fmt"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/boxq/boxq/gateway"
)

// instantGateway answers at once, so the benchmarks measure the pool and
// Redis.
type instantGateway struct {
	creates, terminates atomic.Int64
}

func (g *instantGateway) Create(_ context.Context, key string, _ gateway.CreateRequest) (string, error) {
	g.creates.Add(1)
	return "sb-" + key, nil
}

func (g *instantGateway) Terminate(context.Context, string, bool) error {
	g.terminates.Add(1)
	return nil
}

// BenchmarkAcquireRelease measures the common path: a task that has a
// sandbox, a free lease; one round trip to acquire, one to release.
func BenchmarkAcquireRelease(b *testing.B) {
	ctx := context.Background()
	b.Run("serial", func(b *testing.B) {
		p, _ := newPool(b, &instantGateway{}, Config{})
		mustRelease(b, p, mustAcquire(b, p, "task", Spec{}), "")
		b.ReportAllocs()
		for b.Loop() {
			l, err := p.Acquire(ctx, "task", Spec{}, "")
			if err != nil {
				b.Fatal(err)
			}
			if err := p.Release(ctx, l, "/root"); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("parallel", func(b *testing.B) {
		// One task per goroutine, as many workers with many tasks.
		p, _ := newPool(b, &instantGateway{}, Config{})
		var next atomic.Int64
		b.ReportAllocs()
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			task := "task-" + strconv.FormatInt(next.Add(1), 10)
			for pb.Next() {
				l, err := p.Acquire(ctx, task, Spec{}, "")
				if err != nil {
					b.Error(err)
					return
				}
				if err := p.Release(ctx, l, "/root"); err != nil {
					b.Error(err)
					return
				}
			}
		})
	})
}

// BenchmarkReapIdle reaps the expired sandboxes of a large pool; the cost
// should follow the expired count, not the pool's size. Seeding is not
// timed.
func BenchmarkReapIdle(b *testing.B) {
	ctx := context.Background()
	for _, bc := range []struct{ total, expired int }{
		{100_000, 100},
		{100_000, 10_000},
	} {
		b.Run(fmt.Sprintf("records=%d/expired=%d", bc.total, bc.expired), func(b *testing.B) {
			gw := &instantGateway{}
			p, rdb := newPool(b, gw, Config{})
			now := time.Now()
			// Tasks [0, expired) are re-seeded expired before each
			// iteration; the rest stay fresh.
			seed(b, p, rdb, bc.expired, bc.total-bc.expired, func(int) time.Time { return now })
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				seed(b, p, rdb, 0, bc.expired, func(int) time.Time { return now.Add(-time.Hour) })
				b.StartTimer()
				n, err := p.ReapIdle(ctx, now, time.Minute)
				if err != nil {
					b.Fatal(err)
				}
				if n != bc.expired {
					b.Fatalf("reaped %d; want %d", n, bc.expired)
				}
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N*bc.expired), "ns/sandbox")
		})
	}
}
