/*
 * mq_send NAME PRIORITY MESSAGE...
 *
 * Interop helper for buzon's tests: a program that knows nothing about buzon sends
 * each MESSAGE (the argument's bytes, without the terminating NUL) to the existing
 * POSIX queue NAME with mq_send(3) at PRIORITY. Exit status 0 on success.
 */
#include <errno.h>
#include <fcntl.h>
#include <mqueue.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int
main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s NAME PRIORITY MESSAGE...\n", argv[0]);
        return 2;
    }
    char *end;
    unsigned long prio = strtoul(argv[2], &end, 10);
    if (*argv[2] == '\0' || *end != '\0') {
        fprintf(stderr, "bad priority %s\n", argv[2]);
        return 2;
    }
    mqd_t mqd = mq_open(argv[1], O_WRONLY);
    if (mqd == (mqd_t)-1) {
        fprintf(stderr, "mq_open %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    for (int i = 3; i < argc; i++) {
        if (mq_send(mqd, argv[i], strlen(argv[i]), (unsigned int)prio) == -1) {
            fprintf(stderr, "mq_send: %s\n", strerror(errno));
            mq_close(mqd);
            return 1;
        }
    }
    mq_close(mqd);
    return 0;
}
