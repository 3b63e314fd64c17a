// Package e2e tests boxq's real programs together: it builds cmd/worker,
// cmd/enqueue and cmd/gateway, starts a real redis-server, the gateway and
// two workers with the commands of docker-compose.yml, runs the example
// batch through them, scrapes the workers' metrics, loads the dashboard in
// headless Chromium, and checks that every program stops cleanly on
// SIGTERM. It also checks docker-compose.yml itself.
//
// The package holds tests only; this file is its documentation.
package e2e
