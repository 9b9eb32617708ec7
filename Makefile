# The README's two commands are `make demo` and `make test`; `make install` is their shared step.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
PROMPT ?= a red circle on a blue background

.PHONY: install demo test test-slow lint protos clean prometheus deploy-tools compose-smoke bench-cache bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first and pinned, in the build this machine can use: the CPU build without an NVIDIA GPU (from
# pip's configured indexes when they hold one, else PyTorch's CPU index), the CUDA build with one.
# scripts/install-torch.sh says how it decides; TORCH_INDEX=URL picks another build (e.g. cu128).
$(STAMP): $(PY) pyproject.toml setup.py scripts/install-torch.sh
	TORCH_VERSION=2.13.0 bash scripts/install-torch.sh $(PIP)
	$(PIP) install -q -e ".[serve,dev]"
	touch $(STAMP)

install: $(STAMP)

protos: install
	$(PY) protos/generate.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The observability test runs Debian's Prometheus and promtool; as root with apt, install them when
# missing (elsewhere that test skips and says why).
prometheus:
	@command -v promtool >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus; }

# The deployment tests render deploy/k8s with kubectl (Debian's kubernetes-client renders it too) and
# read compose.yaml with docker-compose; installed the same way (elsewhere those tests skip and say why).
deploy-tools:
	@command -v kubectl >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends kubernetes-client; }
	@command -v docker-compose >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null || \
		{ apt-get update -qq && apt-get install -y -qq --no-install-recommends docker-compose; }

# The suite but the tests marked slow (a fresh-venv install, the GPU script in tiny mode, the toy
# trainings, CPU compilation): make test stays under 15 minutes on 2 cores (--durations names the 15
# slowest tests, what to trim when it does not); CI (.ci/run) runs make test-slow after it.
test: install lint prometheus deploy-tools
	$(PY) -m pytest -q -m "not slow" --durations=15

test-slow: install
	$(PY) -m pytest -q -m slow

# Docker + compose: build, up (denoiser scaled to 3), images through the gateway, every replica used, Prometheus targets, down.
compose-smoke:
	bash deploy/compose-smoke.sh

# The cache bench runs cache-dit beside ours: the [bench] extra comes with the command.
bench-cache: install
	$(PIP) install -q -e ".[serve,bench]"
	$(VENV)/bin/ditserve bench cache --out bench/results/cache.json
	$(VENV)/bin/ditserve bench cache --model models/shapes-wan --quality-prompts 100 --out bench/results/cache-video.json

# Every CPU bench at its defaults on the repository's models (the README's figures), then the README's
# tables regenerated from the results. 40.5 minutes on 2 cores on 2026-12-01: the image cache bench 11,
# the video one 17 (59.7 without the video one in 2026-11, when this machine ran ~3x slower). Run it
# on a quiet machine: every figure is a ratio measured side by side, but load from elsewhere still skews it.
bench: bench-cache
	$(VENV)/bin/ditserve bench transport --out bench/results/transport.json
	$(VENV)/bin/ditserve bench serving --out bench/results/serving.json
	$(VENV)/bin/ditserve bench soak --out bench/results/soak.json
	$(VENV)/bin/ditserve bench attention --out bench/results/attention-cpu.json --device cpu --tokens 1024
	$(VENV)/bin/ditserve bench sp --out bench/results/sp.json
	$(VENV)/bin/ditserve bench fidelity --out bench/results/fidelity.json
	$(VENV)/bin/ditserve bench fidelity --model models/shapes-wan --out bench/results/fidelity-video.json
	$(VENV)/bin/ditserve bench report

demo: install
	mkdir -p out
	$(VENV)/bin/ditserve demo --prompt "$(PROMPT)" -o out/demo.png

clean:
	rm -rf $(VENV) out build *.egg-info
