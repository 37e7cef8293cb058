/*
 * The Prometheus registry.
 *
 * Families sit in a list under one mutex, touched only by registration and rendering. Each family
 * has a read-write lock over its children: a chained hash table for lookup and an array that keeps
 * creation order for rendering. Children are never removed, so a pointer found under the read lock
 * stays valid after it is released, and the update itself is a lock-free atomic operation. Doubles
 * are kept as their bit patterns in 64-bit atomics and added with a compare-and-swap loop;
 * histogram buckets are plain atomic counts, made cumulative only when rendered, and _count is
 * rendered as the +Inf bucket so the two can never disagree within one scrape.
 */
#include <dirent.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "bg/err.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/metrics.h"

typedef enum kind { KIND_COUNTER, KIND_GAUGE, KIND_HISTOGRAM } kind_t;

typedef struct st_child_t {
    struct st_child_t *next; /**< in its hash chain */
    uint64_t hash;
    char **values;          /**< owned, one per label */
    _Atomic uint64_t value; /**< bits of a double: counter or gauge value, histogram sum */
    _Atomic uint64_t
        *counts; /**< owned, histograms only: nbounds + 1 bucket counts (last is +Inf) */
} child_t;

typedef struct st_family_t {
    kind_t kind;
    char *name; /**< owned */
    char *help; /**< owned */
    size_t nlabels;
    char **labels; /**< owned */
    size_t nbounds;
    double *bounds; /**< owned, histograms only */
    pthread_rwlock_t lock;
    child_t **table; /**< owned, nbuckets chains */
    size_t nbuckets;
    child_t **children; /**< owned array of owned children, in creation order */
    size_t nchildren;
    size_t cap;
    bool overflow_logged;
    struct st_family_t *next;
} family_t;

/* The public types are families; each wraps one so that conversions stay well-defined. */
struct bg_metrics_counter {
    family_t fam;
};
struct bg_metrics_gauge {
    family_t fam;
};
struct bg_metrics_histogram {
    family_t fam;
};

const double bg_metrics_latency_buckets[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                             1,     2.5,  5,     10,   30,  60,   120};
const size_t bg_metrics_latency_buckets_count = BG_ARRAY_SIZE(bg_metrics_latency_buckets);

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static family_t *families; /* owned list, newest last */
static _Atomic size_t max_children = 10000;

void bg_metrics_set_max_children(size_t n)
{
    atomic_store(&max_children, n == 0 ? 1 : n);
}

size_t bg_metrics_max_children(void)
{
    return atomic_load(&max_children);
}

/* ---- atomics on doubles --------------------------------------------------------------------- */

static uint64_t to_bits(double d)
{
    uint64_t u;
    memcpy(&u, &d, sizeof(u));
    return u;
}

static double from_bits(uint64_t u)
{
    double d;
    memcpy(&d, &u, sizeof(d));
    return d;
}

static void atomic_add_double(_Atomic uint64_t *p, double v)
{
    uint64_t old = atomic_load_explicit(p, memory_order_relaxed);
    while (!atomic_compare_exchange_weak_explicit(p, &old, to_bits(from_bits(old) + v),
                                                  memory_order_relaxed, memory_order_relaxed)) {
    }
}

/* ---- registration --------------------------------------------------------------------------- */

