/*
 * metabench: the small, fast helper of bench/compare.sh. Every mode is timed inside this one
 * process, so the figures carry no fork/exec cost (a shell loop would measure mostly that).
 *
 *   metabench meta DIR N [-c]
 *       In DIR (created if missing): create N empty files (open O_CREAT|O_EXCL + close), then
 *       stat them all, then unlink them all, in creation order. With -c, the dentry and inode
 *       caches are dropped (echo 2 > /proc/sys/vm/drop_caches) between create and stat, so
 *       the stats are cold (they reach the file system, not the kernel's caches).
 *       Prints: "create OPS stat OPS unlink OPS" (operations per second).
 *
 *   metabench mkfiles DIR TOTAL PERDIR THREADS
 *       Creates TOTAL empty regular files (mknod: one request each on FUSE) as
 *       DIR/dNNNNN/fNNNNN, PERDIR per directory, with THREADS threads each taking whole
 *       directories. Prints: "files N dirs D seconds S rate R".
 *
 *   metabench statfiles DIR TOTAL PERDIR
 *       stat()s the files mkfiles made, in order, from one thread. Prints: "files N seconds S
 *       rate R".
 *
 *   metabench mounttime MOUNTPOINT TIMEOUT_MS CMD [ARGS...]
 *       Starts CMD (fork + exec; the clock starts just before fork), polls
 *       /proc/self/mountinfo until MOUNTPOINT is listed, then stat()s it (which needs the
 *       daemon to answer). Prints: "ready_ms R listed_ms L exited_ms E status S", where E is
 *       when CMD itself exited (-1 if it had not when the mount became ready; it is then
 *       waited for). Exit status 1 if the mount did not appear within TIMEOUT_MS.
 *
 *   metabench roundtrip FILE N
 *       N getxattr(FILE, "user.metabench.absent") calls, each answered ENODATA. The kernel
 *       caches no xattr answer of FUSE, so on a FUSE mount each call is exactly one GETXATTR
 *       request: the cost of the cheapest round trip a file system can answer. On an
 *       in-kernel file system it is the system call alone. Prints: "roundtrip_us U" (mean
 *       microseconds per call).
 *
 * Build: gcc -O2 -pthread -o metabench metabench.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/sysmacros.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what, const char *path) {
    fprintf(stderr, "metabench: %s %s: %s\n", what, path ? path : "", strerror(errno));
    exit(1);
}

static void drop_caches(const char *dir) {
    /* Only clean dentries and inodes can be dropped: write back this file system first
     * (syncfs, not sync, so that other file systems on the machine are left alone). */
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) die("open", dir);
    if (syncfs(dfd) < 0) die("syncfs", dir);
    close(dfd);
    int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
    if (fd < 0) die("open", "/proc/sys/vm/drop_caches");
    if (write(fd, "2\n", 2) != 2) die("write", "/proc/sys/vm/drop_caches");
    close(fd);
}

static int meta(const char *dir, long n, int cold) {
    char path[4096];
    struct stat st;
    if (mkdir(dir, 0755) < 0 && errno != EEXIST) die("mkdir", dir);

    double t0 = now();
    for (long i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/file-%07ld", dir, i);
        int fd = open(path, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0644);
        if (fd < 0) die("create", path);
        close(fd);
    }
    double t1 = now();
    if (cold) drop_caches(dir);
    double t2 = now();
    for (long i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/file-%07ld", dir, i);
        if (stat(path, &st) < 0) die("stat", path);
    }
    double t3 = now();
    for (long i = 0; i < n; i++) {
        snprintf(path, sizeof path, "%s/file-%07ld", dir, i);
        if (unlink(path) < 0) die("unlink", path);
    }
    double t4 = now();
    printf("create %.0f stat %.0f unlink %.0f\n", n / (t1 - t0), n / (t3 - t2), n / (t4 - t3));
    return 0;
}

struct mk_args {
    const char *dir;
    long total, perdir, ndirs;
    long next_dir; /* shared, taken under lock */
    pthread_mutex_t lock;
};

static void *mk_worker(void *p) {
    struct mk_args *a = p;
    char path[4096];
    for (;;) {
        pthread_mutex_lock(&a->lock);
        long d = a->next_dir++;
        pthread_mutex_unlock(&a->lock);
        if (d >= a->ndirs) return NULL;
        snprintf(path, sizeof path, "%s/d%05ld", a->dir, d);
        if (mkdir(path, 0755) < 0 && errno != EEXIST) die("mkdir", path);
        long first = d * a->perdir;
        long last = first + a->perdir;
        if (last > a->total) last = a->total;
        for (long i = first; i < last; i++) {
            snprintf(path, sizeof path, "%s/d%05ld/f%07ld", a->dir, d, i);
            if (mknod(path, S_IFREG | 0644, 0) < 0 && errno != EEXIST) die("mknod", path);
        }
    }
}

static int mkfiles(const char *dir, long total, long perdir, int threads) {
    struct mk_args a = {.dir = dir, .total = total, .perdir = perdir};
    a.ndirs = (total + perdir - 1) / perdir;
    pthread_mutex_init(&a.lock, NULL);
    if (mkdir(dir, 0755) < 0 && errno != EEXIST) die("mkdir", dir);
    pthread_t t[64];
    if (threads < 1) threads = 1;
    if (threads > 64) threads = 64;
    double t0 = now();
    for (int i = 0; i < threads; i++) pthread_create(&t[i], NULL, mk_worker, &a);
    for (int i = 0; i < threads; i++) pthread_join(t[i], NULL);
    double t1 = now();
    printf("files %ld dirs %ld seconds %.3f rate %.0f\n", total, a.ndirs, t1 - t0,
           total / (t1 - t0));
    return 0;
}

