package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"gopkg.in/yaml.v3"
)

// The compose files, relative to repoRoot.
const (
	composeFile       = "docker-compose.yml"
	composeBwrapFile  = "docker-compose.bwrap.yml"
	composeLimitsFile = "docker-compose.limits.yml"
)

// compose is the part of the Compose file format that boxq's files use.
// Decoding is strict: a key this struct does not know fails the test, so
// that whoever adds one also decides what the tests check about it.
type compose struct {
	Services map[string]service `yaml:"services"`
	Volumes  map[string]any     `yaml:"volumes"`
	Networks map[string]any     `yaml:"networks"`
	// Extensions are the x-* keys (the YAML anchors of shared settings).
	Extensions map[string]any `yaml:",inline"`
}

type service struct {
	Image       string            `yaml:"image"`
	Build       string            `yaml:"build"`
	Init        bool              `yaml:"init"`
	Entrypoint  []string          `yaml:"entrypoint"`
	Command     []string          `yaml:"command"`
	Environment map[string]string `yaml:"environment"`
	Ports       []string          `yaml:"ports"`
	Volumes     []string          `yaml:"volumes"`
	Networks    []string          `yaml:"networks"`
	DependsOn   map[string]struct {
		Condition string `yaml:"condition"`
	} `yaml:"depends_on"`
	Healthcheck *struct {
		Test     []string `yaml:"test"`
		Interval string   `yaml:"interval"`
		Timeout  string   `yaml:"timeout"`
		Retries  int      `yaml:"retries"`
	} `yaml:"healthcheck"`
	Restart         string   `yaml:"restart"`
	StopGracePeriod string   `yaml:"stop_grace_period"`
	SecurityOpt     []string `yaml:"security_opt"`
	User            string   `yaml:"user"`
	Privileged      bool     `yaml:"privileged"`
	Cgroup          string   `yaml:"cgroup"`
}

// argv is what the service's container runs: its entrypoint, then its
// command (the image has no entrypoint of its own).
func (s service) argv() []string {
	return append(slices.Clone(s.Entrypoint), s.Command...)
}

func loadCompose(t *testing.T, name string) *compose {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, name))
	if err != nil {
		t.Fatal(err)
	}
	var c compose
	dec := yaml.NewDecoder(bytes.NewReader(b))
	dec.KnownFields(true)
	if err := dec.Decode(&c); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	for k := range c.Extensions {
		if !strings.HasPrefix(k, "x-") {
			t.Fatalf("%s: unknown top-level key %q", name, k)
		}
	}
	return &c
}

// service returns the named service, failing the test when there is none.
func (c *compose) service(t *testing.T, name string) service {
	t.Helper()
	s, ok := c.Services[name]
	if !ok {
		t.Fatalf("compose file has no service %q", name)
	}
	return s
}

var interpolation = regexp.MustCompile(`\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(:-([^}]*))?\}`)

// interpolate expands ${VAR} and ${VAR:-default} as Compose does, with
// getenv standing for the shell and the .env file.
func interpolate(s string, getenv func(string) string) string {
	return interpolation.ReplaceAllStringFunc(s, func(m string) string {
		if m == "$$" {
			return "$"
		}
		sub := interpolation.FindStringSubmatch(m)
		if v := getenv(sub[1]); v != "" {
			return v
		}
		return sub[3]
	})
}

// flagValue returns the value of -name in argv ("-name v" or "-name=v").
func flagValue(argv []string, name string) (string, bool) {
	for i, a := range argv {
		if a == "-"+name && i+1 < len(argv) {
			return argv[i+1], true
		}
		if v, ok := strings.CutPrefix(a, "-"+name+"="); ok {
			return v, true
		}
	}
	return "", false
}

// withFlag returns argv with the value of -name replaced by value: how the
// end-to-end test turns a container's addresses and paths into local ones.
// It fails the test when argv has no -name.
func withFlag(t *testing.T, argv []string, name, value string) []string {
	t.Helper()
	out := slices.Clone(argv)
	for i, a := range out {
		if a == "-"+name && i+1 < len(out) {
			out[i+1] = value
			return out
		}
		if strings.HasPrefix(a, "-"+name+"=") {
			out[i] = "-" + name + "=" + value
			return out
		}
	}
	t.Fatalf("%q has no -%s", argv, name)
	return nil
}

