# Two commands do all set-up on a fresh Debian machine with Python 3.11:
#   make run   - serve a Docker Hub mirror on 0.0.0.0:5000, cache under ./data, no config file
#   make test  - install what the tests need (apt + pip), check the code (ruff lint and
#                format, mypy --strict) and run the whole suite (the tests start their own
#                containerd, dockerd and redis-server, each with its own root, state
#                and socket or port)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test lint install install-test-deps bench clean

$(BIN)/mirror: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(BIN)/mirror

run: install
	$(BIN)/mirror serve --listen 0.0.0.0:5000 --data-dir ./data

install-test-deps:
	@command -v docker-registry >/dev/null && command -v skopeo >/dev/null && command -v containerd >/dev/null && command -v chromium >/dev/null && command -v mkfs.ext4 >/dev/null && command -v dockerd >/dev/null && { command -v debootstrap >/dev/null || test -x /usr/sbin/debootstrap; } && command -v openssl >/dev/null && command -v ssh-keygen >/dev/null && command -v redis-server >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq docker-registry skopeo containerd docker.io chromium e2fsprogs debootstrap debian-archive-keyring openssl openssh-client redis-server; }

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint install-test-deps
	$(BIN)/python -m pytest

bench: install
	PYTHON=$(BIN)/python bash bench/run.sh

clean:
	rm -rf $(VENV) data .pytest_cache