static bool valid_name(const char *s, bool colon)
{
    if (s == NULL || s[0] == '\0')
        return false;
    for (size_t i = 0; s[i] != '\0'; i++) {
        char c = s[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
                  (colon && c == ':') || (i > 0 && c >= '0' && c <= '9');
        if (!ok)
            return false;
    }
    return true;
}

static size_t count_labels(const char *const labels[])
{
    size_t n = 0;
    while (labels != NULL && labels[n] != NULL)
        n++;
    return n;
}

static bool same_shape(const family_t *f, kind_t kind, const char *const labels[],
                       const double *bounds, size_t nbounds)
{
    if (f->kind != kind || f->nlabels != count_labels(labels))
        return false;
    for (size_t i = 0; i < f->nlabels; i++) {
        if (strcmp(f->labels[i], labels[i]) != 0)
            return false;
    }
    if (kind == KIND_HISTOGRAM) {
        if (f->nbounds != nbounds)
            return false;
        for (size_t i = 0; i < nbounds; i++) {
            if (f->bounds[i] != bounds[i])
                return false;
        }
    }
    return true;
}

static child_t *child_new(const family_t *f, uint64_t hash, const char *const values[])
{
    child_t *c = bg_calloc(1, sizeof(*c));
    c->hash = hash;
    c->values = bg_calloc(f->nlabels, sizeof(*c->values));
    for (size_t i = 0; i < f->nlabels; i++) {
        const char *v = values != NULL && values[i] != NULL ? values[i] : "";
        c->values[i] = bg_strdup(v);
    }
    atomic_init(&c->value, to_bits(0.0));
    if (f->kind == KIND_HISTOGRAM) {
        c->counts = bg_calloc(f->nbounds + 1, sizeof(*c->counts));
        for (size_t i = 0; i <= f->nbounds; i++)
            atomic_init(&c->counts[i], 0);
    }
    return c;
}

/* Validates the arguments and builds a family; returns NULL (logged) when they are invalid. */
static family_t *family_new(size_t size, kind_t kind, const char *name, const char *help,
                            const char *const labels[], const double *bounds, size_t nbounds)
{
    size_t nlabels = count_labels(labels);
    for (size_t i = 0; i < nlabels; i++) {
        if (!valid_name(labels[i], false) || strncmp(labels[i], "__", 2) == 0 ||
            (kind == KIND_HISTOGRAM && strcmp(labels[i], "le") == 0)) {
            bg_error("metrics: %s: invalid label name \"%s\"", name, labels[i]);
            return NULL;
        }
    }
    for (size_t i = 0; i < nbounds; i++) {
        if (!isfinite(bounds[i]) || (i > 0 && bounds[i] <= bounds[i - 1])) {
            bg_error("metrics: %s: bucket bounds must be finite and increasing", name);
            return NULL;
        }
    }
    family_t *f = bg_calloc(1, size);
    f->kind = kind;
    f->name = bg_strdup(name);
    f->help = bg_strdup(help != NULL ? help : "");
    f->nlabels = nlabels;
    f->labels = bg_calloc(nlabels, sizeof(*f->labels));
    for (size_t i = 0; i < nlabels; i++)
        f->labels[i] = bg_strdup(labels[i]);
    if (kind == KIND_HISTOGRAM) {
        f->nbounds = nbounds;
        f->bounds = bg_calloc(nbounds, sizeof(*f->bounds));
        if (nbounds > 0)
            memcpy(f->bounds, bounds, nbounds * sizeof(*bounds));
    }
    pthread_rwlock_init(&f->lock, NULL);
    if (nlabels == 0) {
        /* The one series of a family without labels exists from the start, at zero. */
        f->cap = 1;
        f->children = bg_calloc(1, sizeof(*f->children));
        f->children[f->nchildren++] = child_new(f, 0, NULL);
    }
    return f;
}

static family_t *registry_add(size_t size, kind_t kind, const char *name, const char *help,
                              const char *const labels[], const double *bounds, size_t nbounds)
{
    if (!valid_name(name, true)) {
        bg_error("metrics: invalid metric name \"%s\"", name != NULL ? name : "(null)");
        return NULL;
    }
    pthread_mutex_lock(&registry_lock);
    family_t **tail = &families;
    for (family_t *f = families; f != NULL; f = f->next) {
        if (strcmp(f->name, name) == 0) {
            bool same = same_shape(f, kind, labels, bounds, nbounds);
            pthread_mutex_unlock(&registry_lock);
            if (!same)
                bg_error("metrics: %s registered again with another type, labels or buckets", name);
            return same ? f : NULL;
        }
        tail = &f->next;
    }
    family_t *f = family_new(size, kind, name, help, labels, bounds, nbounds);
    if (f != NULL)
        *tail = f;
    pthread_mutex_unlock(&registry_lock);
    return f;
}

bg_metrics_counter_t *bg_metrics_counter(const char *name, const char *help,
                                         const char *const labels[])
{
    family_t *f =
        registry_add(sizeof(bg_metrics_counter_t), KIND_COUNTER, name, help, labels, NULL, 0);
    return (bg_metrics_counter_t *)f;
}

bg_metrics_gauge_t *bg_metrics_gauge(const char *name, const char *help, const char *const labels[])
{
    family_t *f = registry_add(sizeof(bg_metrics_gauge_t), KIND_GAUGE, name, help, labels, NULL, 0);
    return (bg_metrics_gauge_t *)f;
}

bg_metrics_histogram_t *bg_metrics_histogram(const char *name, const char *help,
                                             const char *const labels[], const double *bounds,
                                             size_t nbounds)
{
    if (bounds == NULL) {
        bounds = bg_metrics_latency_buckets;
        nbounds = bg_metrics_latency_buckets_count;
    }
    family_t *f = registry_add(sizeof(bg_metrics_histogram_t), KIND_HISTOGRAM, name, help, labels,
                               bounds, nbounds);
    return (bg_metrics_histogram_t *)f;
}

/* ---- children ------------------------------------------------------------------------------- */

static const char *value_at(const char *const values[], size_t i)
{
    return values != NULL && values[i] != NULL ? values[i] : "";
}

static uint64_t hash_values(const family_t *f, const char *const values[])
{
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < f->nlabels; i++) {
        /* The terminating NUL separates values, so ("ab","") and ("a","b") differ. */
        const unsigned char *s = (const unsigned char *)value_at(values, i);
        do {
            h ^= *s;
            h *= 1099511628211ULL;
        } while (*s++ != '\0');
    }
    return h;
}

