/*
 * bg-fake-smtp: a small SMTP server for the notification tests (test/integration/test_notify.c).
 *
 *   bg-fake-smtp PORT DIR
 *
 * It speaks as much of RFC 5321 as libcurl's SMTP client uses: a 220 greeting, EHLO (or HELO),
 * MAIL FROM, RCPT TO (several), DATA up to the line ".", RSET, NOOP, QUIT; anything else is 502.
 * It does not offer STARTTLS or AUTH. One connection at a time, on 127.0.0.1.
 *
 * Every accepted message is written to DIR/msg-NNNN.eml (numbered from 0001) as received, with the
 * leading dots of dot-stuffed lines removed and two lines in front, "X-Fake-Mail-From: <…>" and
 * "X-Fake-Rcpt-To: <…>", so a test reads the envelope and the message. Every MAIL, RCPT and end
 * of DATA is logged to DIR/attempts.log as "<stage> <code>".
 *
 * Faults on demand: when DIR/control holds "STAGE CODE COUNT" (stage mail, rcpt or data; code a
 * 4xx or 5xx), the next COUNT commands of that stage are answered "CODE fake failure" instead; the
 * file is rewritten with the count left and removed at 0. A test writes the file, then sends.
 *
 * Plain libc on purpose: it must not link Criterion (whose start-up code would take it for a test).
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define LINE_MAX_LEN 4096
#define DATA_MAX (4 * 1024 * 1024)

static const char *dir;
static int next_msg = 1;

typedef struct st_conn {
    int fd;
    char buf[LINE_MAX_LEN * 2];
    size_t len;
} conn_t;

static bool say(int fd, const char *s)
{
    size_t n = strlen(s);
    while (n > 0) {
        ssize_t w = send(fd, s, n, MSG_NOSIGNAL);
        if (w <= 0) {
            if (w < 0 && errno == EINTR)
                continue;
            return false;
        }
        s += w;
        n -= (size_t)w;
    }
    return true;
}

/* Reads one line (CRLF or LF stripped) into out; returns its length, or -1 at EOF or error. */
static long read_line(conn_t *c, char *out, size_t outlen)
{
    for (;;) {
        char *nl = memchr(c->buf, '\n', c->len);
        if (nl != NULL) {
            size_t n = (size_t)(nl - c->buf);
            size_t keep = n > 0 && c->buf[n - 1] == '\r' ? n - 1 : n;
            if (keep >= outlen)
                keep = outlen - 1;
            memcpy(out, c->buf, keep);
            out[keep] = '\0';
            memmove(c->buf, nl + 1, c->len - n - 1);
            c->len -= n + 1;
            return (long)keep;
        }
        if (c->len == sizeof(c->buf))
            c->len = 0; /* an overlong line: drop it */
        ssize_t r = recv(c->fd, c->buf + c->len, sizeof(c->buf) - c->len, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0)
            return -1;
        c->len += (size_t)r;
    }
}

static void log_attempt(const char *stage, int code)
{
    char path[1024];
    snprintf(path, sizeof(path), "%s/attempts.log", dir);
    FILE *f = fopen(path, "a");
    if (f == NULL)
        return;
    fprintf(f, "%s %d\n", stage, code);
    (void)fclose(f);
}

/* Returns the fault code for stage (consuming one), or 0. */
static int take_fault(const char *stage)
{
    char path[1024], st[16];
    snprintf(path, sizeof(path), "%s/control", dir);
    FILE *f = fopen(path, "r");
    if (f == NULL)
        return 0;
    int code = 0, count = 0;
    int n = fscanf(f, "%15s %d %d", st, &code, &count);
    (void)fclose(f);
    if (n != 3 || strcmp(st, stage) != 0 || count <= 0)
        return 0;
    count--;
    if (count == 0) {
        (void)unlink(path);
    } else {
        f = fopen(path, "w");
        if (f != NULL) {
            fprintf(f, "%s %d %d\n", st, code, count);
            (void)fclose(f);
        }
    }
    return code;
}

static bool answer(int fd, const char *stage, int ok_code, const char *ok_text)
{
    int code = take_fault(stage);
    char line[128];
    if (code != 0)
        snprintf(line, sizeof(line), "%d fake failure\r\n", code);
    else
        snprintf(line, sizeof(line), "%d %s\r\n", ok_code, ok_text);
    log_attempt(stage, code != 0 ? code : ok_code);
    return say(fd, line) && code == 0;
}

