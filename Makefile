# The two commands a newcomer needs: `make demo` and `make test`. Each sets itself up.
.PHONY: setup demo test lint bench install example-config

setup:
	@scripts/setup.sh test

demo:
	@scripts/setup.sh sim
	.venv/bin/omi-bridge demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check .

bench:
	@scripts/setup.sh test,bench
	.venv/bin/python -m bench

# Regenerates config.example.toml from the settings dataclasses (their docs are the source).
example-config: setup
	.venv/bin/python -m bridge.config > config.example.toml

install:
	@scripts/install.sh
