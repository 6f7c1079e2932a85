.PHONY: all lint mypy test bench run

all: lint mypy test

lint:
	ruff check .
	ruff format --check .

mypy:
	mypy

test:
	python -m pytest

bench:
	python bench/run.py

run:
	relay dev
