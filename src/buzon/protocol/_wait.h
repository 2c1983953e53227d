/* The sleep the C receive waits share (protocol/_stream.c wait_frame, protocol/_dgram.c
 * Receiver and wait_fifo): poll a data fd (pfds[0]) and the channel's wake fd until
 * the data fd is ready, the wake fd is, or the deadline passes. Called with the GIL
 * released. Header-only: each extension module includes it once. */
#ifndef BUZON_PROTOCOL_WAIT_H
#define BUZON_PROTOCOL_WAIT_H

#include <errno.h>
#include <poll.h>
#include <time.h>

static inline double monotonic_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* time.monotonic()'s clock on Linux */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* 1: pfds[0] has events (ready, or an error the caller's read reports); 0: the deadline
 * passed (``forever`` false) or only the wake fd is ready (a close() in another
 * thread); -1: poll failed (errno, EINTR included: the caller runs the handlers) */
static inline int sleep_readable(struct pollfd *pfds, nfds_t nfds, int forever,
                                 double deadline) {
    for (;;) {
        int ms = -1;
        if (!forever) {
            double left = deadline - monotonic_now();
            ms = left <= 0.0 ? 0 : left > 2e6 ? 2000000000 : (int)(left * 1000.0 + 0.999);
        }
        int r = poll(pfds, nfds, ms);
        if (r < 0)
            return -1;
        if (r == 0) {
            if (!forever && monotonic_now() >= deadline)
                return 0;
            continue; /* woke a little early: sleep the rest */
        }
        return pfds[0].revents != 0;
    }
}

#endif
