.PHONY: demo test bench lint
demo:
	scripts/demo
test:
	scripts/test
lint:
	scripts/bootstrap && .venv/bin/ruff check . && .venv/bin/mypy
