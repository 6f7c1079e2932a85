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
	python bench/engine.py && python bench/ingest.py && python bench/ordering.py

run:
	relay dev
