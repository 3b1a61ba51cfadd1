# Two commands do all the set-up: `make demo` and `make test`. Each creates .venv with a
# Python >= 3.12 it finds (scripts/find_python.sh), installs navit-clip, then runs.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv demo study test test-fast bench clean

# The demo needs the runtime only; tests also need pytest, hypothesis and TensorFlow (the
# SavedModel export round-trip), so `make test` installs the test and tf extras.
venv:
	@VENV=$(VENV) EXTRAS=$(EXTRAS) bash scripts/setup_venv.sh

# glibc's malloc would hand XLA's per-step CPU buffers back to the kernel and fault them in
# again every step (a quarter of the demo's CPU time); one arena that keeps its memory
# avoids that.
DEMO_MALLOC := MALLOC_ARENA_MAX=1 MALLOC_MMAP_THRESHOLD_=1000000000 \
	MALLOC_TRIM_THRESHOLD_=1000000000 MALLOC_TOP_PAD_=268435456

demo: venv
	$(DEMO_MALLOC) $(VENV)/bin/navit-clip demo $(ARGS)

# The NaViT claims in miniature (README, "NaViT claims at small scale"); not part of CI.
# 51 minutes on a busy 2-core CPU (27 CPU-minutes); ARGS=--quick for a few minutes.
study: venv
	$(VENV)/bin/navit-clip study --workdir runs/study $(ARGS)

# Both check the import layers first (pyproject.toml [tool.importlinter]), then run pytest.
test: EXTRAS = test,tf
test: venv
	$(PY) scripts/lint_imports.py --no-logo
	$(PY) -m pytest -q $(ARGS)

test-fast: EXTRAS = test,tf
test-fast: venv
	$(PY) scripts/lint_imports.py --no-logo
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: EXTRAS = test,tf
bench: venv
	@for b in bench/*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
