SHELL := /bin/bash
# phaul: live migration of Linux processes with CRIU.
#
#   make demo         two daemons, a real process migrated between them
#   make test         every test: checks, unit tier, fuzzing, integration tier
#   make build        bin/phauld and bin/phaulctl
#   make criu         a working CRIU >= 4.2 as /usr/local/sbin/criu (root)
#   make bench        figures: phaul against bare CRIU, relay against direct
#   make soak         N workloads x M round trips, every hop checked (CHAOS=1: daemons killed)
#   make deb          build/phaul.deb
#   make test-system  end to end in two systemd containers (part of make test)
#
# The integration tier, the demo and `make criu` need root.

GO      ?= go
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/phaul/phaul/pkg/version.Version=$(VERSION)
# Fuzzing runs a count of inputs, not a duration: Go 1.26's fuzz
# coordinator can report its own -fuzztime deadline as a failure
# ("context deadline exceeded", no crasher; go.dev/issue/75804, fixed in
# Go 1.27). A count has no deadline to race. Each target's count is
# about 10 s of inputs here; FUZZTIME=N (or a duration) sets all four.
FUZZ_WIRE    = $(or $(FUZZTIME),100000x)
FUZZ_CRIU    = $(or $(FUZZTIME),15000x)
FUZZ_CONTROL = $(or $(FUZZTIME),100000x)
FUZZ_API     = $(or $(FUZZTIME),400000x)

# Debian packages the tests and the demo use (gcc and libc6-dev: the race
# detector needs cgo; groff-base: the man-page check; test-system:
# debootstrap and systemd-nspawn for its containers; redis-server: the
# service that keeps its client across a migration; nginx-light and wrk:
# a server migrated under load; iptables: CRIU saves
# and restores a moved namespace's firewall with iptables-save/-restore;
# runc, rsync, busybox-static: containers and their synced rootfs; podman:
# its containers are refused, with the reason).
DEB_PACKAGES := util-linux procps systemd iproute2 tcpdump passwd ca-certificates debian-archive-keyring \
	dpkg-dev debootstrap systemd-container man-db gcc libc6-dev groff-base redis-server iptables nginx-light wrk \
	runc rsync busybox-static podman

.PHONY: all build criu deps test check unit fuzz-short fuzz integration test-system deb demo bench soak clean

all: build

build:
	$(GO) build -ldflags '$(LDFLAGS)' -o bin/phauld ./daemon
	$(GO) build -ldflags '$(LDFLAGS)' -o bin/phaulctl ./ctl

# Installs the Debian packages above that are missing (root only).
deps:
	@missing=$$(for p in $(DEB_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing:" $$missing; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	fi

criu: deps
	packaging/criu/install-criu.sh

test: check unit fuzz-short integration test-system

check: deps build
	@unformatted=$$(gofmt -l $$(git ls-files '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt would change:" $$unformatted; exit 1; fi
	$(GO) vet ./...
	$(GO) mod tidy -diff
	@# The units must pass systemd's own check (ExecStart pointed at this
	@# build; the man pages are checked by groff).
	@d=$$(mktemp -d); cp packaging/systemd/* $$d/; \
	sed -i "s#ExecStart=/usr/sbin/phauld#ExecStart=$(CURDIR)/bin/phauld#" $$d/phauld.service; \
	systemd-analyze verify --man=no $$d/phauld.socket $$d/phauld.service; rc=$$?; rm -rf $$d; exit $$rc
	groff -man -ww -z packaging/man/phauld.8 packaging/man/phaulctl.1

# Tests run through test/failsum: it prints what go test -v would, then
# again, whole, the output of each test that failed.
FAILSUM = build/failsum

$(FAILSUM): test/failsum/main.go
	$(GO) build -o $@ ./test/failsum

unit: deps $(FAILSUM)
	$(GO) test -json -race ./... 2>&1 | $(FAILSUM) -q

fuzz-short:
	$(GO) test -run '^$$' -fuzz FuzzDecoder -fuzztime $(FUZZ_WIRE) ./pkg/wire
	$(GO) test -run '^$$' -fuzz FuzzPathFiles -fuzztime $(FUZZ_CRIU) ./pkg/criu
	$(GO) test -run '^$$' -fuzz FuzzControlRequest -fuzztime $(FUZZ_CONTROL) ./pkg/control
	$(GO) test -run '^$$' -fuzz FuzzClean -fuzztime $(FUZZ_API) ./pkg/api

fuzz:
	$(MAKE) fuzz-short FUZZTIME=5m

integration: criu $(FAILSUM)
	PHAUL_INTEGRATION=1 $(GO) test -json -count=1 -timeout 30m -v ./test/integration/... 2>&1 | $(FAILSUM)

# The .deb: both binaries, units, sysusers/tmpfiles, man pages, completion.
deb:
	packaging/deb/build.sh build

# End to end under a real systemd: two containers, the .deb installed,
# phauld.socket enabled, a service's process migrated between them.
test-system: criu deb $(FAILSUM)
	$(GO) build -o build/workload ./test/workload
	rootfs=$$(test/system/rootfs.sh) && \
	PHAUL_SYSTEM=1 PHAUL_SYSTEM_ROOTFS=$$rootfs PHAUL_SYSTEM_DEB=$(CURDIR)/build/phaul.deb \
	PHAUL_SYSTEM_WORKLOAD=$(CURDIR)/build/workload $(GO) test -json -count=1 -timeout 20m -v ./test/system 2>&1 | $(FAILSUM)

demo: criu build
	scripts/demo.sh

# Figures, not pass/fail: what phauld's page relay costs against CRIU
# writing to the TCP socket itself, and phaul against the bare CRIU
# pipeline on the same workloads, in alternating runs.
bench: criu build
	$(GO) test -run '^$$' -bench PageStream -benchtime 6x ./pkg/transport
	PHAUL_BENCH_MIB=1024 $(GO) test -run '^$$' -bench PageStream -benchtime 4x ./pkg/transport
	$(GO) test -run '^$$' -bench DiffAtFreeze -benchtime 10x ./pkg/precopy
	$(GO) run ./test/bench

# Not part of make test: N workloads (default 8) migrated back and forth M
# times (default 100) between two phauld, in MODE copy, lazy or both
# (default), each hop checked; CHAOS=1 SIGKILLs and restarts a daemon every
# 5-30 s meanwhile. SOAKFLAGS adds more (e.g. -json FILE -seed S -duration 2h).
soak: criu build
	$(GO) build -o build/workload ./test/workload
	$(GO) run ./test/soak -bin bin -workload build/workload -workloads $(or $(N),8) -trips $(or $(M),100) \
		-mode $(or $(MODE),both) $(if $(filter-out 0,$(CHAOS)),-chaos) $(SOAKFLAGS)

clean:
	rm -rf bin build
