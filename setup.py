"""Build the small C extensions: POSIX message queues (mq_open & co), CRC-32C, the
stream frames' hot path (protocol/_stream.c) and the shared-memory core (rings in named segments; one extension built from the units that
src/buzon/_core.h lists)."""

from setuptools import Extension, setup

# buzon._core: one module from several units sharing _core.h. Hidden visibility keeps
# their shared functions private to the module (only PyInit__core is exported), so the
# calls between units need no PLT indirection.
CORE_UNITS = [
    f"src/buzon/_core_{unit}.c"
    for unit in ("ring", "glue", "ring_type", "frames", "loan", "block", "admin")
]

setup(
    ext_modules=[
        Extension(
            "buzon._posixmq",
            sources=["src/buzon/_posixmq.c"],
            libraries=["rt"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=c11"],
        ),
        Extension(
            "buzon._crc32c",
            sources=["src/buzon/_crc32c.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        ),
        Extension(
            "buzon.protocol._stream",
            sources=["src/buzon/protocol/_stream.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        ),
        Extension(
            "buzon._core",
            sources=CORE_UNITS,
            depends=["src/buzon/_core.h"],
            libraries=["rt"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11", "-fvisibility=hidden"],
        ),
    ]
)
