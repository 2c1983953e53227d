"""Build the small C extensions: POSIX message queues (mq_open & co) and CRC-32C."""

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
    ]
)
