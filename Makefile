# The two commands a newcomer needs: `make demo` and `make test`. Each sets itself up.
.PHONY: setup demo test lint bench chaos install example-config pi-check

setup:
	@scripts/setup.sh test

demo:
	@scripts/setup.sh base
	.venv/bin/omi-bridge demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/python -m pytest -q -p no:cacheprovider -m "not chaos" $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/mypy

# The crash-and-fault test in full (~15 min; `make test` runs its 10-kill short form): 100 SIGKILLs
# of the daemon while transcription, the API, the disk and the link fail; its figures go to
# bench/chaos.json and into their section of bench/results.md.
chaos: setup
	OMI_BRIDGE_CHAOS_KILLS=100 OMI_BRIDGE_CHAOS_FIGURES=bench/chaos.json \
		.venv/bin/python -m pytest -q -p no:cacheprovider -s -m chaos tests/test_chaos.py
	.venv/bin/python -m bench.chaos

bench:
	@scripts/setup.sh test,bench
	.venv/bin/python -m bench

# Regenerates config.example.toml from the settings dataclasses (their docs are the source).
example-config: setup
	.venv/bin/python -m bridge.config > config.example.toml

# The Pi (or any Debian) service install; run again to upgrade, `scripts/install-pi.sh --uninstall`.
install:
	@scripts/install-pi.sh

# Before a release (root, ~10 min the first time, not part of `make test`): installs the bridge into
# an arm64 Debian bookworm userland and transcribes a clip under qemu-aarch64 emulation.
pi-check:
	@scripts/pi-check.sh
