# disca_tools: two commands do all the set-up.
#   make demo   create .venv if missing, run the whole pipeline on a shipped simulated dataset
#   make test   create .venv if missing (and RELION 3.1 from Debian), run the test suite
#   make container-check   (needs Docker) build the image with RELION, run the demo and the tests in it
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint format relion clean-demo benchmarks container-check

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[dev]'
	@touch $(STAMP)

relion:
	@command -v relion_reconstruct >/dev/null 2>&1 || { \
	  echo "Installing RELION 3.1 from Debian (relion) for the round-trip tests"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq relion >/dev/null; }

test: $(STAMP) relion
	TF_CPP_MIN_LOG_LEVEL=2 $(PY) -m pytest -q tests

demo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash examples/demo.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check disca_tools tests benchmarks bin
	$(VENV)/bin/ruff format --check disca_tools tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format disca_tools tests benchmarks
	$(VENV)/bin/ruff check --fix disca_tools tests benchmarks

clean-demo:
	rm -rf demo_run

# The Docker image, checked: built with RELION, then the demo (into container_demo/) and the test suite
# run inside it from this checkout (mounted read-only; the tests run from a copy without .venv).
container-check:
	docker build --build-arg WITH_RELION=1 -t disca_tools .
	mkdir -p container_demo
	docker run --rm -e DEMO_DIR=/project/demo_run -v "$(CURDIR)":/src:ro -v "$(CURDIR)/container_demo":/project \
	  disca_tools bash /src/examples/demo.sh
	docker run --rm -e HOME=/tmp -v "$(CURDIR)":/src:ro disca_tools bash -c \
	  "pip install -q -c /src/constraints.txt pytest && mkdir /tmp/repo \
	   && tar -C /src --exclude=./.venv --exclude=./.git --exclude=./demo_run --exclude=./container_demo -cf - . \
	   | tar -C /tmp/repo -xf - && cd /tmp/repo && python -m pytest -q -p no:cacheprovider tests"
