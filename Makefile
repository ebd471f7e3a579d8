# The two commands a newcomer needs: `make serve` and `make test`. Setup happens inside them.
CONFIG ?= deploy/default.yaml
HOST ?= 0.0.0.0
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: serve test setup checkpoint bench-wheels

.venv/.bootstrapped: pyproject.toml uv.lock scripts/bootstrap.sh
	scripts/bootstrap.sh

setup: .venv/.bootstrapped

serve: setup
	.venv/bin/chatterbox-serve serve --config $(CONFIG) --host $(HOST) --port $(PORT)

test: setup
	scripts/test-deps.sh
	.venv/bin/python -m pytest tests $(PYTEST_ARGS)

checkpoint: setup
	.venv/bin/chatterbox-serve make-checkpoint checkpoints/tiny --preset tiny

# Wheels for the offline GPU machine (see bench/README.md).
bench-wheels:
	bash ../shared/tools/device-wheels.sh .whl || true
	python3 -m pip download -q --no-deps -d .whl pydantic-settings==2.16.3   # not in the shared bundle
