# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where pip gets torch from. Empty: pip's own configuration. From plain PyPI that is the CUDA build
# on Linux (GBs of nvidia-* wheels); the machine this project is built on has a local CPU wheel
# through a global pip find-links, and cannot reach download.pytorch.org. Elsewhere, for the CPU
# build: make install TORCH_INDEX=https://download.pytorch.org/whl/cpu (on a fresh .venv: `make clean`).
TORCH_INDEX ?=
# A .venv whose python does not run (missing, a dangling link after the system python moved) is
# rebuilt: the stamp is then out of date whatever its time.
VENV_RUNS := $(shell $(BIN)/python -c 'import sys' >/dev/null 2>&1 && echo yes)

.PHONY: install demo test bench clean rebuild-venv

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt $(if $(VENV_RUNS),,rebuild-venv)
	$(BIN)/python -c 'import sys' 2>/dev/null || $(PY) -m venv --clear $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, on its own, so that TORCH_INDEX applies to it alone.
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e .
	touch $(STAMP)

rebuild-venv:
	@echo "$(VENV): no working $(BIN)/python; recreating it"

demo: install
	$(BIN)/python -m loop.demo

test: install
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) campaign demo_campaign
