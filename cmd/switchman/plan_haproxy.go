package main

import (
	"context"
	"errors"
	"log/slog"

	"github.com/urfave/cli/v2"

	"github.com/switchman-lb/switchman/agent"
	"github.com/switchman-lb/switchman/render"
)

func haproxyPlan([]render.HAProxyService) ([]byte, error) {
	return nil, errors.New("haproxy rendering is not wired yet")
}

func haproxyFlags() []cli.Flag { return nil }

func newHAProxy(*cli.Context, *slog.Logger, string) (agent.Driver, func(context.Context) error, func(), error) {
	return nil, nil, nil, errors.New("the haproxy driver is not wired yet")
}
