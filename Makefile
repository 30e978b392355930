# switchman: build, test and lab targets. `make test` is what CI runs.
GO      ?= go
BIN     := bin/switchman
PKGS    := ./...
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X main.version=$(VERSION)

.PHONY: all build test unit lint cli-check e2e vagrant-validate bench bench-scale bench-ipvs bench-convergence bench-ha bench-health bench-haproxy e2e-ha-host fuzz demo clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/switchman

## test: everything CI runs: lint, unit and integration tests (real etcd,
## HAProxy, iptables in namespaces), the CLI checks, and the QEMU IPVS lab.
test: lint unit cli-check e2e vagrant-validate

unit:
	$(GO) test -count=1 -timeout 20m $(PKGS)

lint:
	@fmt=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$fmt" ]; then echo "gofmt needed:"; echo "$$fmt"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) vet -tags e2e ./e2e/...

## cli-check: the operator-facing promises of the CLI on the examples.
cli-check: build
	$(BIN) validate examples/*.yaml examples/*.json
	@if $(BIN) validate examples/broken/* >/dev/null 2>&1; then echo "validate accepted broken examples"; exit 1; fi
	$(BIN) plan examples/*.yaml examples/*.json >/dev/null

## e2e: boot a Debian kernel with IPVS under QEMU and run the e2e suite in it.
e2e:
	bash e2e/lab/run.sh

vagrant-validate:
	bash e2e/lab/validate-vagrant.sh

## demo: the agent on its embedded etcd (etcdctl works against 127.0.0.1:2379).
demo: build
	mkdir -p /tmp/switchman-demo
	$(BIN) agent --data-dir /tmp/switchman-demo --node demo

bench: bench-scale bench-ipvs bench-convergence bench-ha bench-health bench-haproxy
	@echo "figures: docs/BENCHMARKS.md"

## bench-scale: 10,000 definitions in one burst; agent RSS with 40,000 backends.
bench-scale: build
	$(GO) run ./bench/scale -agent $(BIN) -services 10000 -backends 4

## bench-ipvs: 2,000 services x 4 backends cold, the driver vs ipvsadm -R, in the lab.
bench-ipvs:
	bash e2e/lab/run.sh -run 'IPVSColdStart'

## bench-convergence: the agent with 2,000 services in the lab: cold start,
## per-change convergence vs a full ipvsadm -C/-R resync, restart writes.
bench-convergence:
	bash e2e/lab/run.sh -run 'Convergence'

## bench-ha: two HA agents: 20 unplanned failovers (SIGKILL + links down)
## and 20 planned ones (SIGTERM), time to the first answer through the VIP
## and dual ownership seen by a sampler; in the QEMU lab (IPVS, emulated,
## --ha-round 400ms) and on this host's kernel (HAProxy, default timing;
## root).
bench-ha:
	bash e2e/lab/run.sh -run 'HAFigures'
	bash e2e/lab/host-ha.sh -run 'HAFigures'

## e2e-ha-host: the HA scenarios on this host's kernel with the default
## timing (private namespaces, HAProxy as the data plane; root, haproxy).
e2e-ha-host:
	bash e2e/lab/host-ha.sh -run 'TestHA$$'

## bench-health: 10,000 targets at 1 s, switchman's checker vs HAProxy's (root).
bench-health:
	$(GO) run ./bench/health

## bench-haproxy: 100 pool changes under load, runtime API vs reload per change.
bench-haproxy:
	$(GO) test -run '^$$' -bench BenchmarkPoolChanges -benchtime 1x ./drivers/haproxy/

fuzz:
	$(GO) test -run '^$$' -fuzz FuzzParse -fuzztime 60s ./spec/

clean:
	rm -rf bin .lab