// healthcheck returns the service's health check command, with the port it
// probes on 127.0.0.1 replaced by addr's, and the port it probed.
func healthcheck(t *testing.T, s service, addr string) (argv []string, port string) {
	t.Helper()
	if s.Healthcheck == nil || len(s.Healthcheck.Test) < 2 || s.Healthcheck.Test[0] != "CMD" {
		t.Fatalf("health check %+v: want [CMD, ...]", s.Healthcheck)
	}
	re := regexp.MustCompile(`/dev/tcp/127\.0\.0\.1/(\d+)`)
	argv = slices.Clone(s.Healthcheck.Test[1:])
	_, localPort, _ := net.SplitHostPort(addr)
	for i, a := range argv {
		if m := re.FindStringSubmatch(a); m != nil {
			port = m[1]
			argv[i] = re.ReplaceAllString(a, "/dev/tcp/127.0.0.1/"+localPort)
		}
	}
	if port == "" {
		t.Fatalf("health check %q probes no /dev/tcp/127.0.0.1/PORT", s.Healthcheck.Test)
	}
	return argv, port
}

// portOf returns the port of a listen address like ":9090".
func portOf(t *testing.T, addr string) string {
	t.Helper()
	_, port, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatalf("address %q: %v", addr, err)
	}
	return port
}

// The services of docker-compose.yml and what they are for: the end-to-end
// test starts the same set.
const (
	svcRedis   = "redis"
	svcGateway = "gateway"
	svcEnqueue = "enqueue"
	svcAPI     = "api"
)

var svcWorkers = []string{"worker-1", "worker-2"}

// ourImage is the image the Dockerfile builds, which runs every service but
// Redis.
const ourImage = "boxq:local"

