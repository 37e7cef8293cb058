/*
 * bgctl user create: creates a user who can sign in, with a personal organization they own.
 *
 *   bgctl user create --email E (--password P | --password-stdin) [--name N] [--admin]
 * [--if-missing]
 *
 * It is how an operator makes the first admin, and `make run` seeds one with --if-missing (exit 0
 * and say so when the email is taken, so seeding is idempotent). The user, the organization, the
 * membership and the audit row are written in one transaction: a failure leaves nothing half-made.
 * No trial is granted here; that belongs to registration and billing.
 *
 * The password is checked before anything touches the database, and hashed (argon2id, tens of
 * milliseconds) only when the user is going to be created. --password-stdin keeps the password out
 * of the process list and shell history.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/pg.h"
#include "bg/validate.h"
#include "ctl.h"

#define PASSWORD_MIN_CHARS 10
#define NAME_MAX_BYTES 200

static const char usage_text[] =
    "usage: bgctl user create --email E (--password P | --password-stdin) [--name N] [--admin] "
    "[--if-missing]\n";

typedef struct st_opts {
    const char *email;    /* borrowed from argv */
    const char *password; /* borrowed from argv, or points to password_buf */
    const char *name;
    bool admin;
    bool if_missing;
    bool password_stdin;
    char password_buf[BG_CRYPTO_PASSWORD_MAX + 2];
} opts_t;

/* Reads one line from stdin into o->password_buf, without its line end. Returns 0 or -1. */
static int read_password_stdin(opts_t *o)
{
    if (fgets(o->password_buf, sizeof(o->password_buf), stdin) == NULL)
        return -1;
    size_t len = strlen(o->password_buf);
    if (len > 0 && o->password_buf[len - 1] != '\n' && len == sizeof(o->password_buf) - 1)
        return -1; /* longer than any password we accept */
    while (len > 0 && (o->password_buf[len - 1] == '\n' || o->password_buf[len - 1] == '\r'))
        o->password_buf[--len] = '\0';
    o->password = o->password_buf;
    return 0;
}

/* Returns 0, or 2 after printing what is wrong with the command line. */
static int parse_args(int argc, char **argv, opts_t *o)
{
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        bool has_value = i + 1 < argc;
        if (strcmp(a, "--email") == 0 && has_value) {
            o->email = argv[++i];
        } else if (strcmp(a, "--password") == 0 && has_value) {
            o->password = argv[++i];
        } else if (strcmp(a, "--name") == 0 && has_value) {
            o->name = argv[++i];
        } else if (strcmp(a, "--password-stdin") == 0) {
            o->password_stdin = true;
        } else if (strcmp(a, "--admin") == 0) {
            o->admin = true;
        } else if (strcmp(a, "--if-missing") == 0) {
            o->if_missing = true;
        } else {
            fprintf(stderr, "bgctl user create: unknown option or missing value: %s\n%s", a,
                    usage_text);
            return 2;
        }
    }
    if (o->email == NULL || (o->password == NULL) == !o->password_stdin) {
        fprintf(stderr,
                "bgctl user create: --email and one of --password or --password-stdin are "
                "required\n%s",
                usage_text);
        return 2;
    }
    return 0;
}

/* Returns 0, or 1 after printing why the input is refused. */
static int validate(const opts_t *o)
{
    if (!bg_validate_email(o->email)) {
        fprintf(stderr, "bgctl user create: \"%s\" is not a valid email address\n", o->email);
        return 1;
    }
    if (bg_utf8_chars(o->password) < PASSWORD_MIN_CHARS) {
        fprintf(
            stderr,
            "bgctl user create: the password is too weak: it must have at least %d characters\n",
            PASSWORD_MIN_CHARS);
        return 1;
    }
    if (strlen(o->password) > BG_CRYPTO_PASSWORD_MAX) {
        fprintf(stderr, "bgctl user create: the password is too long (at most %d bytes)\n",
                BG_CRYPTO_PASSWORD_MAX);
        return 1;
    }
    if (o->name != NULL && strlen(o->name) > NAME_MAX_BYTES) {
        fprintf(stderr, "bgctl user create: the name is too long (at most %d bytes)\n",
                NAME_MAX_BYTES);
        return 1;
    }
    return 0;
}

/* Sets *exists to whether a live user has this email (case-insensitively). */
static int email_taken(PGconn *c, const char *email, bool *exists)
{
    PGresult *res;
    const char *p[] = {email};
    int rc = bg_pg_exec(
        c, "SELECT 1 FROM users WHERE lower(email) = lower($1) AND deleted_at IS NULL", 1, p, &res);
    if (rc != 0)
        return rc;
    *exists = PQntuples(res) > 0;
    PQclear(res);
    return 0;
}

