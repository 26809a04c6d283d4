/*
 * uffd_probe: the local userfaultfd fault round trip, the floor of every
 * dvmm remote fault.
 *
 *   uffd_probe kvm  block|busy PAGES ROUNDS
 *   uffd_probe host block|busy PAGES ROUNDS
 *
 * kvm:  a KVM VM with a tiny real-mode guest (16 instructions) touches PAGES
 *       pages of a memfd-backed memslot registered with userfaultfd (MISSING);
 *       a handler thread resolves each fault with UFFDIO_COPY. Before each
 *       touch the guest writes to port 0x10, so the vCPU thread timestamps
 *       every page; the same pass over populated pages gives the baseline
 *       (exit + emulation cost) that is subtracted. Between rounds the memory
 *       is freed with fallocate(PUNCH_HOLE), so the next touch is MISSING again.
 * host: a host thread writes one byte to each page of the registered mapping
 *       and times each write directly (no KVM: the fault path without the
 *       guest exit and re-entry).
 * block: the handler sleeps in poll(); busy: it spins on a non-blocking read.
 * Prints one JSON object: per-fault round trip percentiles in microseconds.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096ul
#define DATA_GPA 0x10000ul
#define MAX_PAGES 128 /* 0x10000 + 128 pages stays below 0xA0000 (real mode) */

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

static int uffd, busy;
static char *src_page;
static volatile int stop_handler;
static volatile uint64_t faults_served;

static void *handler(void *arg)
{
    (void)arg;
    struct uffd_msg msg;
    for (;;) {
        if (!busy) {
            struct pollfd p = { .fd = uffd, .events = POLLIN };
            int r = poll(&p, 1, 100);
            if (r < 0 && errno != EINTR)
                die("poll");
        }
        if (stop_handler)
            return NULL;
        ssize_t n = read(uffd, &msg, sizeof msg);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            die("read uffd");
        }
        if (n != sizeof msg || msg.event != UFFD_EVENT_PAGEFAULT)
            continue;
        struct uffdio_copy c = {
            .dst = msg.arg.pagefault.address & ~(PAGE - 1),
            .src = (uint64_t)src_page,
            .len = PAGE,
            .mode = 0,
        };
        if (ioctl(uffd, UFFDIO_COPY, &c) < 0 && errno != EEXIST)
            die("UFFDIO_COPY");
        faults_served++;
    }
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static double pct(uint64_t *v, size_t n, double p)
{
    size_t i = (size_t)(p * (double)(n - 1) + 0.5);
    return (double)v[i] / 1e3;
}

/* real-mode guest: for k in 0..N: out 0x10; mov byte [es:0],1 (es = 0x1000 + k*0x100); then out 0x11; hlt */
static const uint8_t guest_code[] = {
    0xB8, 0x00, 0x10,                   /* 0x00 mov ax, 0x1000 */
    0x8E, 0xC0,                         /* 0x03 mov es, ax */
    0xB9, 0x00, 0x00,                   /* 0x05 mov cx, N (patched) */
    0xE6, 0x10,                         /* 0x08 L: out 0x10, al */
    0x26, 0xC6, 0x06, 0x00, 0x00, 0x01, /* 0x0a mov byte [es:0], 1 */
    0x05, 0x00, 0x01,                   /* 0x10 add ax, 0x100 */
    0x8E, 0xC0,                         /* 0x13 mov es, ax */
    0xE2, 0xF1,                         /* 0x15 loop L */
    0xE6, 0x11,                         /* 0x17 out 0x11, al */
    0xF4,                               /* 0x19 hlt */
};

struct kvm_ctx { int kvm, vm, vcpu; struct kvm_run *run; };

