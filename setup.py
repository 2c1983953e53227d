"""Build the small C extensions: POSIX message queues (mq_open & co), CRC-32C and the
shared-memory core (rings in named segments)."""

from setuptools import Extension, setup

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
            "buzon._core",
            sources=["src/buzon/_core.c"],
            libraries=["rt"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        ),
    ]
)
