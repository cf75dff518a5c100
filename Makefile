.PHONY: demo test bench lint
demo:
	scripts/demo
test:
	scripts/test
# The benchmarks (bench/README.md): SCALE=full (about 45 min) writes bench/results/<date>.*
SCALE ?= full
bench:
	scripts/bootstrap && .venv/bin/python -m bench --scale $(SCALE)
lint:
	scripts/bootstrap && .venv/bin/ruff check . && .venv/bin/mypy
