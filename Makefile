# make demo: set up .venv (if missing), install, run the main job.
# make test: the same set-up, then every test.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of PyTorch; on a machine with a GPU use e.g. `make TORCH_SPEC=torch setup`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.locoprop-installed
PYTEST_ARGS ?= -n 2

.PHONY: setup test demo data clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[harness,test]'
	# BackPACK without its declared torchvision dependency (only its examples use it; it would pull a CUDA torch)
	$(PY) -m pip install -q --no-deps 'backpack-for-pytorch>=1.6'
	$(MAKE) --no-print-directory data
	touch $(STAMP)

# Fashion-MNIST from Debian's dataset-fashion-mnist, where apt is available and we are root.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
		|| echo "warning: could not install dataset-fashion-mnist"; \
	else echo "note: install Debian's dataset-fashion-mnist for Fashion-MNIST"; fi

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/locoprop compare configs/demo.yaml

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