/*
 * Inserts the user, their personal organization, the membership and an audit row in one
 * transaction. Writes the new ids into user_id and org_id (37 bytes each). Returns 0 or a bg_err
 * (BG_ERR_CONFLICT: the email is taken).
 */
static int insert_user(PGconn *c, const opts_t *o, const char *hash, char *user_id, char *org_id)
{
    const char *name = o->name != NULL ? o->name : "";
    /* The organization is named after the person; failing a name, after the mailbox. */
    char org_name[NAME_MAX_BYTES + 1];
    if (bg_str_present(name))
        (void)bg_strlcpy(org_name, name, sizeof(org_name));
    else
        snprintf(org_name, sizeof(org_name), "%.*s", (int)strcspn(o->email, "@"), o->email);

    PGresult *res;
    int rc = bg_pg_begin(c);
    if (rc != 0)
        return rc;
    const char *up[] = {o->email, hash, name, o->admin ? "admin" : "user"};
    rc = bg_pg_exec(c,
                    "INSERT INTO users (email, password_hash, name, role) VALUES ($1, $2, $3, $4) "
                    "RETURNING id",
                    4, up, &res);
    if (rc != 0)
        goto err_rollback;
    (void)bg_strlcpy(user_id, PQgetvalue(res, 0, 0), 37);
    PQclear(res);

    const char *op[] = {org_name, user_id};
    rc = bg_pg_exec(c,
                    "INSERT INTO organizations (name, personal, owner_id) VALUES ($1, true, $2) "
                    "RETURNING id",
                    2, op, &res);
    if (rc != 0)
        goto err_rollback;
    (void)bg_strlcpy(org_id, PQgetvalue(res, 0, 0), 37);
    PQclear(res);

    const char *mp[] = {org_id, user_id};
    rc = bg_pg_run(
        c, "INSERT INTO memberships (organization_id, user_id, role) VALUES ($1, $2, 'owner')", 2,
        mp);
    if (rc != 0)
        goto err_rollback;
    const char *ap[] = {user_id, org_id, o->admin ? "admin" : "user"};
    rc = bg_pg_run(c,
                   "INSERT INTO audit_log (actor_kind, action, target_type, target_id, "
                   "organization_id, details) VALUES ('system', 'user.create', 'user', $1, $2, "
                   "jsonb_build_object('via', 'bgctl', 'role', $3::text))",
                   3, ap);
    if (rc != 0)
        goto err_rollback;
    return bg_pg_commit(c);

err_rollback:
    bg_pg_rollback(c);
    return rc;
}

static int cmd_create(int argc, char **argv, const bg_config_t *cfg)
{
    opts_t o = {0};
    int status = parse_args(argc, argv, &o);
    if (status != 0)
        return status;
    if (o.password_stdin && read_password_stdin(&o) != 0) {
        fprintf(stderr, "bgctl user create: could not read a password line from stdin\n");
        status = 1;
        goto out_wipe;
    }
    status = validate(&o);
    if (status != 0)
        goto out_wipe;

    PGconn *c;
    char err[512];
    bg_pg_setup(&(bg_pg_settings_t){.application_name = "bgctl user", .statement_timeout_ms = -1});
    if (bg_pg_connect(cfg->database_url, 3, &c, err, sizeof(err)) != 0) {
        fprintf(stderr, "bgctl user create: cannot connect to the database: %s\n", err);
        status = 1;
        goto out_wipe;
    }
    bool exists = false;
    int rc = email_taken(c, o.email, &exists);
    if (rc == 0 && exists)
        rc = BG_ERR_CONFLICT;
    char hash[BG_CRYPTO_PWHASH_LEN] = "";
    char user_id[37] = "", org_id[37] = "";
    if (rc == 0)
        rc = bg_crypto_password_hash(o.password, hash, sizeof(hash));
    if (rc == 0)
        rc = insert_user(c, &o, hash, user_id, org_id);
    PQfinish(c);

    if (rc == BG_ERR_CONFLICT && o.if_missing) {
        printf("user %s already exists; nothing to do\n", o.email);
        status = 0;
    } else if (rc == BG_ERR_CONFLICT) {
        fprintf(stderr, "bgctl user create: a user with email %s already exists\n", o.email);
        status = 1;
    } else if (rc != 0) {
        fprintf(stderr, "bgctl user create: could not create the user: %s\n", bg_strerror(rc));
        status = 1;
    } else {
        printf("created %suser %s (%s) with personal organization %s\n", o.admin ? "admin " : "",
               user_id, o.email, org_id);
        status = 0;
    }
out_wipe:
    bg_crypto_wipe(o.password_buf, sizeof(o.password_buf));
    return status;
}

int ctl_user_main(int argc, char **argv, const bg_config_t *cfg)
{
    if (argc >= 2 && strcmp(argv[1], "create") == 0)
        return cmd_create(argc, argv, cfg);
    fprintf(stderr, "%s", usage_text);
    return 2;
}
