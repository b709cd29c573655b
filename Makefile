.PHONY: test lint format compare bench

# what .ci/run and the README's test command run (lint, format check, tests)
test:
	ruff check . && ruff format --check . && python -m pytest -q

lint:
	ruff check .

format:
	ruff format .

compare:
	avalanche-d2l compare --benchmark split_digits --strategies naive,lwf,ewc,generative_replay,replay,der,er_ace,cumulative,genifer,d2l --seeds 0 1 2 --jobs 2 --out results/split_digits

# speed and memory figures (written to benchmarks/results/)
bench:
	python benchmarks/bench_genifer.py --threads 1
	python benchmarks/bench_dreamer.py --threads 1
	python benchmarks/bench_d2l.py --threads 1
	python benchmarks/bench_sd15.py
