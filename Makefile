# Two user-facing targets: `make demo` and `make test`. Everything else is plumbing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# The oldest supported transformers (pyproject's lower bound) with a same-era accelerate, tokenizers and peft, in a
# venv of its own: `make test-oldest` runs the tests that exercise transformers against it (CI runs it after
# `make test`). torch is the same CPU build: it is the oldest that installs here without a multi-GB CUDA download.
OLDEST_VENV  := .venv-oldest
OLDEST_PY    := $(OLDEST_VENV)/bin/python
OLDEST_STAMP := $(OLDEST_VENV)/.installed
OLDEST_PINS  := transformers==4.46.3 "tokenizers>=0.20,<0.21" accelerate==1.1.1 peft==0.13.2
OLDEST_TESTS := tests/test_trainer.py tests/test_capture.py tests/test_compat_matrix.py tests/test_accounting.py \
                tests/test_generation.py tests/test_generation_format.py tests/test_distributed.py tests/test_decode.py \
                tests/test_loggers.py tests/test_history.py tests/test_light_tokenizer.py

.PHONY: demo test test-oldest

demo: $(STAMP)
	$(PY) tools/demo.py

test: $(STAMP)
	$(PY) -m pytest -n 2 --dist loadfile $(PYTEST_ARGS)

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_PY) -m pytest -n 2 --dist loadfile $(OLDEST_TESTS) $(PYTEST_ARGS)

# torch is pinned first: 2.13.0 is the CPU build on local disk; an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(OLDEST_STAMP): pyproject.toml Makefile
	test -x $(OLDEST_PY) || $(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip install -q --upgrade pip
	$(OLDEST_PY) -m pip install -q torch==2.13.0
	$(OLDEST_PY) -m pip install -q -e '.[dev]' $(OLDEST_PINS)
	touch $(OLDEST_STAMP)
