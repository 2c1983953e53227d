"""Build the small C extension that binds POSIX message queues (mq_open & co)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "buzon._posixmq",
            sources=["src/buzon/_posixmq.c"],
            libraries=["rt"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=c11"],
        )
    ]
)
