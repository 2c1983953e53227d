/* A measuring program, not a test: what one small frame's write costs the kernel when
 * it is handed over as a two-entry iovec (writev / sendmsg: header, payload) against one
 * contiguous buffer (write / send, after copying both to the stack), on a pipe and on a
 * unix stream socket. One process, batches of 100 frames of 72 bytes written and then
 * read back, the two ways alternating batch by batch (so a loaded machine hits both
 * alike). protocol/_writer.h put_once chose the copy from these numbers.
 *
 *     cc -O2 -o /tmp/put_floor tests/bench/put_floor.c && taskset -c 1 /tmp/put_floor
 */
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static void run(int is_pipe) {
    int w, r;
    if (is_pipe) {
        int p[2];
        if (pipe(p) < 0)
            return;
        r = p[0], w = p[1];
    } else {
        int sv[2];
        if (socketpair(AF_UNIX, SOCK_STREAM, 0, sv) < 0)
            return;
        w = sv[0], r = sv[1];
    }
    unsigned char header[8] = {1, 1, 0, 0, 64, 0, 0, 0};
    char payload[64];
    memset(payload, 'Z', sizeof payload);
    static char sink[1 << 16];
    double spent[2] = {0, 0};
    const int rounds = 20000, batch = 100;
    for (int i = 0; i < rounds; i++) {
        int copy = i & 1;
        double t0 = now();
        for (int k = 0; k < batch; k++) {
            if (!copy) {
                struct iovec iov[2] = {{header, 8}, {payload, 64}};
                if (is_pipe) {
                    if (writev(w, iov, 2) < 0)
                        return;
                } else {
                    struct msghdr m = {.msg_iov = iov, .msg_iovlen = 2};
                    if (sendmsg(w, &m, MSG_DONTWAIT | MSG_NOSIGNAL) < 0)
                        return;
                }
            } else {
                unsigned char frame[72];
                memcpy(frame, header, 8);
                memcpy(frame + 8, payload, 64);
                if ((is_pipe ? write(w, frame, 72) : send(w, frame, 72, MSG_DONTWAIT)) < 0)
                    return;
            }
        }
        spent[copy] += now() - t0;
        for (size_t left = 72 * (size_t)batch; left > 0;) {
            ssize_t got = read(r, sink, left);
            if (got <= 0)
                return;
            left -= (size_t)got;
        }
    }
    double per = 1e9 / ((double)rounds / 2 * batch);
    printf("%-4s  iovec %5.0f ns   one buffer %5.0f ns   per 72-byte frame\n",
           is_pipe ? "pipe" : "unix", spent[0] * per, spent[1] * per);
    close(w);
    close(r);
}

int main(void) {
    run(1);
    run(0);
    return 0;
}
