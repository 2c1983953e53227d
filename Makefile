# One-command tooling: every target creates .venv and installs buzon with its dev tools first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test lint typecheck pytest bench docs clean sanitize

# The bytecode is written here (as pip does for a wheel), not left to the first import:
# with PYTHONDONTWRITEBYTECODE set every `import buzon` would compile it again.
install: $(STAMP)
	$(BIN)/python -m compileall -q src/buzon

$(STAMP): pyproject.toml setup.py $(wildcard src/buzon/*.c src/buzon/*.h src/buzon/protocol/*.c src/buzon/protocol/*.h)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/buzon demo

lint: install
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

# The C parts (the shm core, the frame speedup buzon.protocol._frames, the fifo:
# envelope, CRC-32C, POSIX queues) under AddressSanitizer + UndefinedBehaviorSanitizer:
# a copy of the package in build/sanitize with instrumented extensions, and the C-backed
# tests run against it. The
# interpreter itself is not instrumented, so libasan must be preloaded; leak checking is
# off because CPython keeps its arenas until exit.
SAN_DIR := build/sanitize
SAN_FLAGS := -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g -O1
sanitize: install
	rm -rf $(SAN_DIR) && mkdir -p $(SAN_DIR) && cp -r src/buzon $(SAN_DIR)/ && find $(SAN_DIR) -name '*.so' -delete
	CFLAGS="$(SAN_FLAGS)" LDFLAGS="-fsanitize=address,undefined" $(BIN)/python setup.py -q \
		build_ext --force --build-lib $(SAN_DIR) --build-temp $(SAN_DIR)/tmp
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
		ASAN_OPTIONS=detect_leaks=0 UBSAN_OPTIONS=print_stacktrace=1 PYTHONPATH=$(SAN_DIR) \
		$(BIN)/python -m pytest -q -p no:cacheprovider tests/shm/test_core.py \
		tests/shm/test_fast_path.py tests/shm/test_rendezvous_ring.py tests/protocol/test_ring_frames.py \
		tests/protocol/test_fifo_envelope.py \
		tests/protocol/test_stream_c.py tests/protocol/test_fields_c.py tests/protocol/test_rpc_c.py \
		tests/protocol/test_wait_frame.py tests/protocol/test_dgram_c.py tests/mailbox/test_mailbox.py \
		tests/mailbox/test_mailbox_hot_path.py tests/mailbox/test_direct.py \
		tests/mailbox/test_mailbox_policies.py tests/mailbox/test_mailbox_receipt_table.py \
		tests/protocol/test_rpc_once_c.py \
		tests/protocol/test_receipt_writer.py tests/test_receipt_waiting_receiver.py \
		tests/mailbox/test_bcast_ring.py tests/mailbox/test_bcast_receipt_lost.py \
		tests/mailbox/test_mailbox_bound_io.py tests/mailbox/test_mailbox_version.py tests/mailbox/test_mailbox_error_names.py \
		tests/test_rendezvous_stream_c.py tests/test_rendezvous_withdraw.py \
		tests/test_rendezvous_deferred.py tests/test_rendezvous_ccall.py \
		tests/test_small_writer_flow.py tests/test_receipt_take_c.py \
		tests/test_recv_take.py tests/test_dgram_blocking_wait.py tests/test_drop_unclosed.py \
		tests/test_recv_take_socket.py tests/test_small_writer_unix_whole.py tests/test_small_writer_threads.py \
		tests/shm/test_ring_c_calls.py

# the peers (pyzmq, faster-fifo, iceoryx2, numpy; Pyro5, RPyC, grpcio, msgpack for the RPC
# rows) are the optional group "bench", not dev; the Neovim row needs nvim (.ci/run installs it)
bench: install
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	$(BIN)/buzon bench --json bench-results.json

docs: install
	$(BIN)/python -m buzon.docgen docs

clean:
	$(BIN)/buzon clean || true