static child_t *find_locked(const family_t *f, uint64_t hash, const char *const values[])
{
    if (f->nbuckets == 0)
        return NULL;
    for (child_t *c = f->table[hash & (f->nbuckets - 1)]; c != NULL; c = c->next) {
        if (c->hash != hash)
            continue;
        size_t i = 0;
        while (i < f->nlabels && strcmp(c->values[i], value_at(values, i)) == 0)
            i++;
        if (i == f->nlabels)
            return c;
    }
    return NULL;
}

static child_t *insert_locked(family_t *f, uint64_t hash, const char *const values[])
{
    if (f->nchildren == f->cap) {
        f->cap = f->cap == 0 ? 8 : f->cap * 2;
        f->children = bg_realloc(f->children, f->cap * sizeof(*f->children));
    }
    if (f->nchildren + 1 > f->nbuckets) {
        size_t n = f->nbuckets == 0 ? 16 : f->nbuckets * 2;
        child_t **table = bg_calloc(n, sizeof(*table));
        for (size_t i = 0; i < f->nchildren; i++) {
            child_t *c = f->children[i];
            c->next = table[c->hash & (n - 1)];
            table[c->hash & (n - 1)] = c;
        }
        free(f->table);
        f->table = table;
        f->nbuckets = n;
    }
    child_t *c = child_new(f, hash, values);
    c->next = f->table[hash & (f->nbuckets - 1)];
    f->table[hash & (f->nbuckets - 1)] = c;
    f->children[f->nchildren++] = c;
    return c;
}

/* Returns the child for values, made on first use; the overflow child once the family is full. */
static child_t *child_get(family_t *f, const char *const values[])
{
    if (f->nlabels == 0)
        return f->children[0];
    uint64_t hash = hash_values(f, values);
    pthread_rwlock_rdlock(&f->lock);
    child_t *c = find_locked(f, hash, values);
    pthread_rwlock_unlock(&f->lock);
    if (c != NULL)
        return c;

    pthread_rwlock_wrlock(&f->lock);
    /* Another thread may have made it between the two locks. */
    c = find_locked(f, hash, values);
    if (c == NULL && f->nchildren < bg_metrics_max_children()) {
        c = insert_locked(f, hash, values);
    } else if (c == NULL) {
        bool first = !f->overflow_logged;
        f->overflow_logged = true;
        const char **ov = bg_calloc(f->nlabels, sizeof(*ov));
        for (size_t i = 0; i < f->nlabels; i++)
            ov[i] = BG_METRICS_OVERFLOW_VALUE;
        uint64_t ovhash = hash_values(f, ov);
        c = find_locked(f, ovhash, ov);
        /* The overflow child is the one allowed past the cap. */
        if (c == NULL)
            c = insert_locked(f, ovhash, ov);
        free(ov);
        if (first)
            bg_warn("metrics: %s has %zu series, the cap; new label values go to \"%s\"", f->name,
                    bg_metrics_max_children(), BG_METRICS_OVERFLOW_VALUE);
    }
    pthread_rwlock_unlock(&f->lock);
    return c;
}

void bg_metrics_counter_add(bg_metrics_counter_t *c, const char *const values[], double v)
{
    if (c == NULL || !(v >= 0))
        return;
    atomic_add_double(&child_get(&c->fam, values)->value, v);
}

void bg_metrics_counter_inc(bg_metrics_counter_t *c, const char *const values[])
{
    bg_metrics_counter_add(c, values, 1);
}

void bg_metrics_gauge_set(bg_metrics_gauge_t *g, const char *const values[], double v)
{
    if (g == NULL)
        return;
    atomic_store_explicit(&child_get(&g->fam, values)->value, to_bits(v), memory_order_relaxed);
}

void bg_metrics_gauge_add(bg_metrics_gauge_t *g, const char *const values[], double v)
{
    if (g == NULL)
        return;
    atomic_add_double(&child_get(&g->fam, values)->value, v);
}

