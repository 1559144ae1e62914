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

bench: install
	.venv/bin/python bench/train_overhead.py
