/* noatimefs-reader: the builder of the derivations in tests/nix/readers.nix.
 *
 * Opens every directory and regular file below DIR with O_RDONLY|O_NOATIME
 * (as QEMU's 9p server does) and writes one line per result to $out (to
 * stdout when $out is unset):
 *
 *   host-uid 999               our uid outside the sandbox (/proc/self/uid_map)
 *   uid 1000                   our uid as we see it
 *   link 999                   readlink(DIR), when DIR is a symlink (MNT/self)
 *   start <ns> / ready <ns> / end <ns>   CLOCK_REALTIME: started, past the
 *                              barrier, done
 *   file <sha256> <size> <uid> <mode> <path>   a regular file read whole
 *   dir <uid> <mode> <path>    a directory listed
 *   link <target> <path>       a symlink (not followed)
 *   fail <errno name> <path>   an open or read that failed (EPERM: O_NOATIME refused)
 *   count <files> <dirs> <eperm> <failed>      the totals, last line
 *
 * Usage: noatimefs-reader DIR [BARRIER N SECONDS]
 *   With BARRIER (a directory every build can write to), the reader first
 *   creates BARRIER/<host uid> and waits (inotify) until N entries exist, so
 *   that N builds read at the same time; it gives up after SECONDS.
 * Exit status: 0 when everything was read (even with fail lines: the host
 * judges), 2 for bad usage, 3 when DIR cannot be opened, 4 on a barrier
 * timeout, 5 when $out cannot be written.
 *
 * Compiled by the tests with `gcc -static`: the sandbox has no libc.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/inotify.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------- sha256 */

struct sha256 {
    uint32_t h[8];
    uint64_t len;
    unsigned char buf[64];
    size_t used;
};

static const uint32_t K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4,
    0xab1c5ed5, 0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe,
    0x9bdc06a7, 0xc19bf174, 0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f,
    0x4a7484aa, 0x5cb0a9dc, 0x76f988da, 0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7,
    0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967, 0x27b70a85, 0x2e1b2138, 0x4d2c6dfc,
    0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85, 0xa2bfe8a1, 0xa81a664b,
    0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070, 0x19a4c116,
    0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7,
    0xc67178f2};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha256_block(struct sha256 *s, const unsigned char *p)
{
    uint32_t w[64], a, b, c, d, e, f, g, h, t1, t2;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3];
    e = s->h[4], f = s->h[5], g = s->h[6], h = s->h[7];
    for (int i = 0; i < 64; i++) {
        t1 = h + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        h = g, g = f, f = e, e = d + t1, d = c, c = b, b = a, a = t1 + t2;
    }
    s->h[0] += a, s->h[1] += b, s->h[2] += c, s->h[3] += d;
    s->h[4] += e, s->h[5] += f, s->h[6] += g, s->h[7] += h;
}

static void sha256_init(struct sha256 *s)
{
    static const uint32_t h0[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    memcpy(s->h, h0, sizeof h0);
    s->len = 0;
    s->used = 0;
}

static void sha256_update(struct sha256 *s, const unsigned char *p, size_t n)
{
    s->len += n;
    while (n > 0) {
        size_t take = 64 - s->used < n ? 64 - s->used : n;
        memcpy(s->buf + s->used, p, take);
        s->used += take, p += take, n -= take;
        if (s->used == 64) {
            sha256_block(s, s->buf);
            s->used = 0;
        }
    }
}

static void sha256_hex(struct sha256 *s, char out[65])
{
    uint64_t bits = s->len * 8;
    unsigned char pad[72] = {0x80};
    size_t padlen = (s->used < 56 ? 56 : 120) - s->used;
    for (int i = 0; i < 8; i++)
        pad[padlen + i] = (unsigned char)(bits >> (56 - 8 * i));
    sha256_update(s, pad, padlen + 8);
    for (int i = 0; i < 8; i++)
        sprintf(out + 8 * i, "%08x", s->h[i]);
}

/* ---------------------------------------------------------------- the walk */

static FILE *out;
static unsigned long n_files, n_dirs, n_eperm, n_failed;

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void failed(int err, const char *path)
{
    if (err == EPERM)
        n_eperm++;
    n_failed++;
    fprintf(out, "fail %s %s\n", strerrorname_np(err) ? strerrorname_np(err) : "E?", path);
}

static void read_file(int dirfd, const char *name, const char *path)
{
    int fd = openat(dirfd, name, O_RDONLY | O_NOATIME | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0) {
        failed(errno, path);
        return;
    }
    struct stat st;
    fstat(fd, &st);
    struct sha256 s;
    sha256_init(&s);
    static unsigned char buf[1 << 16];
    ssize_t got;
    while ((got = read(fd, buf, sizeof buf)) > 0)
        sha256_update(&s, buf, (size_t)got);
    int err = errno;
    close(fd);
    if (got < 0) {
        failed(err, path);
        return;
    }
    unsigned long long size = s.len;
    char hex[65];
    sha256_hex(&s, hex);
    n_files++;
    fprintf(out, "file %s %llu %u %o %s\n", hex, size, st.st_uid,
            st.st_mode & 07777, path);
}

/* Walks the directory open at fd (which it closes); path is its name relative to DIR. */
static void walk(int fd, const char *path)
{
    struct stat st;
    fstat(fd, &st);
    n_dirs++;
    fprintf(out, "dir %u %o %s\n", st.st_uid, st.st_mode & 07777, path);
    DIR *d = fdopendir(fd);
    if (d == NULL) {
        failed(errno, path);
        close(fd);
        return;
    }
    struct dirent *e;
    while ((errno = 0, e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0)
            continue;
        char *child;
        if (asprintf(&child, "%s/%s", path, e->d_name) < 0)
            abort();
        struct stat cst;
        if (fstatat(dirfd(d), e->d_name, &cst, AT_SYMLINK_NOFOLLOW) < 0) {
            failed(errno, child);
        } else if (S_ISDIR(cst.st_mode)) {
            int cfd = openat(dirfd(d), e->d_name,
                             O_RDONLY | O_NOATIME | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
            if (cfd < 0)
                failed(errno, child);
            else
                walk(cfd, child);
        } else if (S_ISREG(cst.st_mode)) {
            read_file(dirfd(d), e->d_name, child);
        } else if (S_ISLNK(cst.st_mode)) {
            char target[4096];
            ssize_t n = readlinkat(dirfd(d), e->d_name, target, sizeof target - 1);
            if (n < 0) {
                failed(errno, child);
            } else {
                target[n] = 0;
                fprintf(out, "link %s %s\n", target, child);
            }
        }
        free(child);
    }
    if (errno != 0)
        failed(errno, path);
    closedir(d);
}

/* ---------------------------------------------------------------- the barrier */

static int count_entries(const char *dir)
{
    DIR *d = opendir(dir);
    if (d == NULL)
        return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)) != NULL)
        if (e->d_name[0] != '.')
            n++;
    closedir(d);
    return n;
}

