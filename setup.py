"""Build the small C extensions: POSIX message queues (mq_open & co), CRC-32C, the
shared-memory core (rings in named segments; one extension built from the units that
src/buzon/_core.h lists), the frame format's C speedups: for those rings
(buzon.protocol._frames, which reaches the rings through the core's C API,
src/buzon/_core_api.h) and for streams (protocol/_stream.c), DATA frames with header
fields (protocol/_fields.c: the RPC messages) and the RPC messages' common case framed
(protocol/_rpc.c), the receive of datagram sockets and POSIX queues (protocol/_dgram.c),
and the ``fifo:``
envelope's hot paths (protocol/_envelope.c)."""

from setuptools import Extension, setup

# buzon._core: one module from several units sharing _core.h. Hidden visibility keeps
# their shared functions private to the module (only PyInit__core is exported), so the
# calls between units need no PLT indirection.
CORE_UNITS = [
    f"src/buzon/_core_{unit}.c"
    for unit in ("ring", "glue", "ring_type", "loan", "block", "admin", "rv")
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
            depends=["src/buzon/_crc32c.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        ),
        Extension(
            "buzon.protocol._envelope",
            sources=["src/buzon/protocol/_envelope.c"],
            depends=["src/buzon/_crc32c.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        ),
        Extension(
            "buzon.protocol._stream",
            sources=["src/buzon/protocol/_stream.c"],
            depends=["src/buzon/protocol/_wait.h", "src/buzon/protocol/_writer.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        ),
        Extension(
            "buzon.protocol._dgram",
            sources=["src/buzon/protocol/_dgram.c"],
            depends=["src/buzon/protocol/_wait.h", "src/buzon/protocol/_writer.h"],
            libraries=["rt"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        ),
        Extension(
            "buzon.protocol._take",
            sources=["src/buzon/protocol/_take.c"],
            depends=["src/buzon/protocol/_writer.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        ),
        Extension(
            "buzon.protocol._pop",
            sources=["src/buzon/protocol/_pop.c"],
            depends=["src/buzon/protocol/_slots.h", "src/buzon/protocol/_writer.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        ),
        Extension(
            "buzon.protocol._credit",
            sources=["src/buzon/protocol/_credit.c"],
            depends=["src/buzon/protocol/_slots.h", "src/buzon/protocol/_writer.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        ),
        Extension(
            "buzon.protocol._rv",
            sources=["src/buzon/protocol/_rv.c"],
            depends=["src/buzon/protocol/_wait.h", "src/buzon/protocol/_writer.h"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        ),
        Extension(
            "buzon.protocol._fields",
            sources=["src/buzon/protocol/_fields.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        ),
        Extension(
            "buzon.protocol._rpc",
            sources=["src/buzon/protocol/_rpc.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        ),
        Extension(
            "buzon._bcast",
            sources=["src/buzon/_bcast.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11"],
        ),
        Extension(
            "buzon._core",
            sources=CORE_UNITS,
            depends=["src/buzon/_core.h", "src/buzon/_core_api.h"],
            libraries=["rt"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11", "-fvisibility=hidden"],
        ),
        Extension(
            "buzon.protocol._frames",
            sources=["src/buzon/protocol/_frames.c"],
            depends=["src/buzon/_core_api.h"],
            include_dirs=["src/buzon"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-std=gnu11", "-fvisibility=hidden"],
        ),
    ]
)
