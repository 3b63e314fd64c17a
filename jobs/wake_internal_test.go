package jobs

import (
	"testing"

	"github.com/redis/go-redis/v9"
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
