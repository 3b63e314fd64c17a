// Package devstack runs what -dev needs in-process: an embedded Redis
// (miniredis) and an embedded reference gateway on loopback ports, so that
// boxq runs on a machine with nothing but Go.
package devstack

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/alicebob/miniredis/v2"

	"github.com/boxq/boxq/gateway/local"
)

// Stack is a running embedded Redis and gateway.
type Stack struct {
	RedisURL   string
	GatewayURL string
	Token      string
	Isolation  local.Isolation

	redis   *miniredis.Miniredis
	gateway *local.Server
	http    *http.Server
	served  chan error
}

// Start starts the stack. isolation is the gateway's (auto picks bwrap
// when it works). Close it when done.
func Start(log *slog.Logger, isolation local.Isolation) (*Stack, error) {
	mr := miniredis.NewMiniRedis()
	if err := mr.StartAddr("127.0.0.1:0"); err != nil {
		return nil, fmt.Errorf("devstack: start embedded redis: %w", err)
	}
	var b [16]byte
	_, _ = rand.Read(b[:])
	token := hex.EncodeToString(b[:])
	gw, err := local.New(local.Config{Token: token, Isolation: isolation, Logger: log.With("component", "gateway")})
	if err != nil {
		mr.Close()
		return nil, fmt.Errorf("devstack: start embedded gateway: %w", err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		mr.Close()
		_ = gw.Close(context.Background())
		return nil, fmt.Errorf("devstack: listen: %w", err)
	}
	s := &Stack{
		RedisURL:   "redis://" + mr.Addr() + "/0",
		GatewayURL: "http://" + ln.Addr().String(),
		Token:      token,
		Isolation:  gw.Isolation(),
		redis:      mr,
		gateway:    gw,
		http:       &http.Server{Handler: gw.Handler(), ReadHeaderTimeout: 10 * time.Second},
		served:     make(chan error, 1),
	}
	go func() { s.served <- s.http.Serve(ln) }()
	return s, nil
}

// Close stops the gateway (killing its execs) and the embedded Redis.
func (s *Stack) Close(ctx context.Context) error {
	err := s.http.Shutdown(ctx)
	if serr := <-s.served; !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	err = errors.Join(err, s.gateway.Close(ctx))
	s.redis.Close()
	return err
}
