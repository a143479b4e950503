# Benchmarks (see docs/benchmarks.md). PYTHON may point at another interpreter.
PYTHON ?= python3
BENCH_OUT ?= bench/results
SMOKE_OUT ?= /tmp/cistern-bench-smoke

.PHONY: bench bench-full bench-smoke bench-smallfiles bench-dlio fuse-floor smoothing \
	bench-direct

# The batch: raw disk, Cistern (pyfuse3 and passthrough front ends), JuiceFS, rclone, s3fs;
# 3 repetitions; JSON, Markdown and PNG in $(BENCH_OUT). Under 20 minutes on 2 cores.
bench:
	$(PYTHON) -m bench --out $(BENCH_OUT) $(BENCH_ARGS)

# The same with fio 2 GiB, 1 GiB checkpoints and 10,000 small files (about an hour on 2 cores).
bench-full:
	$(PYTHON) -m bench --profile full --out $(BENCH_OUT)/full $(BENCH_ARGS)

# Tiny sizes, one repetition, raw + Cistern: checks the harness end to end in seconds.
bench-smoke:
	$(PYTHON) -m bench --smoke --out $(SMOKE_OUT) $(BENCH_ARGS)

# cp -r of 10,000 small files only: raw disk and both Cistern front ends, 5 interleaved rounds.
bench-smallfiles:
	$(PYTHON) -m bench --targets raw,cistern --workloads smallfiles --small-files 10000 \
		--reps 5 --out $(BENCH_OUT)/smallfiles $(BENCH_ARGS)

# MLPerf Storage v2.0's checkpointing workload (Llama 3 8B shapes, scaled to ~268 MiB per
# checkpoint, 8 ranks, 3 written and read back): raw disk vs Cistern (passthrough), 3 rounds.
bench-dlio:
	$(PYTHON) -m bench --targets raw,cistern --frontends passthrough --workloads dlio \
		--reps 3 --out $(BENCH_OUT)/dlio $(BENCH_ARGS)

# The FUSE round trip of a minimal C libfuse server vs cistern-node, and the floor it puts
# under cp -r of small files through any FUSE file system (see docs/benchmarks.md).
fuse-floor:
	$(PYTHON) -m bench.fuse_floor --out $(BENCH_OUT)/fuse-floor.json $(FLOOR_ARGS)

# Issue 20's study: fio on the FUSE front ends vs a directory followed with fanotify
# (docs/dev/direct.md); root, xfsprogs, a loop device.
bench-direct:
	$(PYTHON) -m bench.direct_study --frontends splice,pyfuse3,passthrough \
		--out $(BENCH_OUT)/direct

# Upload smoothing: a checkpoint burst with and without maxBytesPerSecond, and under 503 SlowDown
# (see docs/smoothing.md). Writes bench/results/smoothing.json and docs/smoothing.png.
smoothing:
	$(PYTHON) -m bench.smoothing $(SMOOTHING_ARGS)
