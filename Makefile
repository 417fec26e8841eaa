# Sluice build, test and benchmark entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
GO ?= go
BIN := $(CURDIR)/bin
# Tools built from Go modules live outside the work tree, keyed by version.
CACHE ?= $(HOME)/.cache/sluice
APT_PACKAGES := clang-19 llvm-19 bpftool iproute2 iperf3 tcpdump libbpf-dev linux-libc-dev iptables util-linux procps stunnel4 haproxy

.PHONY: all deps generate check-generate build test test-unit bench bench-ztunnel demo lab lab-down clean

all: build

# deps installs what the build and the tests need; it is idempotent and quick when all
# is present.
deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
	@$(GO) mod download

generate: deps
	$(GO) generate ./bpf/

# check-generate fails when the committed bpf2go output differs from a fresh build.
check-generate: generate
	@if ! git diff --quiet -- bpf/ || [ -n "$$(git status --porcelain -- bpf/)" ]; then \
		echo "generated BPF files differ from the committed ones; run 'make generate' and commit:"; \
		git status --porcelain -- bpf/; git diff --stat -- bpf/; exit 1; \
	fi

# Static binaries, as shipped: no libc mapped into every ztunnel and agent (about 1.5 MB
# of resident memory each).
build:
	@mkdir -p $(BIN)
	CGO_ENABLED=0 $(GO) build -o $(BIN)/ ./cni/cmd/... ./ztunnel/cmd/... ./sluicectl/

test: deps
	$(GO) vet ./...
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { echo "gofmt needed:"; gofmt -l $$(git ls-files '*.go'); exit 1; }
	$(GO) test -count=1 -timeout 30m ./...

# test-unit runs only what needs no root.
test-unit:
	$(GO) test -count=1 -short ./...

bench: deps build
	$(GO) run ./test/bench/capture -out docs/bench/capture.md

# bench-ztunnel compares ztunnel with direct traffic, stunnel and HAProxy (about 4
# minutes); it builds its own binaries.
bench-ztunnel: deps
	$(GO) run ./test/bench/ztunnel -out docs/bench/ztunnel.md

demo: deps build
	$(BIN)/sluicectl lab demo
	$(BIN)/sluicectl lab mesh-demo

# lab brings up a two-node lab with node agents and leaves it running.
lab: deps build
	$(BIN)/sluicectl lab up --with-sluice --ztunnel --ambient

lab-down:
	-$(BIN)/sluicectl lab down
	-$(BIN)/sluicectl lab down --name demo
	-$(BIN)/sluicectl lab down --name meshdemo

clean:
	rm -rf $(BIN)
