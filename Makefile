# Two commands for a fresh machine with Python >= 3.10: `make demo` and `make test`.
# Each bootstraps a pinned uv into .tools/, installs the locked environment (uv.lock) into .venv/,
# and runs. Pass kd-train overrides with ARGS="...", pytest options with PYTEST_ARGS="...".
PYTHON ?= python3
UV_VERSION := 0.13.9
UV := .tools/bin/uv
export UV_PYTHON := $(PYTHON)

.PHONY: install demo test clean

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

.venv/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --locked
	touch $@

install: .venv/.synced

demo: install
	$(UV) run --locked --no-sync kd-train $(ARGS)

test: install
	$(UV) run --locked --no-sync pytest $(PYTEST_ARGS)

clean:
	rm -rf .tools .venv .pytest_cache