static int statfiles(const char *dir, long total, long perdir) {
    char path[4096];
    struct stat st;
    double t0 = now();
    for (long i = 0; i < total; i++) {
        snprintf(path, sizeof path, "%s/d%05ld/f%07ld", dir, i / perdir, i);
        if (stat(path, &st) < 0) die("stat", path);
    }
    double t1 = now();
    printf("files %ld seconds %.3f rate %.0f\n", total, t1 - t0, total / (t1 - t0));
    return 0;
}

/* Is `mnt` a mount point in /proc/self/mountinfo (field 5)? */
static int listed(const char *mnt) {
    static char buf[1 << 20];
    int fd = open("/proc/self/mountinfo", O_RDONLY | O_CLOEXEC);
    if (fd < 0) die("open", "/proc/self/mountinfo");
    size_t len = 0;
    ssize_t r;
    while (len < sizeof buf - 1 && (r = read(fd, buf + len, sizeof buf - 1 - len)) > 0) len += r;
    close(fd);
    buf[len] = 0;
    size_t ml = strlen(mnt);
    for (char *line = buf; line && *line;) {
        char *eol = strchr(line, '\n');
        if (eol) *eol = 0;
        /* fields: id parent major:minor root mountpoint ... */
        char *f = line;
        for (int k = 0; k < 4 && f; k++) {
            f = strchr(f, ' ');
            if (f) f++;
        }
        if (f && strncmp(f, mnt, ml) == 0 && (f[ml] == ' ' || f[ml] == 0)) return 1;
        line = eol ? eol + 1 : NULL;
    }
    return 0;
}

static int mounttime(const char *mnt, long timeout_ms, char **cmd) {
    if (listed(mnt)) {
        fprintf(stderr, "metabench: %s is already a mount point\n", mnt);
        return 1;
    }
    double t0 = now();
    pid_t pid = fork();
    if (pid < 0) die("fork", NULL);
    if (pid == 0) {
        execvp(cmd[0], cmd);
        _exit(127);
    }
    double listed_at = -1, exited_at = -1;
    int status = -1, wst;
    for (;;) {
        if (exited_at < 0 && waitpid(pid, &wst, WNOHANG) == pid) {
            exited_at = now();
            status = WIFEXITED(wst) ? WEXITSTATUS(wst) : 128 + WTERMSIG(wst);
        }
        if (listed(mnt)) {
            listed_at = now();
            break;
        }
        struct timespec nap = {0, 50000}; /* 50 us: do not steal the daemon's CPU */
        nanosleep(&nap, NULL);
        if ((now() - t0) * 1000 > timeout_ms) {
            fprintf(stderr, "metabench: %s did not appear in /proc/self/mountinfo\n", mnt);
            if (exited_at < 0) waitpid(pid, &wst, 0);
            return 1;
        }
    }
    struct stat st;
    if (stat(mnt, &st) < 0) die("stat", mnt);
    double ready_at = now();
    double exited_ms = exited_at < 0 ? -1 : (exited_at - t0) * 1000;
    if (exited_at < 0) {
        waitpid(pid, &wst, 0);
        status = WIFEXITED(wst) ? WEXITSTATUS(wst) : 128 + WTERMSIG(wst);
    }
    printf("ready_ms %.2f listed_ms %.2f exited_ms %.2f status %d\n", (ready_at - t0) * 1000,
           (listed_at - t0) * 1000, exited_ms, status);
    return status == 0 ? 0 : 1;
}

static void usage(void) {
    fprintf(stderr,
            "usage: metabench meta DIR N [-c]\n"
            "       metabench mkfiles DIR TOTAL PERDIR THREADS\n"
            "       metabench statfiles DIR TOTAL PERDIR\n"
            "       metabench mounttime MOUNTPOINT TIMEOUT_MS CMD [ARGS...]\n"
            "       metabench roundtrip FILE N\n");
    exit(2);
}

/* One GETXATTR round trip per call on FUSE (see the header). */
static int roundtrip(const char *file, long n) {
    char value[16];
    /* A first call outside the clock: the inode's lookup and attributes are cached. */
    if (getxattr(file, "user.metabench.absent", value, sizeof value) >= 0 || errno != ENODATA)
        die("getxattr (expected ENODATA)", file);
    double t0 = now();
    for (long i = 0; i < n; i++) {
        if (getxattr(file, "user.metabench.absent", value, sizeof value) >= 0 || errno != ENODATA)
            die("getxattr (expected ENODATA)", file);
    }
    double t = now() - t0;
    printf("roundtrip_us %.2f\n", t / n * 1e6);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) usage();
    if (strcmp(argv[1], "meta") == 0 && (argc == 4 || argc == 5))
        return meta(argv[2], atol(argv[3]), argc == 5 && strcmp(argv[4], "-c") == 0);
    if (strcmp(argv[1], "mkfiles") == 0 && argc == 6)
        return mkfiles(argv[2], atol(argv[3]), atol(argv[4]), atoi(argv[5]));
    if (strcmp(argv[1], "statfiles") == 0 && argc == 5)
        return statfiles(argv[2], atol(argv[3]), atol(argv[4]));
    if (strcmp(argv[1], "mounttime") == 0 && argc >= 5)
        return mounttime(argv[2], atol(argv[3]), argv + 4);
    if (strcmp(argv[1], "roundtrip") == 0 && argc == 4) return roundtrip(argv[2], atol(argv[3]));
    usage();
    return 2;
}
