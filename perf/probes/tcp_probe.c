/*
 * tcp_probe: raw TCP figures between two processes on the loopback addresses
 * the dvmm nodes use (127.0.0.x), the peers of the remote-fault figures.
 *
 *   tcp_probe server ADDR PORT                      serve one client, then exit
 *   tcp_probe rtt    SRC DST PORT SIZE N busy|block  ping-pong N messages of SIZE bytes
 *   tcp_probe stream SRC DST PORT SECONDS           send as fast as possible for SECONDS
 *
 * The client prints one JSON object on stdout. In "busy" mode both sides poll
 * their socket with MSG_DONTWAIT instead of sleeping in recv() (the server
 * learns the mode from the first byte of the first message). TCP_NODELAY on
 * both sides, as the dvmm transport.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static void die(const char *what)
{
    perror(what);
    exit(2);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static struct sockaddr_in addr_of(const char *ip, int port)
{
    struct sockaddr_in a;
    memset(&a, 0, sizeof a);
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", ip);
        exit(2);
    }
    return a;
}

static void nodelay(int fd)
{
    int one = 1;
    if (setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one) < 0)
        die("TCP_NODELAY");
}

/* read exactly n bytes; busy: spin with MSG_DONTWAIT. 0 on EOF. */
static int recv_all(int fd, char *buf, size_t n, int busy)
{
    size_t got = 0;
    while (got < n) {
        ssize_t r = recv(fd, buf + got, n - got, busy ? MSG_DONTWAIT : 0);
        if (r > 0)
            got += (size_t)r;
        else if (r == 0)
            return 0;
        else if (errno != EAGAIN && errno != EINTR)
            die("recv");
    }
    return 1;
}

static void send_all(int fd, const char *buf, size_t n)
{
    size_t put = 0;
    while (put < n) {
        ssize_t r = send(fd, buf + put, n - put, MSG_NOSIGNAL);
        if (r > 0)
            put += (size_t)r;
        else if (r < 0 && errno != EINTR && errno != EAGAIN)
            die("send");
    }
}

/* header of every rtt session: mode and message size */
struct hello { uint32_t magic, kind, size, busy; };
#define MAGIC 0x64766d6du
enum { K_RTT = 1, K_STREAM = 2 };

static int server(const char *ip, int port)
{
    int ls = socket(AF_INET, SOCK_STREAM, 0);
    if (ls < 0)
        die("socket");
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in a = addr_of(ip, port);
    if (bind(ls, (struct sockaddr *)&a, sizeof a) < 0)
        die("bind");
    if (listen(ls, 1) < 0)
        die("listen");
    printf("ready\n");
    fflush(stdout);
    int fd = accept(ls, NULL, NULL);
    if (fd < 0)
        die("accept");
    nodelay(fd);
    struct hello h;
    if (!recv_all(fd, (char *)&h, sizeof h, 0) || h.magic != MAGIC)
        return 2;
    if (h.kind == K_RTT) {
        char *buf = malloc(h.size);
        while (recv_all(fd, buf, h.size, (int)h.busy))
            send_all(fd, buf, h.size);
    } else {
        size_t cap = 1 << 20;
        char *buf = malloc(cap);
        uint64_t total = 0;
        for (;;) {
            ssize_t r = recv(fd, buf, cap, 0);
            if (r <= 0)
                break;
            total += (uint64_t)r;
        }
        /* tell the sender how much arrived */
        send_all(fd, (char *)&total, sizeof total);
    }
    close(fd);
    close(ls);
    return 0;
}

static int connect_to(const char *src, const char *dst, int port)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        die("socket");
    struct sockaddr_in s = addr_of(src, 0), d = addr_of(dst, port);
    if (bind(fd, (struct sockaddr *)&s, sizeof s) < 0)
        die("bind src");
    if (connect(fd, (struct sockaddr *)&d, sizeof d) < 0)
        die("connect");
    nodelay(fd);
    return fd;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static int rtt(const char *src, const char *dst, int port, uint32_t size, uint32_t n, int busy)
{
    int fd = connect_to(src, dst, port);
    struct hello h = { MAGIC, K_RTT, size, (uint32_t)busy };
    send_all(fd, (char *)&h, sizeof h);
    char *buf = calloc(1, size);
    uint64_t *lat = calloc(n, sizeof *lat);
    uint32_t warm = n / 10 + 10;
    for (uint32_t i = 0; i < warm + n; i++) {
        uint64_t t = now_ns();
        send_all(fd, buf, size);
        if (!recv_all(fd, buf, size, busy))
            die("server closed");
        if (i >= warm)
            lat[i - warm] = now_ns() - t;
    }
    close(fd);
    qsort(lat, n, sizeof *lat, cmp_u64);
    double sum = 0;
    for (uint32_t i = 0; i < n; i++)
        sum += (double)lat[i];
    printf("{\"size\": %u, \"n\": %u, \"busy\": %d, \"p50_us\": %.3f, \"p90_us\": %.3f, "
           "\"p99_us\": %.3f, \"min_us\": %.3f, \"mean_us\": %.3f, \"samples_us\": [",
           size, n, busy, lat[n / 2] / 1e3, lat[n * 9 / 10] / 1e3, lat[n * 99 / 100] / 1e3,
           lat[0] / 1e3, sum / n / 1e3);
    /* a thinned copy of the sorted samples for distribution plots */
    uint32_t step = n > 2000 ? n / 2000 : 1;
    for (uint32_t i = 0; i < n; i += step)
        printf("%s%.3f", i ? ", " : "", lat[i] / 1e3);
    printf("]}\n");
    return 0;
}

static int stream(const char *src, const char *dst, int port, double seconds)
{
    int fd = connect_to(src, dst, port);
    struct hello h = { MAGIC, K_STREAM, 0, 0 };
    send_all(fd, (char *)&h, sizeof h);
    size_t chunk = 1 << 20;
    char *buf = calloc(1, chunk);
    uint64_t sent = 0, t0 = now_ns(), limit = (uint64_t)(seconds * 1e9), t;
    do {
        send_all(fd, buf, chunk);
        sent += chunk;
        t = now_ns() - t0;
    } while (t < limit);
    shutdown(fd, SHUT_WR);
    uint64_t got = 0;
    if (!recv_all(fd, (char *)&got, sizeof got, 0))
        die("no byte count");
    t = now_ns() - t0;
    close(fd);
    printf("{\"bytes\": %llu, \"seconds\": %.6f, \"gbps\": %.4f}\n", (unsigned long long)got, t / 1e9,
           (double)got * 8 / (double)t);
    return got == sent ? 0 : 1;
}

int main(int argc, char **argv)
{
    if (argc == 4 && !strcmp(argv[1], "server"))
        return server(argv[2], atoi(argv[3]));
    if (argc == 8 && !strcmp(argv[1], "rtt"))
        return rtt(argv[2], argv[3], atoi(argv[4]), (uint32_t)atoi(argv[5]), (uint32_t)atoi(argv[6]),
                   !strcmp(argv[7], "busy"));
    if (argc == 6 && !strcmp(argv[1], "stream"))
        return stream(argv[2], argv[3], atoi(argv[4]), atof(argv[5]));
    fprintf(stderr, "usage: see the comment at the top of tcp_probe.c\n");
    return 2;
}
