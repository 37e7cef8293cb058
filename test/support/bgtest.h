/*
 * Test support: private Redis servers, fresh Postgres databases with the real migrations, child
 * processes of the real binaries, and a small HTTP client (libcurl, HTTP/1.1 or HTTP/2).
 *
 * Every integration test owns what it starts: a Redis server per test (free port, temp dir), a
 * database per test on the suite's Postgres server (BG_TEST_DATABASE_URL, set by
 * scripts/test-stack.sh), and its child processes. Nothing is shared between tests but that server.
 */
#ifndef BGTEST_H
#define BGTEST_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

/** A private redis-server. */
typedef struct bgt_redis {
    pid_t pid;
    int port;
    char dir[256];
    char url[128];
} bgt_redis_t;

/** Starts redis-server on a free loopback port; returns 0 once it answers PING, else -1. */
int bgt_redis_start(bgt_redis_t *r);
/** Stops it (SIGTERM, then SIGKILL) and removes its directory. */
void bgt_redis_stop(bgt_redis_t *r);
/** Pauses (SIGSTOP) or resumes (SIGCONT) the server, to simulate an unresponsive Redis. */
void bgt_redis_pause(bgt_redis_t *r, bool paused);

/** A database of its own on the suite's Postgres server. */
typedef struct bgt_pg {
    char name[64];
    char url[512];
} bgt_pg_t;

/**
 * Creates a fresh database; with migrate, applies the real migrations through `bgctl migrate`.
 * Skips the calling test (cr_skip) when BG_TEST_DATABASE_URL is not set. Returns 0 or -1.
 */
int bgt_pg_create(bgt_pg_t *db, bool migrate);
/** Drops the database (terminating its connections). */
void bgt_pg_drop(bgt_pg_t *db);

/** Returns a free TCP port on 127.0.0.1 (bound and released, so a race is possible but rare). */
int bgt_free_port(void);

/** Returns the path of a built binary ("bg-edge", "bg-worker", "bgctl"); static storage per call
 * site. */
const char *bgt_bin(const char *name);

/**
 * Starts a child process with the current environment plus env (NULL-terminated "NAME=value"
 * strings; may be NULL), stdout and stderr appended to log_path (or inherited when NULL).
 * Returns the pid, or -1.
 */
pid_t bgt_spawn(const char *const argv[], const char *const env[], const char *log_path);

/** Waits up to timeout_ms for pid to exit; returns its wait status, or -1 on timeout. */
int bgt_wait(pid_t pid, int timeout_ms);

/** Sends sig, then waits up to timeout_ms; SIGKILLs it after that. Returns the wait status. */
int bgt_stop(pid_t pid, int sig, int timeout_ms);

/**
 * Runs a command to completion (env as in bgt_spawn), capturing stdout+stderr into out
 * (NUL-terminated, cut at outlen). Returns its exit status (0..255), or -1 when it could not run or
 * was killed.
 */
int bgt_run(const char *const argv[], const char *const env[], char *out, size_t outlen);

/** Response of bgt_http. */
typedef struct bgt_resp {
    long status;  /**< 0 when the request failed at transport level */
    long version; /**< 1 = HTTP/1.x, 2 = HTTP/2 */
    char *body;   /**< owned, NUL-terminated */
    size_t body_len;
    char *headers; /**< owned, raw header block (lower-case names for h2) */
    char error[256];
} bgt_resp_t;

enum {
    BGT_H1 = 0,     /**< HTTP/1.1 */
    BGT_H2C = 1,    /**< HTTP/2 with prior knowledge, cleartext */
    BGT_H2_TLS = 2, /**< https with ALPN, certificate not verified */
    BGT_H2C_UPGRADE = 3
};

/**
 * Performs one request. headers is NULL-terminated "Name: value" strings (may be NULL); body may be
 * NULL. Returns 0 when a response arrived (any status), -1 otherwise (see resp->error).
 */
int bgt_http(int mode, const char *method, const char *url, const char *const headers[],
             const char *body, size_t body_len, bgt_resp_t *resp);
/** Frees a response. */
void bgt_resp_free(bgt_resp_t *resp);
/** Returns the value of a response header (case-insensitive name) copied into buf, or NULL. */
const char *bgt_resp_header(const bgt_resp_t *resp, const char *name, char *buf, size_t buflen);

/** Polls GET url until it answers want_status or timeout_ms passes; returns 0 or -1. */
int bgt_wait_http(const char *url, long want_status, int timeout_ms);

/** Milliseconds from a monotonic clock. */
long long bgt_now_ms(void);

/** Makes a temporary directory under $TMPDIR and writes its path into out. Returns 0 or -1. */
int bgt_tempdir(char *out, size_t outlen);
/** Removes a directory tree (rm -rf). */
void bgt_rmtree(const char *path);

#endif