// TestComposeFile checks docker-compose.yml: the services and how they
// reach each other, what is published, persisted and shared. That the
// commands themselves work is TestStack's part: it runs them.
func TestComposeFile(t *testing.T) {
	c := loadCompose(t, composeFile)
	noenv := func(string) string { return "" }

	t.Run("services", func(t *testing.T) {
		var got []string
		for name := range c.Services {
			got = append(got, name)
		}
		want := append([]string{svcRedis, svcGateway, svcEnqueue, svcAPI}, svcWorkers...)
		slices.Sort(got)
		slices.Sort(want)
		if diff := cmp.Diff(got, want); diff != "" {
			t.Errorf("services (-got +want):\n%s", diff)
		}
		for name, s := range c.Services {
			if name == svcRedis {
				continue
			}
			if s.Image != ourImage || s.Build != "." || !s.Init {
				t.Errorf("%s: image %q, build %q, init %v; want %q built from . with an init", name, s.Image, s.Build, s.Init, ourImage)
			}
			if prog := s.argv()[0]; !slices.Contains(programs, prog) {
				t.Errorf("%s runs %q, not one of %q", name, prog, programs)
			}
		}
	})

	t.Run("redis", func(t *testing.T) {
		r := c.service(t, svcRedis)
		if !strings.HasPrefix(r.Image, "redis:") {
			t.Errorf("image %q, want redis:*", r.Image)
		}
		argv := r.Command
		if len(argv) == 0 || argv[0] != "redis-server" {
			t.Fatalf("command %q, want redis-server ...", argv)
		}
		// asynq must never lose a key: no eviction; the queue survives a
		// restart: append-only file, on a volume.
		for _, kv := range [][2]string{{"--appendonly", "yes"}, {"--maxmemory-policy", "noeviction"}} {
			if i := slices.Index(argv, kv[0]); i < 0 || i+1 >= len(argv) || argv[i+1] != kv[1] {
				t.Errorf("command %q lacks %s %s", argv, kv[0], kv[1])
			}
		}
		checkVolume(t, c, r, "/data")
		if len(r.Ports) > 0 {
			t.Errorf("redis publishes %q: it has no password, keep it on the compose network", r.Ports)
		}
		if r.Healthcheck == nil {
			t.Error("no health check: the workers wait for service_healthy")
		}
	})

	gw := c.service(t, svcGateway)
	gwArgv := gw.argv()
	gwAddr, _ := flagValue(gwArgv, "addr")
	token := gw.Environment["GATEWAY_TOKEN"]

	t.Run("gateway", func(t *testing.T) {
		if gwArgv[0] != progGateway {
			t.Fatalf("command %q, want gateway ...", gwArgv)
		}
		if host, _, err := net.SplitHostPort(gwAddr); err != nil || (host != "" && host != "0.0.0.0") {
			t.Errorf("-addr %q: want :PORT, reachable by the workers on the compose network", gwAddr)
		}
		if iso, _ := flagValue(gwArgv, "isolation"); iso != "auto" {
			t.Errorf("-isolation %q, want auto: bwrap where the container allows it (the overlay), else none", iso)
		}
		stateDir, ok := flagValue(gwArgv, "state-dir")
		if !ok {
			t.Fatal("no -state-dir: persistent tasks' snapshots would be lost with the container")
		}
		checkVolume(t, c, gw, stateDir)
		// The token comes from the shell or .env, with a default.
		if !strings.HasPrefix(token, "${GATEWAY_TOKEN:-") || interpolate(token, noenv) == "" {
			t.Errorf("GATEWAY_TOKEN %q, want ${GATEWAY_TOKEN:-default}", token)
		}
		if got := interpolate(token, func(string) string { return "s3cret" }); got != "s3cret" {
			t.Errorf("GATEWAY_TOKEN with the variable set = %q, want it", got)
		}
		if len(gw.Ports) > 0 {
			t.Errorf("gateway publishes %q: only the workers need it", gw.Ports)
		}
		// Commands run in the gateway's container when bubblewrap cannot
		// isolate them: keep Redis out of their reach.
		if slices.Contains(gw.Networks, "queue") || len(gw.Networks) == 0 {
			t.Errorf("gateway networks %q: want its own, without Redis", gw.Networks)
		}
		if _, port := healthcheck(t, gw, "127.0.0.1:1"); port != portOf(t, gwAddr) {
			t.Errorf("health check probes port %s, -addr is %s", port, gwAddr)
		}
	})

	redisURL := "redis://" + svcRedis + ":6379/0"
	gatewayURL := "http://" + svcGateway + ":" + portOf(t, gwAddr)

	t.Run("workers", func(t *testing.T) {
		for i, name := range svcWorkers {
			w := c.service(t, name)
			argv := w.argv()
			if argv[0] != progWorker {
				t.Fatalf("%s: command %q, want worker ...", name, argv)
			}
			httpAddr, ok := flagValue(argv, "http")
			if !ok {
				t.Fatalf("%s: no -http: no metrics, health or dashboard", name)
			}
			// Published on the host's loopback: the dashboard has no login.
			want := fmt.Sprintf("127.0.0.1:%d:%s", 9090+i, portOf(t, httpAddr))
			if diff := cmp.Diff(w.Ports, []string{want}); diff != "" {
				t.Errorf("%s ports (-got +want):\n%s", name, diff)
			}
			wantEnv := map[string]string{"REDIS_URL": redisURL, "GATEWAY_URL": gatewayURL, "GATEWAY_TOKEN": token,
				"BOXQ_HTTP_TOKEN": "${BOXQ_HTTP_TOKEN:-}"}
			if diff := cmp.Diff(w.Environment, wantEnv); diff != "" {
				t.Errorf("%s environment (-got +want):\n%s", name, diff)
			}
			for _, dep := range []string{svcRedis, svcGateway} {
				if w.DependsOn[dep].Condition != "service_healthy" {
					t.Errorf("%s: depends_on %s: %+v, want service_healthy", name, dep, w.DependsOn[dep])
				}
			}
			if !slices.Contains(w.Networks, "queue") || !slices.Contains(w.Networks, gw.Networks[0]) {
				t.Errorf("%s networks %q: want Redis's and the gateway's", name, w.Networks)
			}
			if _, port := healthcheck(t, w, "127.0.0.1:1"); port != portOf(t, httpAddr) {
				t.Errorf("%s: health check probes port %s, -http is %s", name, port, httpAddr)
			}
			// Longer than the worker's -shutdown-timeout (25s by default),
			// so that SIGKILL does not cut the hand-over short.
			grace, err := time.ParseDuration(w.StopGracePeriod)
			if err != nil || grace <= 25*time.Second {
				t.Errorf("%s: stop_grace_period %q, want more than 25s", name, w.StopGracePeriod)
			}
		}
	})

	t.Run("api", func(t *testing.T) {
		a := c.service(t, svcAPI)
		argv := a.argv()
		if argv[0] != progAPI {
			t.Fatalf("command %q, want api ...", argv)
		}
		addr, ok := flagValue(argv, "addr")
		if host, _, err := net.SplitHostPort(addr); !ok || err != nil || (host != "" && host != "0.0.0.0") {
			t.Errorf("-addr %q: want :PORT, published by Docker", addr)
		}
		// Not on loopback: the API refuses to start without a token.
		tok := a.Environment["BOXQ_API_TOKEN"]
		if !strings.HasPrefix(tok, "${BOXQ_API_TOKEN:-") || interpolate(tok, noenv) == "" {
			t.Errorf("BOXQ_API_TOKEN %q, want ${BOXQ_API_TOKEN:-default}", tok)
		}
		if a.Environment["REDIS_URL"] != redisURL {
			t.Errorf("REDIS_URL %q, want %q", a.Environment["REDIS_URL"], redisURL)
		}
		if want := "127.0.0.1:8080:" + portOf(t, addr); !slices.Equal(a.Ports, []string{want}) {
			t.Errorf("ports %q, want [%s]: loopback only", a.Ports, want)
		}
		if !slices.Contains(a.Networks, "queue") || slices.Contains(a.Networks, gw.Networks[0]) {
			t.Errorf("networks %q: want Redis's, not the gateway's", a.Networks)
		}
		if a.DependsOn[svcRedis].Condition != "service_healthy" {
			t.Errorf("depends_on redis: %+v, want service_healthy", a.DependsOn[svcRedis])
		}
		if _, port := healthcheck(t, a, "127.0.0.1:1"); port != portOf(t, addr) {
			t.Errorf("health check probes port %s, -addr is %s", port, addr)
		}
	})

	t.Run("enqueue", func(t *testing.T) {
		e := c.service(t, svcEnqueue)
		if diff := cmp.Diff(e.Entrypoint, []string{progEnqueue}); diff != "" {
			t.Errorf("entrypoint (-got +want):\n%s", diff)
		}
		batch, ok := flagValue(e.Command, "f")
		if !ok || !slices.Contains(e.Command, "-wait") {
			t.Fatalf("command %q, want -f FILE -wait", e.Command)
		}
		// The Dockerfile copies examples/ to /examples/.
		rel, ok := strings.CutPrefix(batch, "/examples/")
		if !ok {
			t.Fatalf("-f %q is not under /examples/", batch)
		}
		if _, err := os.Stat(filepath.Join(repoRoot, "examples", rel)); err != nil {
			t.Errorf("-f %s: %v", batch, err)
		}
		if diff := cmp.Diff(e.Environment, map[string]string{"REDIS_URL": redisURL}); diff != "" {
			t.Errorf("environment (-got +want):\n%s", diff)
		}
		for _, w := range svcWorkers {
			if e.DependsOn[w].Condition != "service_healthy" {
				t.Errorf("depends_on %s: %+v, want service_healthy", w, e.DependsOn[w])
			}
		}
		if e.Restart != "no" {
			t.Errorf("restart %q, want \"no\": it is a one-shot batch", e.Restart)
		}
	})

	t.Run("redis URL", func(t *testing.T) {
		// The URL the workers use names the redis service on Redis's
		// default port (its command sets no other).
		u, err := url.Parse(redisURL)
		if err != nil || u.Hostname() != svcRedis || u.Port() != "6379" {
			t.Errorf("REDIS_URL %q", redisURL)
		}
		if slices.Contains(c.service(t, svcRedis).Command, "--port") {
			t.Error("redis-server gets --port: the workers' REDIS_URL assumes 6379")
		}
	})

	t.Run("Dockerfile", func(t *testing.T) {
		b, err := os.ReadFile(filepath.Join(repoRoot, "Dockerfile"))
		if err != nil {
			t.Fatal(err)
		}
		df := string(b)
		for _, p := range programs {
			if !regexp.MustCompile(`(?m)^RUN CGO_ENABLED=0 go build .* \./cmd/` + p + `\b`).MatchString(df) {
				t.Errorf("Dockerfile does not build ./cmd/%s with CGO_ENABLED=0", p)
			}
		}
		for _, want := range []string{"FROM debian:bookworm-slim", "bash", "bubblewrap", "ca-certificates",
			"COPY examples/ /examples/", "USER boxq"} {
			if !strings.Contains(df, want) {
				t.Errorf("Dockerfile lacks %q", want)
			}
		}
		if sd, _ := flagValue(gwArgv, "state-dir"); !regexp.MustCompile(`install -d -o boxq -g boxq ` + regexp.QuoteMeta(sd) + `(\s|$)`).MatchString(df) {
			t.Errorf("Dockerfile does not create the gateway's -state-dir %s for the non-root user", sd)
		}
	})

	t.Run("bwrap overlay", func(t *testing.T) {
		o := loadCompose(t, composeBwrapFile)
		if len(o.Services) != 1 {
			t.Errorf("overlay changes %d services, want only the gateway", len(o.Services))
		}
		og := o.service(t, svcGateway)
		// The same command, but refusing to run without isolation.
		want := withFlag(t, gwArgv, "isolation", "bwrap")
		if diff := cmp.Diff(og.argv(), want); diff != "" {
			t.Errorf("overlay gateway command (-got +want):\n%s", diff)
		}
		wantOpts := []string{"seccomp=unconfined", "apparmor=unconfined", "systempaths=unconfined"}
		if diff := cmp.Diff(og.SecurityOpt, wantOpts); diff != "" {
			t.Errorf("overlay security_opt (-got +want):\n%s", diff)
		}
	})

	t.Run("limits overlay", func(t *testing.T) {
		o := loadCompose(t, composeLimitsFile)
		if len(o.Services) != 1 {
			t.Errorf("overlay changes %d services, want only the gateway", len(o.Services))
		}
		og := o.service(t, svcGateway)
		// The same command, isolated, with images and a pids cap.
		want := append(withFlag(t, gwArgv, "isolation", "bwrap"), "-images", "/images", "-max-pids", "1024")
		if diff := cmp.Diff(og.argv(), want); diff != "" {
			t.Errorf("overlay gateway command (-got +want):\n%s", diff)
		}
		if og.User != "0:0" || !og.Privileged || og.Cgroup != "private" || og.Init {
			t.Errorf("overlay gateway: user %q privileged %v cgroup %q init %v; want root, privileged, a private cgroup namespace, no init",
				og.User, og.Privileged, og.Cgroup, og.Init)
		}
		// The state volume stays; the images come read-only from ./images.
		checkVolume(t, c, og, "/var/lib/boxq/gateway")
		if !slices.Contains(og.Volumes, "./images:/images:ro") {
			t.Errorf("overlay gateway volumes %q lack ./images:/images:ro", og.Volumes)
		}
	})

	t.Run("docker-compose config", func(t *testing.T) {
		// Compose's own validation, where a compose is installed; it needs
		// no engine. Not required: the checks above are the contract.
		bin, err := exec.LookPath("docker-compose")
		if err != nil {
			t.Skip("docker-compose not installed (apt-get install -y --no-install-recommends docker-compose to run this check)")
		}
		for _, files := range [][]string{{composeFile}, {composeFile, composeBwrapFile}, {composeFile, composeLimitsFile}} {
			args := []string{"--project-directory", repoRoot}
			for _, f := range files {
				args = append(args, "-f", filepath.Join(repoRoot, f))
			}
			args = append(args, "config", "-q")
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
			cancel()
			if err != nil {
				t.Errorf("docker-compose %s: %v\n%s", strings.Join(args, " "), err, out)
			}
		}
	})
}

// checkVolume checks that s mounts a named volume on dir and that the file
// declares it.
func checkVolume(t *testing.T, c *compose, s service, dir string) {
	t.Helper()
	for _, v := range s.Volumes {
		name, target, _ := strings.Cut(v, ":")
		if target == dir {
			if _, ok := c.Volumes[name]; !ok {
				t.Errorf("volume %q is not declared under volumes:", name)
			}
			return
		}
	}
	t.Errorf("no volume on %s (volumes %q)", dir, s.Volumes)
}
