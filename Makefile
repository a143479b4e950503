# Benchmarks (see docs/benchmarks.md). PYTHON may point at another interpreter.
PYTHON ?= python3
BENCH_OUT ?= bench/results
SMOKE_OUT ?= /tmp/cistern-bench-smoke

.PHONY: bench bench-smoke

# The full batch: raw disk, Cistern (pyfuse3 and passthrough front ends), JuiceFS, rclone,
# s3fs; 3 repetitions; JSON, Markdown and PNG in $(BENCH_OUT).
bench:
	$(PYTHON) -m bench --out $(BENCH_OUT) $(BENCH_ARGS)

# Tiny sizes, one repetition, raw + Cistern: checks the harness end to end in seconds.
bench-smoke:
	$(PYTHON) -m bench --smoke --out $(SMOKE_OUT) $(BENCH_ARGS)
