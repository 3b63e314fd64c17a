package jobs

import (
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/boxq/boxq/gateway"
	"github.com/boxq/boxq/sandboxpool"
)

// TestOwnClientCopiesOnlyWhatItCan: plain and cluster clients are copied
// for asynq (wake-ups); a Sentinel failover client and a Ring are not (the
// worker polls), for the reasons ownClient gives.
func TestOwnClientCopiesOnlyWhatItCan(t *testing.T) {
	plain := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer plain.Close()
	cluster := redis.NewClusterClient(&redis.ClusterOptions{Addrs: []string{"127.0.0.1:1"}})
	defer cluster.Close()
	failover := redis.NewFailoverClient(&redis.FailoverOptions{MasterName: "m", SentinelAddrs: []string{"127.0.0.1:1"}})
	defer failover.Close()
	ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": "127.0.0.1:1"}})
	defer ring.Close()
	for _, tt := range []struct {
		name string
		c    redis.UniversalClient
		want bool
	}{
		{"plain", plain, true},
		{"cluster", cluster, true},
		{"sentinel failover", failover, false},
		{"ring", ring, false},
	} {
		own, ok := ownClient(tt.c)
		if ok != tt.want {
			t.Errorf("ownClient(%s) copied: %v, want %v", tt.name, ok, tt.want)
		}
		if own != nil {
			own.Close()
		}
	}
}

// TestWorkerPollsWithoutWakeups: a worker over a client ownClient does not
// copy (a Ring here) has no waker and has asynq poll every 5 ms when
// TaskCheckInterval is unset, every TaskCheckInterval when it is set; over
// a plain client it waits for wake-ups (wakePause). NewWorker dials
// nothing: the clients point nowhere.
func TestWorkerPollsWithoutWakeups(t *testing.T) {
	gw, err := gateway.New(gateway.Config{BaseURL: "http://127.0.0.1:1", Token: "t"})
	if err != nil {
		t.Fatal(err)
	}
	ring := redis.NewRing(&redis.RingOptions{Addrs: map[string]string{"a": "127.0.0.1:1"}})
	defer ring.Close()
	plain := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1"})
	defer plain.Close()
	for _, tt := range []struct {
		name      string
		rdb       redis.UniversalClient
		set       time.Duration
		want      time.Duration
		wantWaker bool
	}{
		{"ring, interval unset", ring, 0, pollWithoutWakeups, false},
		{"ring, interval set", ring, 300 * time.Millisecond, 300 * time.Millisecond, false},
		{"plain, interval unset", plain, 0, wakePause, true},
		{"plain, interval set", plain, 300 * time.Millisecond, wakePause, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			pool, err := sandboxpool.New(tt.rdb, gw, sandboxpool.Config{})
			if err != nil {
				t.Fatal(err)
			}
			w, err := NewWorker(WorkerConfig{Redis: tt.rdb, Gateway: gw, Pool: pool, TaskCheckInterval: tt.set})
			if err != nil {
				t.Fatal(err)
			}
			if w.asynqRedis != nil {
				defer w.asynqRedis.Close()
			}
			if got := w.waker != nil; got != tt.wantWaker {
				t.Errorf("waker: %v, want %v", got, tt.wantWaker)
			}
			if w.pollEvery != tt.want {
				t.Errorf("asynq's TaskCheckInterval %v, want %v", w.pollEvery, tt.want)
			}
		})
	}
}

// TestOwnClientWithMaintNotifications: a plain client with go-redis's
// maintenance notifications required (ModeEnabled) is copied without a
// panic. The copy used to share the original's push processor, on which
// its own MOVING handler cannot be registered, and go-redis panics when
// the notifications are required.
func TestOwnClientWithMaintNotifications(t *testing.T) {
	c := redis.NewClient(&redis.Options{Addr: "127.0.0.1:1", Protocol: 3,
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeEnabled}})
	defer c.Close()
	var own redis.UniversalClient
	func() {
		defer func() {
			if r := recover(); r != nil {
				t.Fatalf("ownClient panicked: %v", r)
			}
		}()
		own, _ = ownClient(c)
	}()
	if own == nil {
		t.Fatal("ownClient did not copy a plain client")
	}
	own.Close()
}
