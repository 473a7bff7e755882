# g3n: Gemma 3n inference in C.
#
#   make              build ./g3n (CPU backend only)
#   make test         build and run every test: release build, then ASan + UBSan build
#   make debug        build ./g3n-debug with ASan + UBSan
#   make help         this list
#
# Variables: CC (gcc), OPT (-O2), THREADS=0 to build without OpenMP.

CC      ?= gcc
OPT     ?= -O2
THREADS ?= 1

CFLAGS_BASE = -std=c11 -Wall -Wextra -Wno-unused-parameter -Wshadow -Wvla -g -ffp-contract=off \
              -D_FILE_OFFSET_BITS=64 -Isrc -Isrc/core
LIBS        = -lcjson -lm -lpthread
ifeq ($(THREADS),1)
  CFLAGS_BASE += -fopenmp
  LIBS        += -fopenmp
endif

SAN = -fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined

# Library sources: everything under src/ except the programs (src/cli/).
LIB_SRC = $(sort $(wildcard src/core/*.c src/model/*.c src/backend/cpu/*.c \
                            src/tokenizer/*.c src/sampler/*.c))
CLI_SRC = $(sort $(wildcard src/cli/*.c))
TESTS   = $(sort $(basename $(notdir $(wildcard tests/test_*.c))))
HDRS    = $(wildcard src/*.h src/*/*.h src/backend/*/*.h tests/*.h)

REL = build/release
DBG = build/debug

.PHONY: all debug test test-release test-debug help clean fixtures-check
all: g3n

help:
	@echo "make              build ./g3n (CPU backend; OpenMP threads, AVX2/AVX-512 chosen at run time)"
	@echo "make test         run all tests twice: optimized build, then ASan + UBSan build"
	@echo "make test-release only the optimized build's tests"
	@echo "make test-debug   only the ASan + UBSan build's tests"
	@echo "make debug        build ./g3n-debug with ASan + UBSan"
	@echo "make clean        remove build outputs"

# ---- objects ---------------------------------------------------------------------
$(REL)/%.o: %.c $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) $(OPT) -c $< -o $@

$(DBG)/%.o: %.c $(HDRS)
	@mkdir -p $(dir $@)
	$(CC) $(CFLAGS_BASE) -O1 $(SAN) -c $< -o $@

$(REL)/libg3n.a: $(LIB_SRC:%.c=$(REL)/%.o)
	@rm -f $@; ar rcs $@ $^

$(DBG)/libg3n.a: $(LIB_SRC:%.c=$(DBG)/%.o)
	@rm -f $@; ar rcs $@ $^

# ---- programs --------------------------------------------------------------------
g3n: $(CLI_SRC:%.c=$(REL)/%.o) $(REL)/libg3n.a
	$(CC) $(OPT) -o $@ $^ $(LIBS)

g3n-debug: $(CLI_SRC:%.c=$(DBG)/%.o) $(DBG)/libg3n.a
	$(CC) $(SAN) -o $@ $^ $(LIBS)

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

test-release: g3n $(TESTS:%=$(REL)/tests/%)
	@G3N_BIN=./g3n TEST_DIR=$(REL)/tests sh tests/run.sh

test-debug: g3n-debug $(TESTS:%=$(DBG)/tests/%)
	@ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
	 G3N_BIN=./g3n-debug TEST_DIR=$(DBG)/tests G3N_SANITIZED=1 sh tests/run.sh

clean:
	rm -rf build g3n g3n-debug
