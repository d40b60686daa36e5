# Two commands on a fresh machine: `make demo` and `make test`. Each installs what it needs.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.busseg-installed
NVCC   ?= $(shell command -v nvcc 2>/dev/null)
CUDA_ARCH_FLAGS := -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
NATIVE_SOURCES  := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') setup.py
export MAX_JOBS ?= 2

.PHONY: install build lint test cuda-check gpu-compile-check gpu-resources gpu-check cmake-check bench demo reproduce reproduce-semiseg-caw diagnose clean

install: $(STAMP)

# A CUDA machine already has torch: the venv then sees the system packages and keeps it.
$(STAMP): Makefile setup.py pyproject.toml build_backend/busseg_build_backend.py
	@if [ ! -x $(PY) ]; then \
	  if python3 -c 'import torch' 2>/dev/null; then python3 -m venv --system-site-packages $(VENV); \
	  else python3 -m venv $(VENV); fi; fi
	$(PY) -c 'import torch' 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q triton numpy pytest pytest-benchmark ninja pybind11 setuptools wheel pillow matplotlib tqdm \
	  scipy pyyaml hypothesis pytest-xdist ruff==0.17.6 clang-format==23.1.5
	$(PIP) install -q --no-build-isolation --no-deps -e .
	touch busseg_ops/.built $(STAMP)  # the editable install just built the extension in place

# Incremental rebuild of the extension in place (ninja keeps objects under build/).
build: $(STAMP) busseg_ops/.built
busseg_ops/.built: $(NATIVE_SOURCES)
	$(PY) setup.py -q build_ext --inplace
	touch $@

# Every CUDA source must compile for sm_80 and sm_90 with no warning, GPU or not; the tensor
# bindings (built only in CUDA builds) get a syntax and warning check against torch's headers
# (a CPU wheel lacks one generated CUDA config header: a stand-in defines its one macro).
# ptxas's resource report of each op's kernels (-Xptxas -v) is kept beside its object for
# gpu-compile-check (csrc/<op>/cuda.cu -> build/cuda-check/<op>.{o,ptxas.log}). One file per
# rule, so the files compile MAX_JOBS at a time and a re-run redoes only what changed.
CUDA_CHECK       := build/cuda-check
CUDA_OBJECTS     := $(patsubst csrc/%/cuda.cu,$(CUDA_CHECK)/%.o,$(wildcard csrc/*/cuda.cu))
CUDA_BINDINGS_OK := $(patsubst csrc/%/cuda_binding.cpp,$(CUDA_CHECK)/%.binding-ok,$(wildcard csrc/*/cuda_binding.cpp))
CUDA_HEADERS     := $(shell find csrc -name '*.h' -o -name '*.cuh')

