/*
 * LD_PRELOAD shim for redis-server: a page cache that dies with the process.
 *
 * Writes to Redis's append-only files (names ending ".incr.aof") are held in this process's
 * memory and reach the file only when Redis calls fsync/fdatasync (or closes it). A `kill -9`
 * then loses exactly what a power cut or kernel crash would lose: whatever Redis wrote but
 * had not yet synced. Without it, `kill -9` leaves the kernel's page cache intact, and
 * `appendfsync everysec` looks as durable as `always`.
 *
 * Build: cc -shared -fPIC -O1 -o lost_page_cache.so lost_page_cache.c -ldl -lpthread
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

#define MAX_FD 4096

static char *held[MAX_FD];
static size_t held_len[MAX_FD], held_cap[MAX_FD];
static int tracked[MAX_FD];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;

static ssize_t (*real_write)(int, const void *, size_t);
static int (*real_fsync)(int);
static int (*real_fdatasync)(int);
static int (*real_close)(int);
static int (*real_open)(const char *, int, ...);
static int (*real_open64)(const char *, int, ...);
static int (*real_openat)(int, const char *, int, ...);

static void resolve(void) {
    if (real_write) return;
    real_fsync = dlsym(RTLD_NEXT, "fsync");
    real_fdatasync = dlsym(RTLD_NEXT, "fdatasync");
    real_close = dlsym(RTLD_NEXT, "close");
    real_open = dlsym(RTLD_NEXT, "open");
    real_open64 = dlsym(RTLD_NEXT, "open64");
    real_openat = dlsym(RTLD_NEXT, "openat");
    real_write = dlsym(RTLD_NEXT, "write");
}

static int is_aof(const char *path) {
    size_t n = path ? strlen(path) : 0;
    return n > 9 && strcmp(path + n - 9, ".incr.aof") == 0;
}

static void track(int fd, const char *path) {
    if (fd < 0 || fd >= MAX_FD) return;
    pthread_mutex_lock(&lock);
    tracked[fd] = is_aof(path);
    held_len[fd] = 0;
    pthread_mutex_unlock(&lock);
}

/* Called with the lock held. */
static void flush_held(int fd) {
    size_t done = 0;
    while (done < held_len[fd]) {
        ssize_t n = real_write(fd, held[fd] + done, held_len[fd] - done);
        if (n <= 0) break;
        done += (size_t)n;
    }
    held_len[fd] = 0;
}

#define OPEN_MODE(flags, mode)                      \
    mode_t mode = 0;                                \
    if ((flags) & (O_CREAT | O_TMPFILE)) {          \
        va_list args;                               \
        va_start(args, flags);                      \
        mode = (mode_t)va_arg(args, int);           \
        va_end(args);                               \
    }

int open(const char *path, int flags, ...) {
    resolve();
    OPEN_MODE(flags, mode)
    int fd = real_open(path, flags, mode);
    track(fd, path);
    return fd;
}

int open64(const char *path, int flags, ...) {
    resolve();
    OPEN_MODE(flags, mode)
    int fd = real_open64(path, flags, mode);
    track(fd, path);
    return fd;
}

int openat(int dirfd, const char *path, int flags, ...) {
    resolve();
    OPEN_MODE(flags, mode)
    int fd = real_openat(dirfd, path, flags, mode);
    track(fd, path);
    return fd;
}

ssize_t write(int fd, const void *buffer, size_t count) {
    resolve();
    if (fd < 0 || fd >= MAX_FD || !tracked[fd]) return real_write(fd, buffer, count);
    pthread_mutex_lock(&lock);
    if (held_len[fd] + count > held_cap[fd]) {
        size_t cap = (held_len[fd] + count) * 2;
        held[fd] = realloc(held[fd], cap);
        held_cap[fd] = cap;
    }
    memcpy(held[fd] + held_len[fd], buffer, count);
    held_len[fd] += count;
    pthread_mutex_unlock(&lock);
    return (ssize_t)count;
}

int fsync(int fd) {
    resolve();
    if (fd >= 0 && fd < MAX_FD && tracked[fd]) {
        pthread_mutex_lock(&lock);
        flush_held(fd);
        pthread_mutex_unlock(&lock);
    }
    return real_fsync(fd);
}

int fdatasync(int fd) {
    resolve();
    if (fd >= 0 && fd < MAX_FD && tracked[fd]) {
        pthread_mutex_lock(&lock);
        flush_held(fd);
        pthread_mutex_unlock(&lock);
    }
    return real_fdatasync(fd);
}

int close(int fd) {
    resolve();
    if (fd >= 0 && fd < MAX_FD && tracked[fd]) {
        pthread_mutex_lock(&lock);
        flush_held(fd);
        tracked[fd] = 0;
        pthread_mutex_unlock(&lock);
    }
    return real_close(fd);
}
