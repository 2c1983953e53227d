/*
 * mq_recv NAME COUNT
 *
 * Interop helper for buzon's tests: receives COUNT messages from the existing POSIX
 * queue NAME with mq_timedreceive(3) (giving up after 5 seconds each) and prints one
 * line per message, "PRIORITY:HEX", where HEX is the message's bytes in lowercase
 * hexadecimal (empty for an empty message). Exit status 0 on success.
 */
#include <errno.h>
#include <fcntl.h>
#include <mqueue.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int
main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s NAME COUNT\n", argv[0]);
        return 2;
    }
    long count = strtol(argv[2], NULL, 10);
    mqd_t mqd = mq_open(argv[1], O_RDONLY);
    if (mqd == (mqd_t)-1) {
        fprintf(stderr, "mq_open %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    struct mq_attr attr;
    if (mq_getattr(mqd, &attr) == -1) {
        fprintf(stderr, "mq_getattr: %s\n", strerror(errno));
        mq_close(mqd);
        return 1;
    }
    unsigned char *buf = malloc((size_t)attr.mq_msgsize);
    if (buf == NULL) {
        mq_close(mqd);
        return 1;
    }
    int status = 0;
    for (long i = 0; i < count; i++) {
        struct timespec deadline;
        unsigned int prio;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += 5;
        ssize_t n = mq_timedreceive(mqd, (char *)buf, (size_t)attr.mq_msgsize, &prio,
                                    &deadline);
        if (n == -1) {
            fprintf(stderr, "mq_timedreceive: %s\n", strerror(errno));
            status = 1;
            break;
        }
        printf("%u:", prio);
        for (ssize_t j = 0; j < n; j++) {
            printf("%02x", buf[j]);
        }
        printf("\n");
    }
    free(buf);
    mq_close(mqd);
    return status;
}