cuda-check: $(STAMP)
	@if [ -z "$(NVCC)" ]; then echo "cuda-check: nvcc not found, skipped"; exit 0; fi; \
	for f in $(CUDA_CHECK)/*.o $(CUDA_CHECK)/*.ptxas.log; do \
	  op=$$(basename "$$f"); [ -f "csrc/$${op%%.*}/cuda.cu" ] || rm -f "$$f"; done; \
	$(MAKE) -s --no-print-directory -j$(MAX_JOBS) $(CUDA_OBJECTS) $(CUDA_BINDINGS_OK)

$(CUDA_CHECK)/%.o: csrc/%/cuda.cu $(CUDA_HEADERS) Makefile
	@mkdir -p $(@D); echo "nvcc $<"
	@$(NVCC) -std=c++17 -O3 $(CUDA_ARCH_FLAGS) -Werror all-warnings -Xcompiler -Wall,-Wextra,-Werror \
	  -Xptxas -v -Icsrc -c $< -o $@ 2> $(@:.o=.ptxas.log) || { cat $(@:.o=.ptxas.log); rm -f $@; exit 1; }

$(CUDA_CHECK)/%.binding-ok: csrc/%/cuda_binding.cpp $(CUDA_HEADERS) $(STAMP) $(CUDA_CHECK)/stub/c10/cuda/impl/cuda_cmake_macros.h
	@echo "g++ -fsyntax-only $<"
	@cuda_inc=$$(echo '#include <cuda_runtime.h>' | $(NVCC) -x cu -M - | tr ' \\' '\n\n' | grep '/cuda_runtime.h$$' | head -1 | xargs dirname); \
	torch_inc=$$($(PY) -c "from torch.utils.cpp_extension import include_paths; print(' '.join('-isystem' + p for p in include_paths()))"); \
	$(CXX) -std=c++20 -fsyntax-only -Wall -Wextra -Werror -DBUSSEG_WITH_CUDA $$torch_inc \
	  -isystem $(CUDA_CHECK)/stub -isystem $$cuda_inc -Icsrc $< && touch $@

$(CUDA_CHECK)/stub/c10/cuda/impl/cuda_cmake_macros.h:
	@mkdir -p $(@D); echo '#define C10_CUDA_BUILD_SHARED_LIBS' > $@

# Every Triton kernel compiled for sm_80 and sm_90 the way its launchers launch it (no GPU needed),
# then a table of registers, spills, local and shared memory, occupancy, 128-bit global loads and
# tensor-core instructions (PTX for Triton, SASS for CUDA) of every Triton and CUDA kernel. Fails on
# a compile error, a register spill, local memory in issue 27's memory-bound kernels, or a launch
# space that drifted from the launchers (tools/gpu_compile_check.py). Triton's cache stays in
# build/triton-gpu-check: re-runs are quick.
gpu-compile-check: $(STAMP) cuda-check
	$(PY) tools/gpu_compile_check.py

# The same, and the table rewritten into benchmarks/RESULTS.md.
gpu-resources: $(STAMP) cuda-check
	$(PY) tools/gpu_compile_check.py --write-results

# On a machine with a CUDA GPU and nvcc (tools/gpu_check.py): the extension built for this GPU
# only, the exceptions probe, our kernels timed (CUDA events, L2 flushed, the host path apart), every
# CUDA and Triton test run on it, the baselines timed; benchmarks/RESULTS_GPU.md written after each
# phase. Nothing is fetched: it uses the python that has torch (.venv's if there is one). Without a
# CUDA GPU it says so in one line and exits 0. TIME_LIMIT=SECONDS (a lent machine's lease) stops it
# then and still writes the report with what ran; ONLY=probe,bench runs those phases only.
gpu-check:
	@$(if $(wildcard $(PY)),$(PY),python3) tools/gpu_check.py $(if $(TIME_LIMIT),--time-limit $(TIME_LIMIT)) $(if $(ONLY),--only $(ONLY))

# The CMake build for C++ users, configured and built once per `make test`: that it configures,
# compiles every source and links. Unoptimised (-O0), which takes a fifth of the CPU time of -O3:
# the optimised objects are setup.py's, built and tested by `build`.
cmake-check: $(STAMP)
	cmake -S . -B build/cmake -G Ninja -DCMAKE_BUILD_TYPE=Debug -DCMAKE_CXX_FLAGS_DEBUG=-O0 \
	  -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" >/dev/null
	cmake --build build/cmake

# Python: ruff (rules and line length in pyproject.toml), uncached: its cache keys on each file's
# content, not on the tree's layout, which decides what counts as first-party; C++/CUDA: clang-format.
CXX_SOURCES = $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
lint: $(STAMP)
	$(PY) -m ruff check --no-cache .
	$(PY) -m ruff format --no-cache --check .
	$(VENV)/bin/clang-format --dry-run -Werror $(CXX_SOURCES)

# The suite in MAX_JOBS processes (pytest-xdist): most tests are single-threaded Python (the Triton
# interpreter, small tensors), so one process leaves a core idle. worksteal: the slow tests first
# (tests/conftest.py), an idle worker takes the end of the other's list, so the two finish together.
test: lint build cuda-check gpu-compile-check cmake-check
	$(PY) -m pytest tests -q -n $(MAX_JOBS) --dist worksteal

# One process per benchmark file. Each prints pytest-benchmark's table, then a Markdown table of
# medians, ratios against the baselines of the same run, and peak memory; all of them are
# collected in benchmarks/last_run.md.
# Timings: glibc keeps freed memory instead of trimming it back to the OS (the same for every
# implementation), so a round's time does not hinge on whether its outputs land on fresh pages,
# which cost ~13 ms per 48 MiB on this VM and which glibc otherwise grants by chance. mmap_max=0
# puts blocks above the largest mmap threshold (32 MiB) on the heap too: they were mapped afresh,
# and faulted in, on every call (as jemalloc or tcmalloc would not).
BENCH_MALLOC = glibc.malloc.trim_threshold=268435456:glibc.malloc.mmap_threshold=33554432:glibc.malloc.mmap_max=0

bench: build
	rm -f benchmarks/last_run.md
	for f in benchmarks/bench_*.py; do \
	  GLIBC_TUNABLES=$(BENCH_MALLOC) $(PY) -m pytest $$f -q -p no:warnings --benchmark-columns=min,median,mean,rounds || exit 1; \
	done
	@cat benchmarks/last_run.md

# Trains suponly and rabusseg on the synthetic default (a few minutes on a CPU), prints both test
# Dice, writes overlays and curve plots under runs/demo/. Nothing is downloaded.
demo: build
	$(PY) examples/arp_demo.py
	$(PY) examples/train_demo.py

# The BUSI 1/4 reproduction, not part of `make test`: suponly, rabusseg, phnet, phnet without HPC,
# benchmarks/reproduce.py. The default scale, converged (issue 30), trains three seeds each for 100
# epochs with upstream's field of view: days of CPU time in the background. Resumable: run it again
# to continue, finished runs are skipped. Writes benchmarks/REPRODUCTION.md and its curves.
# REPRO_SCALE=full is the earlier 12-epoch scale (two seeds), REPRO_SCALE=smoke checks the pipeline in
# minutes (reports under runs/reproduce/<scale>/); REPRO_ARGS passes options (default --jobs 2: two
# runs at once, one thread each; --measure for a timing estimate).
REPRO_SCALE ?= converged
REPRO_ARGS  ?= --jobs 2
reproduce: build
	$(PY) benchmarks/reproduce.py --scale $(REPRO_SCALE) $(REPRO_ARGS)

# SemiSeg-CAW's BUSI table at the paper's scale (benchmarks/reproduce_semiseg_caw.py), not part of
# `make test`: MALUNet on all masks and on the reduced set, SemiSeg-CAW on MALUNet and its ablations
# (without ClassElevateSeg, without WGM, without both), UNeXt and SemiSeg-CAW on UNeXt; three seeds
# each, every row a shipped preset. Resumable: run it again to continue, finished runs are skipped.
# Writes benchmarks/SEMISEG_CAW.md and its curves. SEMISEG_CAW_SCALE=smoke checks the pipeline in
# a minute or two (report under runs/semiseg_caw/); SEMISEG_CAW_ARGS passes options (--epochs N,
# --limit N, --seeds 0 1 2, --only ROW, --threads N).
SEMISEG_CAW_SCALE ?= full
SEMISEG_CAW_ARGS  ?=
reproduce-semiseg-caw: build
	$(PY) benchmarks/reproduce_semiseg_caw.py --scale $(SEMISEG_CAW_SCALE) $(SEMISEG_CAW_ARGS)

# Why the semi-supervised rows win or lose: validation-only ablations (without L_u, ARP, CRA, HPC,
# APA, the bank; cutmix; Eq. 15's negatives) from a shared warm-up checkpoint per seed, with every
# diagnostic logged (benchmarks/diagnose.py). Resumable. Writes benchmarks/diagnosis.md and its
# curves, which REPRODUCTION.md includes.
DIAG_ARGS ?= --jobs 2
diagnose: build
	$(PY) benchmarks/diagnose.py $(DIAG_ARGS)

clean:
	rm -rf build busseg_ops/*.so busseg_ops/.built *.egg-info