static int barrier(const char *dir, const char *me, int want, int seconds)
{
    int ino = inotify_init1(IN_CLOEXEC);
    if (ino < 0 || inotify_add_watch(ino, dir, IN_CREATE | IN_MOVED_TO) < 0) {
        perror("noatimefs-reader: inotify on the barrier");
        return -1;
    }
    char mine[4096];
    snprintf(mine, sizeof mine, "%s/%s", dir, me);
    int fd = open(mine, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
        perror(mine);
        return -1;
    }
    close(fd);
    long long deadline = now_ns() + (long long)seconds * 1000000000LL;
    int n;
    while ((n = count_entries(dir)) >= 0 && n < want) {
        long long left = (deadline - now_ns()) / 1000000;
        if (left <= 0)
            break;
        struct pollfd p = {.fd = ino, .events = POLLIN};
        if (poll(&p, 1, (int)left) > 0) {
            char ev[4096];
            if (read(ino, ev, sizeof ev) < 0)
                break;
        }
    }
    close(ino);
    return n;
}

/* ---------------------------------------------------------------- main */

static long host_uid(void)
{
    FILE *f = fopen("/proc/self/uid_map", "r");
    long inside, outside, count;
    if (f == NULL)
        return -1;
    int ok = fscanf(f, "%ld %ld %ld", &inside, &outside, &count) == 3;
    fclose(f);
    /* The first line maps our uid when we are in a one-uid user namespace. */
    return ok ? outside + ((long)getuid() - inside) : -1;
}

int main(int argc, char **argv)
{
    if (argc != 2 && argc != 5) {
        fprintf(stderr, "usage: noatimefs-reader DIR [BARRIER N SECONDS]\n");
        return 2;
    }
    const char *dir = argv[1];
    const char *outpath = getenv("out");
    out = outpath ? fopen(outpath, "w") : stdout;
    if (out == NULL) {
        perror(outpath);
        return 5;
    }
    long me = host_uid();
    fprintf(out, "host-uid %ld\nuid %u\nstart %lld\n", me, getuid(), now_ns());
    char target[4096];
    ssize_t n = readlink(dir, target, sizeof target - 1);
    if (n >= 0) {
        target[n] = 0;
        fprintf(out, "self %s\n", target);
    }
    if (argc == 5) {
        char name[32];
        snprintf(name, sizeof name, "%ld", me);
        int want = atoi(argv[3]);
        int seen = barrier(argv[2], name, want, atoi(argv[4]));
        fprintf(out, "barrier %d of %d\n", seen, want);
        if (seen < want) {
            fprintf(stderr, "noatimefs-reader: %d of %d builds at the barrier after %s s\n", seen,
                    want, argv[4]);
            fclose(out);
            return 4;
        }
    }
    fprintf(out, "ready %lld\n", now_ns());
    int fd = open(dir, O_RDONLY | O_NOATIME | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        int err = errno;
        failed(err, ".");
        fprintf(out, "count 0 0 %lu %lu\n", n_eperm, n_failed);
        fclose(out);
        fprintf(stderr, "noatimefs-reader: %s: %s\n", dir, strerror(err));
        return 3;
    }
    walk(fd, ".");
    fprintf(out, "end %lld\ncount %lu %lu %lu %lu\n", now_ns(), n_files, n_dirs, n_eperm,
            n_failed);
    if (fclose(out) != 0) {
        perror(outpath ? outpath : "stdout");
        return 5;
    }
    return 0;
}