void bg_metrics_histogram_observe(bg_metrics_histogram_t *h, const char *const values[], double v)
{
    if (h == NULL || isnan(v))
        return;
    const family_t *f = &h->fam;
    size_t i = 0;
    while (i < f->nbounds && v > f->bounds[i])
        i++;
    child_t *c = child_get(&h->fam, values);
    atomic_fetch_add_explicit(&c->counts[i], 1, memory_order_relaxed);
    atomic_add_double(&c->value, v);
}

/* ---- rendering ------------------------------------------------------------------------------ */

/* Formats a sample value as Prometheus parses it: shortest round-trip form, +Inf, -Inf, NaN. */
static void format_value(char *out, size_t outlen, double v)
{
    if (isnan(v)) {
        snprintf(out, outlen, "NaN");
    } else if (isinf(v)) {
        snprintf(out, outlen, v > 0 ? "+Inf" : "-Inf");
    } else {
        snprintf(out, outlen, "%.15g", v);
        if (strtod(out, NULL) != v)
            snprintf(out, outlen, "%.17g", v);
    }
}

/* Appends s escaped for a HELP line (quote false) or a label value (quote true). Invalid UTF-8
 * bytes become '?' so that a scraper never rejects the whole page for one bad label value. */
static int put_escaped(bg_buf_t *out, const char *s, bool quote)
{
    bool utf8 = bg_json_utf8_is_valid(s, strlen(s));
    int r = 0;
    for (; *s != '\0' && r == 0; s++) {
        char c = *s;
        if (c == '\\')
            r = bg_buf_puts(out, "\\\\");
        else if (c == '\n')
            r = bg_buf_puts(out, "\\n");
        else if (c == '"' && quote)
            r = bg_buf_puts(out, "\\\"");
        else if (!utf8 && (unsigned char)c >= 0x80)
            r = bg_buf_putc(out, '?');
        else
            r = bg_buf_putc(out, c);
    }
    return r;
}

/* Appends {a="x",b="y"[,le="bound"]}, or nothing when there is no label at all. */
static int put_labels(bg_buf_t *out, const family_t *f, const child_t *c, const char *le)
{
    if (f->nlabels == 0 && le == NULL)
        return 0;
    int r = bg_buf_putc(out, '{');
    for (size_t i = 0; i < f->nlabels && r == 0; i++) {
        r = bg_buf_printf(out, "%s%s=\"", i > 0 ? "," : "", f->labels[i]);
        if (r == 0)
            r = put_escaped(out, c->values[i], true);
        if (r == 0)
            r = bg_buf_putc(out, '"');
    }
    if (r == 0 && le != NULL)
        r = bg_buf_printf(out, "%sle=\"%s\"", f->nlabels > 0 ? "," : "", le);
    if (r == 0)
        r = bg_buf_putc(out, '}');
    return r;
}

static int put_sample(bg_buf_t *out, const family_t *f, const char *suffix, const child_t *c,
                      const char *le, double v)
{
    char num[32];
    format_value(num, sizeof(num), v);
    int r = bg_buf_printf(out, "%s%s", f->name, suffix);
    if (r == 0)
        r = put_labels(out, f, c, le);
    if (r == 0)
        r = bg_buf_printf(out, " %s\n", num);
    return r;
}

static int render_histogram_child(bg_buf_t *out, const family_t *f, const child_t *c)
{
    uint64_t cum = 0;
    int r = 0;
    for (size_t i = 0; i <= f->nbounds && r == 0; i++) {
        char le[32];
        cum += atomic_load_explicit(&c->counts[i], memory_order_relaxed);
        if (i < f->nbounds)
            format_value(le, sizeof(le), f->bounds[i]);
        else
            snprintf(le, sizeof(le), "+Inf");
        r = put_sample(out, f, "_bucket", c, le, (double)cum);
    }
    if (r == 0)
        r = put_sample(out, f, "_sum", c, NULL,
                       from_bits(atomic_load_explicit(&c->value, memory_order_relaxed)));
    if (r == 0)
        r = put_sample(out, f, "_count", c, NULL, (double)cum);
    return r;
}

static int render_family(bg_buf_t *out, family_t *f)
{
    static const char *const types[] = {"counter", "gauge", "histogram"};
    int r = bg_buf_printf(out, "# HELP %s ", f->name);
    if (r == 0)
        r = put_escaped(out, f->help, false);
    if (r == 0)
        r = bg_buf_printf(out, "\n# TYPE %s %s\n", f->name, types[f->kind]);
    pthread_rwlock_rdlock(&f->lock);
    for (size_t i = 0; i < f->nchildren && r == 0; i++) {
        const child_t *c = f->children[i];
        if (f->kind == KIND_HISTOGRAM)
            r = render_histogram_child(out, f, c);
        else
            r = put_sample(out, f, "", c, NULL,
                           from_bits(atomic_load_explicit(&c->value, memory_order_relaxed)));
    }
    pthread_rwlock_unlock(&f->lock);
    return r;
}

