# The two quick-start commands: `make up` (install and run locally) and `make test`.
.PHONY: install up test lint bench

install:
	scripts/install.sh

up: install
	.venv/bin/trainyard up

test:
	scripts/test.sh

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

# Every benchmark, full size, then one table; `make bench BENCH_ARGS=--smoke` for the tiny sizes.
bench: install
	.venv/bin/python bench/run_all.py $(BENCH_ARGS)