static void serve(int fd)
{
    conn_t c = {.fd = fd};
    char line[LINE_MAX_LEN], from[LINE_MAX_LEN] = "", rcpt[LINE_MAX_LEN] = "";
    bool have_from = false;
    if (!say(fd, "220 fake.test ESMTP bg-fake-smtp\r\n"))
        return;
    while (read_line(&c, line, sizeof(line)) >= 0) {
        if (strncasecmp(line, "EHLO", 4) == 0) {
            say(fd, "250-fake.test\r\n250-8BITMIME\r\n250 SIZE 10485760\r\n");
        } else if (strncasecmp(line, "HELO", 4) == 0) {
            say(fd, "250 fake.test\r\n");
        } else if (strncasecmp(line, "MAIL FROM:", 10) == 0) {
            have_from = answer(fd, "mail", 250, "OK");
            if (have_from)
                snprintf(from, sizeof(from), "%s", line + 10);
            rcpt[0] = '\0';
        } else if (strncasecmp(line, "RCPT TO:", 8) == 0) {
            if (!have_from) {
                say(fd, "503 need MAIL first\r\n");
            } else if (answer(fd, "rcpt", 250, "OK")) {
                size_t l = strlen(rcpt);
                snprintf(rcpt + l, sizeof(rcpt) - l, "%s%s", l > 0 ? "," : "", line + 8);
            }
        } else if (strcasecmp(line, "DATA") == 0) {
            if (!have_from || rcpt[0] == '\0') {
                say(fd, "503 need RCPT first\r\n");
                continue;
            }
            say(fd, "354 end with <CRLF>.<CRLF>\r\n");
            size_t cap = DATA_MAX, len = 0;
            char *data = malloc(cap);
            if (data == NULL)
                return;
            long n;
            while ((n = read_line(&c, line, sizeof(line))) >= 0) {
                if (strcmp(line, ".") == 0)
                    break;
                const char *p = line[0] == '.' ? line + 1 : line;
                size_t pl = strlen(p);
                if (len + pl + 2 < cap) {
                    memcpy(data + len, p, pl);
                    memcpy(data + len + pl, "\r\n", 2);
                    len += pl + 2;
                }
            }
            if (n < 0) {
                free(data);
                return;
            }
            if (answer(fd, "data", 250, "OK queued")) {
                char path[1024];
                snprintf(path, sizeof(path), "%s/msg-%04d.eml", dir, next_msg++);
                FILE *f = fopen(path, "wb");
                if (f != NULL) {
                    fprintf(f, "X-Fake-Mail-From: %s\r\nX-Fake-Rcpt-To: %s\r\n", from, rcpt);
                    (void)fwrite(data, 1, len, f);
                    (void)fclose(f);
                }
            }
            free(data);
            have_from = false;
            rcpt[0] = '\0';
        } else if (strcasecmp(line, "RSET") == 0) {
            have_from = false;
            rcpt[0] = '\0';
            say(fd, "250 OK\r\n");
        } else if (strcasecmp(line, "NOOP") == 0) {
            say(fd, "250 OK\r\n");
        } else if (strcasecmp(line, "QUIT") == 0) {
            say(fd, "221 bye\r\n");
            return;
        } else {
            say(fd, "502 command not implemented\r\n");
        }
    }
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: bg-fake-smtp PORT DIR\n");
        return 2;
    }
    dir = argv[2];
    long port = strtol(argv[1], NULL, 10);
    signal(SIGPIPE, SIG_IGN);
    int lfd = socket(AF_INET, SOCK_STREAM, 0);
    int one = 1;
    (void)setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    struct sockaddr_in a;
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)port);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (lfd < 0 || bind(lfd, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(lfd, 16) != 0) {
        perror("bg-fake-smtp: listen");
        return 1;
    }
    for (;;) {
        int fd = accept(lfd, NULL, NULL);
        if (fd < 0) {
            if (errno == EINTR)
                continue;
            return 1;
        }
        struct timeval tv = {10, 0};
        (void)setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        serve(fd);
        close(fd);
    }
}
