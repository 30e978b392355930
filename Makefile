# switchman: build, test and lab targets. `make test` is what CI runs.
GO      ?= go
BIN     := bin/switchman
PKGS    := ./...
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
# The demo, the namespace suite and the nf_tables benchmark need root.
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_SECONDS ?= 0
# How long `make fuzz` runs each fuzz target.
FUZZTIME ?= 60s
LDFLAGS := -X main.version=$(VERSION)
# The Debian package's version: ordered by commit time, so that a later
# build upgrades an earlier one.
DEB_VERSION ?= $(shell git log -1 --format='0.1.0~git%cd.%h' --date=format:%Y%m%d%H%M%S 2>/dev/null || echo 0.1.0~dev)
DEB_DIR := bin/deb

.PHONY: all build test unit lint cli-check packaging-check deb deb-bin e2e e2e-nft e2e-ha-host demo-check vagrant-validate bench bench-scale bench-ipvs bench-convergence bench-ha bench-health bench-haproxy bench-http bench-nftables bench-nftables-lab fuzz demo clean

all: build

build:
	CGO_ENABLED=0 $(GO) build -ldflags '$(LDFLAGS)' -o $(BIN) ./cmd/switchman

## test: everything CI runs: lint, unit and integration tests (real etcd,
## HAProxy, iptables in namespaces), the CLI checks, the Debian package
## under systemd, the agent on nf_tables in namespaces, the demo for 5 seconds,
## and the QEMU IPVS lab.
test: lint unit cli-check packaging-check e2e-nft demo-check e2e vagrant-validate

unit:
	$(GO) test -count=1 -timeout 20m $(PKGS)

lint:
	@fmt=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$fmt" ]; then echo "gofmt needed:"; echo "$$fmt"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) vet -tags e2e ./e2e/...
	$(GO) vet -tags nft_e2e ./e2e/nft/

## cli-check: the operator-facing promises of the CLI on the examples.
cli-check: build
	$(BIN) validate examples/*.yaml examples/*.json
	@if $(BIN) validate examples/broken/* >/dev/null 2>&1; then echo "validate accepted broken examples"; exit 1; fi
	$(BIN) plan examples/*.yaml examples/*.json >/dev/null

## e2e-nft: the agent binary on the host's nf_tables, end to end, in network
## namespaces (root; about a minute and a half; no QEMU).
e2e-nft: build
	@command -v nft >/dev/null || { echo "e2e-nft needs nft (apt-get install nftables)"; exit 1; }
	$(GO) test -c -tags nft_e2e -o bin/e2e-nft.test ./e2e/nft/
	cd e2e/nft && $(SUDO) env SWITCHMAN_BIN=$(abspath $(BIN)) $(abspath bin/e2e-nft.test) -test.count=1 -test.timeout 15m

## deb: the Debian package (dpkg-deb), in bin/deb/: the binary, the unit,
## /etc/default/switchman, the man page, examples, alert rules, dashboard.
deb: deb-bin
	rm -f $(DEB_DIR)/*.deb
	bash packaging/deb/build.sh $(DEB_DIR)/bin/switchman $(DEB_VERSION) $(DEB_DIR)

deb-bin:
	CGO_ENABLED=0 $(GO) build -ldflags '-s -w -X main.version=$(DEB_VERSION)' -o $(DEB_DIR)/bin/switchman ./cmd/switchman

## packaging-check: the alert rules (promtool), then the package (built as
## by make deb, with light compression) installed and run under systemd in
## a lab host, upgraded under load and removed (root).
packaging-check: deb-bin
	promtool check rules packaging/prometheus/switchman-alerts.yaml
	promtool test rules packaging/prometheus/switchman-alerts.test.yaml
	rm -rf $(DEB_DIR)/test
	DEB_COMPRESS_LEVEL=0 bash packaging/deb/build.sh $(DEB_DIR)/bin/switchman $(DEB_VERSION) $(DEB_DIR)/test
	DEB_COMPRESS_LEVEL=0 bash packaging/deb/build.sh $(DEB_DIR)/bin/switchman $(DEB_VERSION)+upgrade $(DEB_DIR)/test/upgrade
	lintian --fail-on error,warning $(DEB_DIR)/test/switchman_$(DEB_VERSION)_*.deb
	CGO_ENABLED=0 $(GO) build -o $(DEB_DIR)/bin/labserver ./e2e/topology/labserver
	bash packaging/test/run.sh $(DEB_DIR)/test/switchman_$(DEB_VERSION)_*.deb \
		$(DEB_DIR)/test/upgrade/switchman_$(DEB_VERSION)+upgrade_*.deb $(DEB_DIR)/bin/labserver

## e2e: boot a Debian kernel with IPVS under QEMU and run the e2e suite in it.
e2e:
	bash e2e/lab/run.sh

vagrant-validate:
	bash e2e/lab/validate-vagrant.sh

## demo: a load balancer, three backends and a client in network namespaces of
## its own, the agent on its embedded etcd in the first, requests printed as
## they are balanced; Ctrl-C removes it all. DEMO_SECONDS=N stops after N
## seconds and fails unless the backends took turns.
demo: build
	$(SUDO) $(BIN) demo --seconds $(DEMO_SECONDS)

## demo-check: the README's first command, bounded (what make test runs).
demo-check:
	$(MAKE) demo DEMO_SECONDS=5

bench: bench-scale bench-ipvs bench-convergence bench-ha bench-health bench-haproxy bench-http bench-nftables
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

## bench-health: 2,000 and 10,000 targets at 1 s, switchman's checker vs HAProxy's (root).
bench-health:
	$(GO) run ./bench/health

## bench-haproxy: 100 pool changes under load, runtime API vs reload per change.
bench-haproxy:
	$(GO) test -run '^$$' -bench BenchmarkPoolChanges -benchtime 1x ./drivers/haproxy/

## bench-http: 1,000 route changes and 100 new mode http services under load,
## runtime API (maps, spare slots) vs render + reload per change (confd).
bench-http:
	$(GO) test -run '^$$' -bench BenchmarkHTTPChanges -benchtime 1x -timeout 30m ./drivers/haproxy/

## bench-nftables: 10,000 services x 4 backends through the agent on nf_tables
## (root, host, a namespace of its own): cold start, 100 one-weight changes to
## the kernel, a full nft -f re-render per change, agent RSS.
## bench-nftables-lab: 2,000 services, nf_tables and IPVS in one VM run.
## Figures: docs/bench/nftables.md.
bench-nftables: build
	$(GO) build -o bin/bench-nftables ./bench/nftables
	$(SUDO) bin/bench-nftables -agent $(BIN) -services 10000 -changes 100

bench-nftables-lab:
	bash e2e/lab/run.sh -run 'NFTablesVsIPVS'

fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzParse$$' -fuzztime $(FUZZTIME) ./spec/
	$(GO) test -run '^$$' -fuzz '^FuzzParseMember$$' -fuzztime $(FUZZTIME) ./spec/
	$(GO) test -run '^$$' -fuzz '^FuzzEncode$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 2s ./status/
	$(GO) test -run '^$$' -fuzz '^FuzzHAProxyConfig$$' -fuzztime $(FUZZTIME) ./render/
	$(GO) test -run '^$$' -fuzz '^FuzzHTTPMapKey$$' -fuzztime $(FUZZTIME) ./render/

clean:
	rm -rf bin .lab
