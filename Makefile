# Thin wrappers around ./dev, which installs what it needs itself.
.PHONY: demo test lint bench bench-full venv
demo:
	./dev demo
test:
	./dev test $(PYTEST_ARGS)
lint:
	./dev lint
bench:
	./dev bench --small
bench-full:
	./dev bench
venv:
	./dev venv
