package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/redis/go-redis/v9"
)

// redisServer is a redis-server process of the bench's own, on a free
// loopback port, without persistence.
type redisServer struct {
	addr   string
	dir    string
	cmd    *exec.Cmd
	exited chan struct{}
}

// startRedis starts redis-server (bin: its path or name in PATH).
func startRedis(ctx context.Context, bin string) (*redisServer, error) {
	path, err := exec.LookPath(bin)
	if err != nil {
		return nil, fmt.Errorf("redis-server not found (%w): install it (apt-get install -y redis-server) or pass -redis-server", err)
	}
	dir, err := os.MkdirTemp("", "boxq-bench-redis-")
	if err != nil {
		return nil, err
	}
	var lastErr error
	// A free port can be taken between the probe and redis binding it.
	for range 5 {
		s := &redisServer{dir: dir}
		if s.addr, err = freeAddr(); err != nil {
			os.RemoveAll(dir)
			return nil, err
		}
		if lastErr = s.start(ctx, path); lastErr == nil {
			return s, nil
		}
	}
	os.RemoveAll(dir)
	return nil, lastErr
}

func (s *redisServer) start(ctx context.Context, path string) error {
	_, port, _ := net.SplitHostPort(s.addr)
	logPath := s.dir + "/redis.log"
	s.cmd = exec.Command(path,
		"--port", port, "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no",
		"--dir", s.dir, "--logfile", logPath)
	s.cmd.Dir = s.dir
	// Its own process group: a ^C to the bench is the bench's to handle,
	// and the server goes when the bench stops it.
	s.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := s.cmd.Start(); err != nil {
		return fmt.Errorf("start redis-server: %w", err)
	}
	s.exited = make(chan struct{})
	go func() { _ = s.cmd.Wait(); close(s.exited) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if err := ping(s.addr); err == nil {
			return nil
		}
		select {
		case <-s.exited:
			b, _ := os.ReadFile(logPath)
			return fmt.Errorf("redis-server on %s exited during start: %s", s.addr, lastLines(string(b), 5))
		case <-ctx.Done():
			s.stop()
			return ctx.Err()
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			s.stop()
			return fmt.Errorf("redis-server on %s not ready after 10s", s.addr)
		}
	}
}

// url returns the URL of database db.
func (s *redisServer) url(db int) string {
	return "redis://" + s.addr + "/" + strconv.Itoa(db)
}

// client returns a client of database db, flushed.
func (s *redisServer) client(ctx context.Context, db, poolSize int) (*redis.Client, error) {
	opt, err := redis.ParseURL(s.url(db))
	if err != nil {
		return nil, err
	}
	if poolSize > 0 {
		opt.PoolSize = poolSize
	}
	c := redis.NewClient(opt)
	if err := c.FlushDB(ctx).Err(); err != nil {
		c.Close()
		return nil, fmt.Errorf("flush redis database %d: %w", db, err)
	}
	return c, nil
}

// stop ends the server and removes its directory.
func (s *redisServer) stop() {
	if s.cmd != nil && s.cmd.Process != nil {
		_ = s.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-s.exited:
		case <-time.After(5 * time.Second):
			_ = s.cmd.Process.Kill()
			<-s.exited
		}
	}
	os.RemoveAll(s.dir)
}

func ping(addr string) error {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := conn.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "+PONG\r\n" {
		return errors.New("PING answered " + strconv.Quote(line))
	}
	return nil
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// redisStats reads the counters of INFO that the idle-load measurement
// needs: commands processed and CPU seconds used.
func redisStats(ctx context.Context, rdb *redis.Client) (commands int64, cpu float64, err error) {
	info, err := rdb.Info(ctx, "stats", "cpu").Result()
	if err != nil {
		return 0, 0, err
	}
	for line := range strings.SplitSeq(info, "\n") {
		k, v, ok := strings.Cut(strings.TrimSpace(line), ":")
		if !ok {
			continue
		}
		switch k {
		case "total_commands_processed":
			commands, _ = strconv.ParseInt(v, 10, 64)
		case "used_cpu_sys", "used_cpu_user":
			f, _ := strconv.ParseFloat(v, 64)
			cpu += f
		}
	}
	return commands, cpu, nil
}
