# Everything a fresh machine needs comes from these targets: `make run`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup run test check docs bench image image-offline compile clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c requirements.lock -e '.[cpu,dev,vertex]'
	touch $(STAMP)

# The protos of the KFP backend releases the compiled IR is checked against (a wheel each, hash-pinned).
PROTOS := $(VENV)/kfp-backend-protos
$(PROTOS)/.complete: tests/kfp_backend_protos.lock $(STAMP)
	rm -rf $(PROTOS) && mkdir -p $(PROTOS)
	grep -v '^#' $< | while read -r line; do \
	  echo "$$line" > $(PROTOS)/req.txt && \
	  $(PY) -m pip download -q --no-deps --require-hashes -d $(PROTOS) -r $(PROTOS)/req.txt || exit 1; \
	done
	rm $(PROTOS)/req.txt && touch $@

setup: $(STAMP) $(PROTOS)/.complete

run: $(STAMP)
	$(VENV)/bin/captioning run

# Both tiers run on every core (pytest-xdist; a file's tests stay on one worker, so its fixtures are made once,
# in the order conftest gives, the longest first;
# conftest's `shared` makes the session's mirror and trained model once for all workers).
XDIST := -n auto --dist loadfile --no-loadscope-reorder

test: setup
	$(PY) -m pytest $(XDIST)

# The fast tier, before a commit: no training run, no Docker engine.
check: setup
	$(PY) -m pytest $(XDIST) -m "not slow and not docker"

# docs/configuration.md from the configuration model (tests/test_docs.py fails when they differ).
docs: $(STAMP)
	$(PY) -m captioning.settings_reference docs/configuration.md

bench: $(STAMP)
	$(VENV)/bin/captioning bench features --images 128 --batch 32 --repeats 3 --json

compile: $(STAMP)
	$(VENV)/bin/captioning compile --output captioning_pipeline.yaml

image: $(STAMP)
	$(VENV)/bin/captioning image build

# No registry reachable: a Debian base made with debootstrap, TensorFlow for CPUs.
image-offline: $(STAMP)
	docker/local-debian-base.sh debian-local:bookworm
	$(VENV)/bin/captioning image build --base-image debian-local:bookworm --variant cpu

clean:
	rm -rf work .pytest_cache