static void kvm_setup(struct kvm_ctx *k, char *code_mem, char *data_mem, unsigned pages)
{
    k->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (k->kvm < 0)
        die("/dev/kvm");
    k->vm = ioctl(k->kvm, KVM_CREATE_VM, 0);
    if (k->vm < 0)
        die("KVM_CREATE_VM");
    ioctl(k->vm, KVM_SET_TSS_ADDR, 0xfffbd000ul); /* Intel real mode wants it; harmless elsewhere */
    struct kvm_userspace_memory_region r0 = { .slot = 0, .guest_phys_addr = 0, .memory_size = DATA_GPA,
                                              .userspace_addr = (uint64_t)code_mem };
    struct kvm_userspace_memory_region r1 = { .slot = 1, .guest_phys_addr = DATA_GPA,
                                              .memory_size = pages * PAGE, .userspace_addr = (uint64_t)data_mem };
    if (ioctl(k->vm, KVM_SET_USER_MEMORY_REGION, &r0) < 0 || ioctl(k->vm, KVM_SET_USER_MEMORY_REGION, &r1) < 0)
        die("KVM_SET_USER_MEMORY_REGION");
    k->vcpu = ioctl(k->vm, KVM_CREATE_VCPU, 0);
    if (k->vcpu < 0)
        die("KVM_CREATE_VCPU");
    long sz = ioctl(k->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    k->run = mmap(NULL, (size_t)sz, PROT_READ | PROT_WRITE, MAP_SHARED, k->vcpu, 0);
    if (k->run == MAP_FAILED)
        die("mmap kvm_run");
}

/* one pass of the guest over all pages; times[i] = interval before page i+1's exit */
static void kvm_pass(struct kvm_ctx *k, uint64_t *iv, unsigned pages)
{
    struct kvm_sregs s;
    if (ioctl(k->vcpu, KVM_GET_SREGS, &s) < 0)
        die("KVM_GET_SREGS");
    s.cs.base = 0;
    s.cs.selector = 0;
    s.es.base = 0;
    s.es.selector = 0;
    if (ioctl(k->vcpu, KVM_SET_SREGS, &s) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs r;
    memset(&r, 0, sizeof r);
    r.rip = 0x1000;
    r.rflags = 2;
    if (ioctl(k->vcpu, KVM_SET_REGS, &r) < 0)
        die("KVM_SET_REGS");
    uint64_t last = 0;
    unsigned i = 0;
    for (;;) {
        if (ioctl(k->vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR)
                continue;
            die("KVM_RUN");
        }
        uint64_t t = now_ns();
        struct kvm_run *run = k->run;
        if (run->exit_reason == KVM_EXIT_IO && run->io.port == 0x10) {
            if (i > 0)
                iv[i - 1] = t - last;
            last = t;
            i++;
        } else if (run->exit_reason == KVM_EXIT_IO && run->io.port == 0x11) {
            iv[i - 1] = t - last;
            if (i != pages) {
                fprintf(stderr, "guest touched %u pages, expected %u\n", i, pages);
                exit(2);
            }
        } else if (run->exit_reason == KVM_EXIT_HLT) {
            return;
        } else {
            fprintf(stderr, "unexpected exit %u (internal error suberror %u)\n", run->exit_reason,
                    run->internal.suberror);
            exit(3);
        }
    }
}

int main(int argc, char **argv)
{
    if (argc != 5) {
        fprintf(stderr, "usage: uffd_probe kvm|host block|busy PAGES ROUNDS\n");
        return 2;
    }
    int use_kvm = !strcmp(argv[1], "kvm");
    busy = !strcmp(argv[2], "busy");
    unsigned pages = (unsigned)atoi(argv[3]), rounds = (unsigned)atoi(argv[4]);
    if (pages < 2 || pages > MAX_PAGES || rounds < 1) {
        fprintf(stderr, "PAGES must be 2..%d\n", MAX_PAGES);
        return 2;
    }
    size_t len = pages * PAGE;
    int mfd = memfd_create("dvmm-perf-uffd", MFD_CLOEXEC);
    if (mfd < 0 || ftruncate(mfd, (off_t)len) < 0)
        die("memfd");
    char *data = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, mfd, 0);
    if (data == MAP_FAILED)
        die("mmap memfd");
    src_page = aligned_alloc(PAGE, PAGE);
    memset(src_page, 0xa5, PAGE);

    uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (uffd < 0)
        die("userfaultfd");
    struct uffdio_api api = { .api = UFFD_API, .features = 0 };
    if (ioctl(uffd, UFFDIO_API, &api) < 0)
        die("UFFDIO_API");
    struct uffdio_register reg = { .range = { .start = (uint64_t)data, .len = len },
                                   .mode = UFFDIO_REGISTER_MODE_MISSING };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        die("UFFDIO_REGISTER");
    pthread_t th;
    if (pthread_create(&th, NULL, handler, NULL))
        die("pthread_create");

    size_t n = (size_t)pages * rounds;
    uint64_t *fault = calloc(n, sizeof *fault), *base = calloc(n, sizeof *base);
    struct kvm_ctx k;
    char *code = NULL;
    if (use_kvm) {
        code = mmap(NULL, DATA_GPA, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        memcpy(code + 0x1000, guest_code, sizeof guest_code);
        code[0x1000 + 6] = (char)(pages & 0xff);
        code[0x1000 + 7] = (char)(pages >> 8);
        kvm_setup(&k, code, data, pages);
    }
    for (unsigned r = 0; r < rounds; r++) {
        if (fallocate(mfd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, (off_t)len) < 0)
            die("fallocate");
        if (use_kvm) {
            kvm_pass(&k, fault + (size_t)r * pages, pages);
            kvm_pass(&k, base + (size_t)r * pages, pages);
        } else {
            for (unsigned i = 0; i < pages; i++) {
                uint64_t t = now_ns();
                ((volatile char *)data)[i * PAGE] = 1;
                fault[(size_t)r * pages + i] = now_ns() - t;
            }
            for (unsigned i = 0; i < pages; i++) {
                uint64_t t = now_ns();
                ((volatile char *)data)[i * PAGE] = 2;
                base[(size_t)r * pages + i] = now_ns() - t;
            }
        }
    }
    stop_handler = 1;
    pthread_join(th, NULL);
    if (faults_served < n) {
        fprintf(stderr, "only %llu of %zu faults went through the handler\n", (unsigned long long)faults_served, n);
        return 3;
    }
    qsort(fault, n, sizeof *fault, cmp_u64);
    qsort(base, n, sizeof *base, cmp_u64);
    double b50 = pct(base, n, 0.5);
    printf("{\"mode\": \"%s\", \"handler\": \"%s\", \"n\": %zu, \"faults_served\": %llu, "
           "\"raw_p50_us\": %.3f, \"raw_p99_us\": %.3f, \"baseline_p50_us\": %.3f, "
           "\"p50_us\": %.3f, \"p90_us\": %.3f, \"p99_us\": %.3f, \"samples_us\": [",
           use_kvm ? "kvm" : "host", busy ? "busy" : "block", n, (unsigned long long)faults_served,
           pct(fault, n, 0.5), pct(fault, n, 0.99), b50, pct(fault, n, 0.5) - b50, pct(fault, n, 0.9) - b50,
           pct(fault, n, 0.99) - b50);
    for (size_t i = 0; i < n; i++)
        printf("%s%.3f", i ? ", " : "", (double)fault[i] / 1e3 - b50);
    printf("]}\n");
    return 0;
}
