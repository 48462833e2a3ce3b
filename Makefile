# Two entry points: `make demo` (set up, then run the main job) and `make test`
# (set up, then run the whole test suite and the CI gates). Both create .venv.

PYTHON ?= python3
VENV ?= .venv
TORCH_CONSTRAINTS ?= constraints/cpu.txt
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(notdir $(TORCH_CONSTRAINTS))

.PHONY: demo test lint typecheck complexity pytest soak bench clean

$(STAMP): pyproject.toml $(TORCH_CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(TORCH_CONSTRAINTS) -e '.[demo,test,dev,plot,tensorboard,opentelemetry]'
	touch $@

demo: $(STAMP)
	$(BIN)/tolaria demo

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

complexity: $(STAMP)
	$(BIN)/xenon --max-absolute C --max-modules C --max-average B tolaria benchmarks

# Every gate runs even when an earlier one fails; the target fails if any did.
test: $(STAMP)
	@status=0; \
	$(BIN)/python -m pytest -q || status=1; \
	$(BIN)/ruff check . || status=1; \
	$(BIN)/mypy || status=1; \
	$(BIN)/xenon --max-absolute C --max-modules C --max-average B tolaria benchmarks || status=1; \
	if [ $$status -ne 0 ]; then echo "make test: at least one gate failed"; fi; \
	exit $$status

soak: $(STAMP)
	$(BIN)/python -m pytest -q -m soak

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
