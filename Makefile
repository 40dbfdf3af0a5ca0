# llmpipe: `make demo` (set up, fetch the default model, compress a corpus file)
# and `make test` (set up, fetch, lint, all tests). Both work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)

.PHONY: setup model demo test test-fast bench steering-report lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test,bench,ray]'
	touch $@

model: setup
	$(PY) -m llmpipe fetch

demo: model
	$(PY) bench/demo.py

lint: setup
	$(PY) -m ruff check llmpipe tests bench bin/llmpipe

test: model lint
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider -m "not smoke"

bench: model
	$(PY) bench/bench.py run --name files
	$(PY) bench/bench.py numerics --name numerics --bytes 32768
	$(PY) bench/bench.py mixing --name mixing --bytes 65536
	$(PY) bench/bench.py roofline --name roofline
	$(PY) bench/bench.py throughput --name throughput
	$(PY) bench/bench.py backup --name backup --bytes 65536
	$(PY) bench/bench.py context --name context --bytes 32768 --slices 6
	$(PY) bench/bench.py steps --name steps
	$(PY) bench/bench.py step-rows --name step-rows
	$(PY) bench/bench.py small-files --name small-files --before 2288df1
	$(PY) bench/bench.py scale-out --name scale-out --bytes 131072 --batch 8 --ray
	$(PY) bench/bench.py run --name enwik8-1mb --bytes 1000000 enwik/enwik8_first_1000000
	$(PY) bench/bench.py run --name enwik8-1mb-8k --bytes 1000000 --chunk-size 8192 --context 0 enwik/enwik8_first_1000000
	$(PY) bench/bench.py resumable --name enwik8-4mb --budget 3600
	$(PY) bench/bench.py report --write BENCHMARKS.md

steering-report: model
	$(PY) bench/steering.py run --name steering-enwik8-1mb --file enwik/enwik8_first_1000000 --bytes 1000000 \
		--epochs 20 --text "This is Wikipedia html"
	$(PY) bench/steering.py run --name steering-enwik8-1mb-learn4 --file enwik/enwik8_first_1000000 \
		--bytes 1000000 --epochs 20 --tokens 4 --measure --text "This is Wikipedia html"
	$(PY) bench/steering.py run --name steering-news --file calgary/news --epochs 20 \
		--text "This is a Usenet news archive"
	$(PY) bench/steering.py report --write STEERING.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
