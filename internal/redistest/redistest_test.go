package redistest_test

import (
	"context"
	"testing"
	"time"

	"github.com/boxq/boxq/internal/redistest"
	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(redistest.Wrap(m))
}

func TestNewIsolatesDatabases(t *testing.T) {
	ctx := context.Background()
	a, urlA := redistest.New(t)
	b, urlB := redistest.New(t)
	if urlA == urlB {
		t.Fatalf("two New calls share the database %s", urlA)
	}
	if err := a.Set(ctx, "k", "a", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if got, err := b.Exists(ctx, "k").Result(); err != nil || got != 0 {
		t.Fatalf("key of database A seen in database B: exists = %d, %v", got, err)
	}

	// The URL names the same database as the client.
	opt, err := redis.ParseURL(urlA)
	if err != nil {
		t.Fatal(err)
	}
	c := redis.NewClient(opt)
	defer c.Close()
	if got, err := c.Get(ctx, "k").Result(); err != nil || got != "a" {
		t.Fatalf("GET k through %s = %q, %v; want \"a\"", urlA, got, err)
	}
}

func TestNewFlushes(t *testing.T) {
	// Databases are reused once the counter wraps; a fresh one is empty
	// even if an earlier user left keys.
	ctx := context.Background()
	c, _ := redistest.New(t)
	if n, err := c.DBSize(ctx).Result(); err != nil || n != 0 {
		t.Fatalf("DBSIZE of a fresh database = %d, %v; want 0", n, err)
	}
}

func TestStartServerRestart(t *testing.T) {
	ctx := context.Background()
	s := redistest.StartServer(t, "--appendonly", "yes", "--appendfsync", "always")
	c, _ := s.New(t)
	if err := c.Set(ctx, "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	addr := s.Addr()
	if err := s.Restart(); err != nil {
		t.Fatal(err)
	}
	if s.Addr() != addr {
		t.Fatalf("Addr after Restart = %s; want %s", s.Addr(), addr)
	}
	// The client reconnects by itself; the AOF brought the key back.
	if got, err := c.Get(ctx, "k").Result(); err != nil || got != "v" {
		t.Fatalf("GET k after Restart = %q, %v; want \"v\"", got, err)
	}
	if err := s.Kill(); err != nil {
		t.Fatal(err)
	}
	down, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
	defer cancel()
	if err := c.Ping(down).Err(); err == nil {
		t.Fatal("PING after Kill succeeded")
	}
	if err := s.Restart(); err != nil {
		t.Fatal(err)
	}
	if err := c.Ping(ctx).Err(); err != nil {
		t.Fatalf("PING after Kill and Restart: %v", err)
	}
}
