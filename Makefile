# Everything runs inside .venv, created on first use. Needs python3 and make;
# when python3 cannot create a venv (Debian without python3-venv), the
# package is installed with apt-get (as root, or through sudo).

PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Stable malloc thresholds: XLA:CPU runs up to 2x slower when glibc hands
# memory back to the OS between calls.
export MALLOC_MMAP_THRESHOLD_ ?= 33554432
export MALLOC_TRIM_THRESHOLD_ ?= 1073741824

FASHION_MNIST := /usr/share/datasets/fashion-mnist
DEMO_OUT ?= demo_output

.PHONY: test venv demo fashion-mnist clean

venv: $(STAMP)

$(VPY):
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  rm -rf $(VENV); \
	  echo "python3 -m venv failed; installing python3-venv with apt-get"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv python3-pip && \
	  $(PYTHON) -m venv $(VENV); }

$(STAMP): $(VPY) setup.py
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e ".[test]"
	touch $(STAMP)

# Two workers: the suite is mostly XLA compiles, which use one core each.
PYTEST_WORKERS ?= 2
test: $(STAMP)
	$(VPY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile tests

# Trains both stages on Fashion-MNIST and writes samples.png,
# reconstructions.png and metrics.json into $(DEMO_OUT).
demo: $(STAMP) fashion-mnist
	$(VPY) -m maskgit_jax.demo --out $(DEMO_OUT)

fashion-mnist:
	@test -f $(FASHION_MNIST)/train-images-idx3-ubyte.gz || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q dataset-fashion-mnist; }

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache $(DEMO_OUT)
