package main

import (
	"errors"

	"github.com/switchman-lb/switchman/render"
)

func haproxyPlan([]render.HAProxyService) ([]byte, error) {
	return nil, errors.New("haproxy rendering is not wired yet")
}