/* Reads a small /proc file into buf (NUL-terminated); returns false when it cannot. */
static bool read_proc(const char *path, char *buf, size_t len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return false;
    ssize_t n = read(fd, buf, len - 1);
    close(fd);
    if (n <= 0)
        return false;
    buf[n] = '\0';
    return true;
}

/* Returns field `index` (1-based, as in proc(5)) of /proc/self/stat, or -1. */
static double stat_field(const char *stat, int index)
{
    /* The command name (field 2) may hold spaces and parentheses: count from its closing one. */
    const char *p = strrchr(stat, ')');
    if (p == NULL)
        return -1;
    p++;
    for (int field = 3; *p != '\0'; field++) {
        while (*p == ' ')
            p++;
        if (field == index)
            return strtod(p, NULL);
        while (*p != ' ' && *p != '\0')
            p++;
    }
    return -1;
}

static double boot_time(void)
{
    char buf[8192];
    if (!read_proc("/proc/stat", buf, sizeof(buf)))
        return -1;
    const char *p = strstr(buf, "\nbtime ");
    return p != NULL ? strtod(p + 7, NULL) : -1;
}

static double open_fds(void)
{
    DIR *d = opendir("/proc/self/fd");
    if (d == NULL)
        return -1;
    double n = 0;
    /* The stream is local to this call, so readdir's shared-stream hazard does not apply. */
    while (readdir(d) != NULL) // NOLINT(concurrency-mt-unsafe)
        n++;
    closedir(d);
    return n - 3; /* ".", ".." and the descriptor of the listing itself */
}

typedef struct st_process_metric_t {
    const char *name;
    const char *type;
    const char *help;
    double value;
} process_metric_t;

static int render_process(bg_buf_t *out)
{
    char stat[1024], statm[256];
    double ticks = (double)sysconf(_SC_CLK_TCK);
    double page = (double)sysconf(_SC_PAGESIZE);
    double cpu = -1, start = -1, vsize = -1, rss = -1, max_fds = -1;
    if (read_proc("/proc/self/stat", stat, sizeof(stat)) && ticks > 0) {
        double utime = stat_field(stat, 14), stime = stat_field(stat, 15);
        double started = stat_field(stat, 22), btime = boot_time();
        if (utime >= 0 && stime >= 0)
            cpu = (utime + stime) / ticks;
        if (started >= 0 && btime >= 0)
            start = btime + started / ticks;
    }
    if (read_proc("/proc/self/statm", statm, sizeof(statm))) {
        char *end;
        vsize = strtod(statm, &end) * page;
        rss = strtod(end, NULL) * page;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0)
        max_fds = rl.rlim_cur == RLIM_INFINITY ? INFINITY : (double)rl.rlim_cur;

    const process_metric_t metrics[] = {
        {"process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.",
         cpu},
        {"process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss},
        {"process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", vsize},
        {"process_open_fds", "gauge", "Number of open file descriptors.", open_fds()},
        {"process_max_fds", "gauge", "Maximum number of open file descriptors.", max_fds},
        {"process_start_time_seconds", "gauge",
         "Start time of the process since unix epoch in seconds.", start},
    };
    int r = 0;
    for (size_t i = 0; i < BG_ARRAY_SIZE(metrics) && r == 0; i++) {
        const process_metric_t *m = &metrics[i];
        /* A value /proc would not give is left out rather than reported as a false zero. */
        if (m->value < 0)
            continue;
        char num[32];
        format_value(num, sizeof(num), m->value);
        r = bg_buf_printf(out, "# HELP %s %s\n# TYPE %s %s\n%s %s\n", m->name, m->help, m->name,
                          m->type, m->name, num);
    }
    return r;
}

int bg_metrics_render(bg_buf_t *out)
{
    size_t start = out->len;
    int r = 0;
    pthread_mutex_lock(&registry_lock);
    for (family_t *f = families; f != NULL && r == 0; f = f->next)
        r = render_family(out, f);
    pthread_mutex_unlock(&registry_lock);
    if (r == 0)
        r = render_process(out);
    if (r != 0) {
        out->len = start;
        if (out->base != NULL)
            out->base[start] = '\0';
    }
    return r;
}
