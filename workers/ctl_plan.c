/*
 * bgctl plan grant: gives a user a plan for some days, free of charge.
 *
 *   bgctl plan grant (--email E | --user ID) --plan P --days N [--id SUBSCRIPTION_UUID]
 *
 * The grant itself (subscription, ledger transaction, audit row, in one Postgres transaction) is
 * bg_plans_grant, which the admin API calls too. Then the user's admission state is compiled again
 * and written to Redis, so the new plan counts from the next request. --id makes a retry safe: a
 * grant whose subscription exists already changes nothing (exit 0, "already granted").
 *
 * The grant is durable before Redis is touched: when Redis cannot be written, the command says so,
 * exits 1, and `bgctl quota rebuild --user ID` finishes the job.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/err.h"
#include "bg/pg.h"
#include "bg/plans.h"
#include "bg/policy.h"
#include "bg/redis.h"
#include "bg/timeutil.h"
#include "ctl.h"

static const char usage_text[] =
    "usage: bgctl plan grant (--email E | --user ID) --plan P --days N [--id SUBSCRIPTION_UUID]\n";

static int parse_args(int argc, char **argv, bg_plan_grant_t *g)
{
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        bool has_value = i + 1 < argc;
        if (strcmp(a, "--email") == 0 && has_value) {
            g->email = argv[++i];
        } else if (strcmp(a, "--user") == 0 && has_value) {
            g->user_id = argv[++i];
        } else if (strcmp(a, "--plan") == 0 && has_value) {
            g->plan_id = argv[++i];
        } else if (strcmp(a, "--id") == 0 && has_value) {
            g->subscription_id = argv[++i];
        } else if (strcmp(a, "--days") == 0 && has_value) {
            const char *s = argv[++i];
            char *end;
            long v = strtol(s, &end, 10);
            if (end == s || *end != '\0' || v < 1 || v > BG_PLANS_GRANT_DAYS_MAX) {
                fprintf(stderr, "bgctl plan grant: --days must be a whole number from 1 to %d\n",
                        BG_PLANS_GRANT_DAYS_MAX);
                return 2;
            }
            g->days = (int)v;
        } else {
            fprintf(stderr, "bgctl plan grant: unknown option or missing value: %s\n%s", a,
                    usage_text);
            return 2;
        }
    }
    if ((g->email == NULL) == (g->user_id == NULL) || g->plan_id == NULL || g->days == 0) {
        fprintf(stderr,
                "bgctl plan grant: one of --email or --user, and --plan and --days, are "
                "required\n%s",
                usage_text);
        return 2;
    }
    return 0;
}

/* Compiles the user's admission state and writes it to Redis. Returns 0 or a bg_err. */
static int refresh_redis(PGconn *c, const bg_config_t *cfg, const char *user_id)
{
    bg_admission_state_t st;
    int rc = bg_policy_compile_user(c, user_id, bg_timeutil_wall_ms(), &st);
    if (rc != 0)
        return rc;
    bg_redis_t *r;
    rc = bg_redis_new(cfg->redis_url, cfg->redis_timeout_ms, &r);
    if (rc != 0)
        return rc;
    rc = bg_policy_state_write(r, cfg->shards, &st);
    bg_redis_free(r);
    if (rc == 0)
        printf("admission state: status=%s plan=%s limit=%" PRId64 " per window\n", st.status,
               st.plan, st.limits.q_limit);
    return rc;
}

static int cmd_grant(int argc, char **argv, const bg_config_t *cfg)
{
    bg_plan_grant_t g = {0};
    int status = parse_args(argc, argv, &g);
    if (status != 0)
        return status;
    char err[512];
    PGconn *c;
    if (bg_pg_connect(cfg->database_url, 3, &c, err, sizeof(err)) != 0) {
        fprintf(stderr, "bgctl plan grant: cannot connect to Postgres: %s\n", err);
        return 1;
    }
    const bg_actor_t actor = {.kind = "system"};
    bg_plan_grant_result_t res;
    int rc = bg_plans_grant(c, &g, &actor, &res);
    if (rc != 0) {
        if (rc == BG_ERR_NOT_FOUND)
            fprintf(stderr, "bgctl plan grant: no such %s\n", res.what != NULL ? res.what : "user");
        else if (rc == BG_ERR_CONFLICT)
            fprintf(stderr, "bgctl plan grant: subscription %s belongs to another user\n",
                    g.subscription_id);
        else if (rc == BG_ERR_INVALID)
            fprintf(stderr, "bgctl plan grant: invalid input (an id that is not a uuid?)\n");
        else
            fprintf(stderr, "bgctl plan grant: %s\n", bg_strerror(rc));
        PQfinish(c);
        return 1;
    }
    char from[BG_RFC3339_BUFSIZE], to[BG_RFC3339_BUFSIZE];
    if (bg_timeutil_format_rfc3339(from, sizeof(from), res.period_start_ms, false) != 0)
        (void)bg_strlcpy(from, "?", sizeof(from));
    if (bg_timeutil_format_rfc3339(to, sizeof(to), res.period_end_ms, false) != 0)
        (void)bg_strlcpy(to, "?", sizeof(to));
    printf("%s plan %s to user %s: subscription %s, %s..%s, %" PRId64
           " requests (ledger transaction %s)\n",
           res.created ? "granted" : "already granted", g.plan_id, res.user_id, res.subscription_id,
           from, to, res.requests, res.ledger_transaction_id);
    if (res.replaced_id[0] != '\0')
        printf("replaced live subscription %s%s\n", res.replaced_id,
               res.replaced_paddle ? " (billed by Paddle: cancel it at Paddle too)" : "");
    rc = refresh_redis(c, cfg, res.user_id);
    PQfinish(c);
    if (rc != 0) {
        fprintf(stderr,
                "bgctl plan grant: the grant is recorded, but Redis was not updated (%s); run "
                "bgctl quota rebuild --user %s\n",
                bg_strerror(rc), res.user_id);
        return 1;
    }
    return 0;
}

int ctl_plan_main(int argc, char **argv, const bg_config_t *cfg)
{
    if (argc >= 2 && strcmp(argv[1], "grant") == 0)
        return cmd_grant(argc, argv, cfg);
    fprintf(stderr, "%s", usage_text);
    return 2;
}
