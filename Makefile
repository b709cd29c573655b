.PHONY: test lint format compare bench

test:
	python -m pytest -q

lint:
	ruff check avalanche_d2l tests benchmarks

format:
	ruff format avalanche_d2l tests benchmarks

compare:
	avalanche-d2l compare --benchmark split_digits --out results

bench:
	python benchmarks/run_all.py
