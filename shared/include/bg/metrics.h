/*
 * Prometheus metrics: one process-wide registry of counters, gauges and histograms, rendered in the
 * text exposition format 0.0.4 for /metrics.
 *
 * A family has a name, a help line and a fixed list of label names; a child (one time series, or
 * one set of buckets) exists per distinct list of label values and is created on first use. Every
 * function is thread-safe: edge loops and worker threads update the same families. Updates are
 * atomic operations on the child; finding the child takes a read lock on its family, and only a new
 * label combination takes the write lock.
 *
 * Label values often come from requests (a route, a status, a model name), so a family holds at
 * most bg_metrics_max_children() children (10,000 by default). Past that, updates for new
 * combinations go to one child whose label values are all "overflow", and a warning is logged once
 * per family, so a label explosion costs a log line instead of the process's memory.
 *
 * Families live as long as the process. Registration is meant for start-up, but is safe at any
 * time.
 */
#ifndef BG_METRICS_H
#define BG_METRICS_H

#include "bg/buf.h"
#include "bg/common.h"

typedef struct bg_metrics_counter bg_metrics_counter_t;
typedef struct bg_metrics_gauge bg_metrics_gauge_t;
typedef struct bg_metrics_histogram bg_metrics_histogram_t;

/** The default bucket bounds for latencies, in seconds (5 ms to 120 s). */
extern const double bg_metrics_latency_buckets[];
/** Number of entries of bg_metrics_latency_buckets. */
extern const size_t bg_metrics_latency_buckets_count;

/** The label value of the child that collects updates past the cap on children. */
#define BG_METRICS_OVERFLOW_VALUE "overflow"

/*
 * Registration. name must match [a-zA-Z_:][a-zA-Z0-9_:]*, label names [a-zA-Z_][a-zA-Z0-9_]*
 * without a leading "__" (and not "le" for histograms); labels is NULL-terminated, or NULL for
 * none; name, help and labels are copied. Registering a name again with the same type and labels
 * (and bounds) returns the family registered first. Returns NULL, after logging an error, for an
 * invalid name or a name already registered differently: a programmer error, and every update on
 * NULL is a no-op so a mistake in a metric never takes a request down.
 */

/** Registers (or finds) a counter family. */
bg_metrics_counter_t *bg_metrics_counter(const char *name, const char *help,
                                         const char *const labels[]);
/** Registers (or finds) a gauge family. */
bg_metrics_gauge_t *bg_metrics_gauge(const char *name, const char *help,
                                     const char *const labels[]);
/**
 * Registers (or finds) a histogram family with the given upper bounds (strictly increasing, finite;
 * the +Inf bucket is implicit and copied). bounds NULL: bg_metrics_latency_buckets.
 */
bg_metrics_histogram_t *bg_metrics_histogram(const char *name, const char *help,
                                             const char *const labels[], const double *bounds,
                                             size_t nbounds);

/*
 * Updates. values holds one value per label name of the family, in the same order (NULL entries are
 * taken as ""); it may be NULL for a family without labels. Values are copied when a child is made.
 */

/** Adds v (ignored unless v >= 0: counters only go up). */
void bg_metrics_counter_add(bg_metrics_counter_t *c, const char *const values[], double v);
/** Adds 1. */
void bg_metrics_counter_inc(bg_metrics_counter_t *c, const char *const values[]);
void bg_metrics_gauge_set(bg_metrics_gauge_t *g, const char *const values[], double v);
void bg_metrics_gauge_add(bg_metrics_gauge_t *g, const char *const values[], double v);
/** Counts v into its bucket and adds it to the sum (NaN is ignored). */
void bg_metrics_histogram_observe(bg_metrics_histogram_t *h, const char *const values[], double v);

/** Sets the cap on children per family (at least 1); families that are past it keep what they have.
 */
void bg_metrics_set_max_children(size_t n);
/** Returns the cap on children per family. */
size_t bg_metrics_max_children(void);

/**
 * Appends every family, then the process metrics (process_cpu_seconds_total,
 * process_resident_memory_bytes, process_virtual_memory_bytes, process_open_fds, process_max_fds,
 * process_start_time_seconds, read from /proc), in the text format 0.0.4 (content type
 * "text/plain; version=0.0.4; charset=utf-8"). Returns 0, or BG_ERR_TOO_LARGE when out's cap was
 * reached (out is then left as it was).
 */
BG_MUSTCHECK int bg_metrics_render(bg_buf_t *out);

#endif
