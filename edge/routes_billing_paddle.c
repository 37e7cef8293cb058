/*
 * Buying through Paddle: POST /billing/subscribe (a checkout), POST /billing/cancel and
 * /billing/resume (a cancellation at the end of the paid period, and taking it back), POST
 * /billing/change (upgrade now with proration, downgrade at the period end), POST /billing/payment
 * (the checkout of an open or past-due transaction), GET /billing/history (payments, refunds and
 * request credits from the ledger) and the invoices (GET /billing/invoices, one as JSON, one as a
 * printable HTML page in the user's language).
 *
 * The Paddle calls are blocking libcurl calls (bg/paddle.h) on the thread pool, never on a loop:
 * the client gets the checkout URL in the same answer, and the pool keeps the loops free while
 * Paddle takes its time (retries on 429 and 5xx included). Nothing here changes a subscription
 * row: Paddle tells us what happened through its webhooks (routes_webhooks_paddle.c), which the
 * billing worker applies in order; so a cancellation answered here shows up in /billing/account
 * once subscription.updated arrives.
 *
 * Refusals, in the order they are checked: a malformed body (422); Paddle not configured
 * (BG_PADDLE_API_KEY unset: 503 billing_unavailable, which tells the operator what is missing);
 * an unknown plan (422 on "plan"); a plan that is not for sale or has no Paddle price id (422
 * plan_not_purchasable); a live Paddle subscription already (409 conflict, reason
 * already_subscribed: a plan change goes through Paddle's subscription, not a second checkout).
 */
#include <stdlib.h>
#include <string.h>

#include "bg/billing.h"
#include "bg/crypto.h"
#include "bg/err.h"
#include "bg/i18n.h"
#include "bg/json.h"
#include "bg/log.h"
#include "bg/paddle.h"
#include "bg/pg.h"
#include "bg/timeutil.h"
#include "edge.h"

enum { OP_SUBSCRIBE, OP_CANCEL, OP_RESUME, OP_CHANGE, OP_PAYMENT, OP_INVOICES, OP_INVOICE };

typedef struct st_pay_op {
    const bg_config_t *cfg;
    int kind;
    char user_id[64];
    char plan_id[40];
    bg_billing_checkout_t info;
    bg_billing_change_t change;
    bool change_now;     /* the change takes effect now (an upgrade, or back to the plan held) */
    char txn_id[104];    /* POST /billing/payment: the transaction asked for, "" for none */
    char invoice_id[40]; /* GET /billing/invoices/{id} */
    bool html;           /* … /html */
    bg_billing_invoice_t invoice;
    bg_paddle_reply_t reply;
    int rc;
    const char *refusal; /* static: why the request is refused before Paddle is called */
    /* history */
    char *cursor; /* owned */
    int limit;
    bg_buf_t page;
} pay_op_t;

static void op_free(void *p)
{
    pay_op_t *op = p;
    if (op == NULL)
        return;
    free(op->cursor);
    bg_buf_dispose(&op->page);
    free(op);
}

static pay_op_t *op_new(edge_req_t *er, int kind)
{
    pay_op_t *op = bg_calloc(1, sizeof(*op));
    op->cfg = er->thread->server->cfg;
    op->kind = kind;
    (void)bg_strlcpy(op->user_id, er->auth.user_id, sizeof(op->user_id));
    bg_buf_init(&op->page, 1 << 20);
    er->data = op;
    er->data_free = op_free;
    return op;
}

static bg_paddle_api_t api_of(const bg_config_t *cfg)
{
    return (bg_paddle_api_t){.base_url = cfg->paddle_api_url, .api_key = cfg->paddle_api_key};
}

static bool paddle_configured(edge_req_t *er)
{
    bg_paddle_api_t api = api_of(er->thread->server->cfg);
    if (bg_paddle_api_configured(&api))
        return true;
    edge_error(er, "billing_unavailable", "{\"reason\":\"paddle_not_configured\"}", NULL, 0);
    return false;
}

static void pay_work(void *arg)
{
    pay_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, NULL, &op->rc);
    if (c == NULL)
        return;
    op->rc = bg_billing_checkout_info(c, op->user_id, op->kind == OP_SUBSCRIBE ? op->plan_id : NULL,
                                      &op->info);
    if (op->rc != 0)
        return;
    bg_paddle_api_t api = api_of(op->cfg);
    switch (op->kind) {
    case OP_SUBSCRIBE:
        if (op->info.price_id[0] == '\0' || !op->info.purchasable) {
            op->refusal = "plan_not_purchasable";
            return;
        }
        if (op->info.subscription_id[0] != '\0') {
            op->refusal = "already_subscribed";
            return;
        }
        op->rc = bg_paddle_create_transaction(
            &api, op->info.price_id, op->user_id,
            op->info.customer_id[0] != '\0' ? op->info.customer_id : NULL, &op->reply);
        break;
    case OP_CANCEL:
    case OP_RESUME:
        if (op->info.subscription_id[0] == '\0') {
            op->refusal = "no_paddle_subscription";
            return;
        }
        op->rc = op->kind == OP_CANCEL
                     ? bg_paddle_cancel_subscription(&api, op->info.subscription_id, &op->reply)
                     : bg_paddle_resume_subscription(&api, op->info.subscription_id, &op->reply);
        break;
    default:
        op->rc = BG_ERR_INVALID;
    }
}

/*
 * A plan change. Against the plan the subscription grants now: the same plan is refused (unless a
 * downgrade is scheduled: then it is taken back, at no charge); a plan dearer per day is an
 * upgrade, billed at once for the rest of the period (prorated_immediately); a cheaper one is
 * billed from the next renewal (full_next_billing_period) and the webhook that follows schedules it
 * for the period end (bg_billing_apply keeps the dearer plan of the period).
 */
static void change_work(void *arg)
{
    pay_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, NULL, &op->rc);
    if (c == NULL)
        return;
    op->rc = bg_billing_change_info(c, op->user_id, op->plan_id, &op->change);
    if (op->rc != 0)
        return;
    bg_billing_change_t *ch = &op->change;
    if (ch->price_id[0] == '\0' || !ch->purchasable) {
        op->refusal = "plan_not_purchasable";
        return;
    }
    if (ch->subscription_id[0] == '\0') {
        op->refusal = "no_paddle_subscription";
        return;
    }
    bool back = strcmp(ch->current_plan, op->plan_id) == 0;
    if (back && ch->scheduled_plan[0] == '\0') {
        op->refusal = "same_plan";
        return;
    }
    bg_paddle_proration_t mode = back          ? BG_PADDLE_DO_NOT_BILL
                                 : ch->upgrade ? BG_PADDLE_PRORATED_IMMEDIATELY
                                               : BG_PADDLE_FULL_NEXT_BILLING_PERIOD;
    op->change_now = back || ch->upgrade;
    bg_paddle_api_t api = api_of(op->cfg);
    op->rc = bg_paddle_change_items(&api, ch->subscription_id, ch->price_id, mode, &op->reply);
}

/*
 * POST /billing/payment: the checkout of what is owed. With a transaction id, that transaction
 * (Paddle's GET /transactions/{id}) when it is the caller's (Paddle's custom_data or customer,
 * or what Postgres knows) and still open; without one, the transaction Paddle answers for the
 * caller's past_due subscription (GET /subscriptions/{id}/update-payment-method-transaction).
 */
static void payment_work(void *arg)
{
    pay_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, NULL, &op->rc);
    if (c == NULL)
        return;
    bg_paddle_api_t api = api_of(op->cfg);
    if (op->txn_id[0] == '\0') {
        char sub[64];
        bool past_due = false;
        op->rc = bg_billing_live_subscription(c, op->user_id, sub, &past_due);
        if (op->rc != 0)
            return;
        if (!past_due) {
            op->refusal = sub[0] == '\0' ? "no_paddle_subscription" : "nothing_owed";
            return;
        }
        op->rc = bg_paddle_payment_transaction(&api, sub, &op->reply);
    } else {
        op->rc = bg_paddle_get_transaction(&api, op->txn_id, &op->reply);
        if (op->rc != 0)
            return;
        int owns =
            strcmp(op->reply.user_id, op->user_id) == 0
                ? 1
                : bg_billing_owns_transaction(c, op->user_id, op->txn_id, op->reply.customer_id,
                                              op->reply.subscription_id);
        if (owns < 0) {
            op->rc = owns;
            return;
        }
        if (owns == 0) {
            op->rc = BG_ERR_NOT_FOUND;
            return;
        }
    }
    if (op->rc != 0)
        return;
    /* paid, completed or canceled: nothing to pay; draft, ready, billed, past_due: open */
    const char *st = op->reply.state;
    if (strcmp(st, "paid") == 0 || strcmp(st, "completed") == 0 || strcmp(st, "canceled") == 0)
        op->refusal = "nothing_owed";
}

static void pay_done(edge_req_t *er, void *arg)
{
    pay_op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc == BG_ERR_NOT_FOUND && (op->kind == OP_SUBSCRIBE || op->kind == OP_CHANGE)) {
        edge_invalid_field(er, "plan", "invalid_value", NULL);
        return;
    }
    if (op->rc == BG_ERR_NOT_FOUND && op->kind == OP_PAYMENT) {
        edge_error(er, "not_found", NULL, NULL, 0);
        return;
    }
    if (op->refusal != NULL && strcmp(op->refusal, "plan_not_purchasable") == 0) {
        const char *params[] = {"plan", op->plan_id, NULL};
        edge_error(er, "plan_not_purchasable", "{\"field\":\"plan\"}", params, 0);
        return;
    }
    if (op->refusal != NULL) {
        char details[80];
        snprintf(details, sizeof(details), "{\"reason\":\"%s\"}", op->refusal);
        edge_error(er, "conflict", details, NULL, 0);
        return;
    }
    if (op->rc == BG_ERR_CONFIG || op->rc == BG_ERR_INVALID || op->rc == BG_ERR_PROTOCOL ||
        op->rc == BG_ERR_UNAVAILABLE) {
        /* Paddle refused (a misconfigured price or key) or kept failing: not the user's fault */
        bg_warn("billing %s: Paddle call failed: %s (HTTP %ld after %d attempts, %s)",
                er->request_id, bg_strerror(op->rc), op->reply.status, op->reply.attempts,
                op->reply.error_code[0] != '\0' ? op->reply.error_code : "no error code");
        char details[128];
        snprintf(details, sizeof(details), "{\"reason\":\"%s\"}",
                 op->rc == BG_ERR_UNAVAILABLE ? "paddle_unavailable" : "paddle_refused");
        edge_error(er, "billing_unavailable", details, NULL, op->rc == BG_ERR_UNAVAILABLE ? 30 : 0);
        return;
    }
    if (op->rc != 0) {
        edge_fail(er, op->rc);
        return;
    }
    bg_buf_t out;
    bg_buf_init(&out, 8192);
    bg_json_writer_t w;
    bg_json_writer_init(&w, &out);
    bg_json_write_begin_object(&w);
    if (op->kind == OP_SUBSCRIBE) {
        bg_json_write_field_str(&w, "transaction_id", op->reply.id);
        if (op->reply.checkout_url[0] != '\0')
            bg_json_write_field_str(&w, "checkout_url", op->reply.checkout_url);
        else
            bg_json_write_field_null(&w, "checkout_url");
        bg_json_write_field_str(&w, "plan", op->plan_id);
    } else if (op->kind == OP_CHANGE) {
        bg_json_write_field_str(&w, "subscription_id", op->change.subscription_id);
        bg_json_write_field_str(&w, "plan", op->plan_id);
        bg_json_write_field_str(&w, "effective", op->change_now ? "now" : "period_end");
        if (!op->change_now)
            bg_json_write_field_str(&w, "effective_at", op->change.period_end);
    } else if (op->kind == OP_PAYMENT) {
        bg_json_write_field_str(&w, "transaction_id", op->reply.id);
        if (op->reply.checkout_url[0] != '\0')
            bg_json_write_field_str(&w, "checkout_url", op->reply.checkout_url);
        else
            bg_json_write_field_null(&w, "checkout_url");
    } else {
        bg_json_write_field_str(&w, "subscription_id", op->info.subscription_id);
        bg_json_write_field_bool(&w, "cancel_at_period_end", op->kind == OP_CANCEL);
    }
    bg_json_write_end_object(&w);
    edge_respond_writer(er, op->kind == OP_SUBSCRIBE ? 201 : 200, &w, &out);
}

static const edge_field_t subscribe_fields[] = {
    {"plan", EDGE_F_STR, true, 1, 32, EDGE_CHECK_NONE},
};

/* POST /billing/subscribe */
static void subscribe_post(edge_req_t *er)
{
    edge_values_t v;
    if (!edge_body(er, subscribe_fields, BG_ARRAY_SIZE(subscribe_fields), &v))
        return;
    if (!paddle_configured(er))
        return;
    pay_op_t *op = op_new(er, OP_SUBSCRIBE);
    (void)bg_strlcpy(op->plan_id, v.str[0], sizeof(op->plan_id));
    edge_run(er, pay_work, pay_done);
}

/* POST /billing/cancel */
static void cancel_post(edge_req_t *er)
{
    if (!paddle_configured(er))
        return;
    (void)op_new(er, OP_CANCEL);
    edge_run(er, pay_work, pay_done);
}

/* POST /billing/resume */
static void resume_post(edge_req_t *er)
{
    if (!paddle_configured(er))
        return;
    (void)op_new(er, OP_RESUME);
    edge_run(er, pay_work, pay_done);
}

/* POST /billing/change */
static void change_post(edge_req_t *er)
{
    edge_values_t v;
    if (!edge_body(er, subscribe_fields, BG_ARRAY_SIZE(subscribe_fields), &v))
        return;
    if (!paddle_configured(er))
        return;
    pay_op_t *op = op_new(er, OP_CHANGE);
    (void)bg_strlcpy(op->plan_id, v.str[0], sizeof(op->plan_id));
    edge_run(er, change_work, pay_done);
}

static const edge_field_t payment_fields[] = {
    {"transaction_id", EDGE_F_STR, false, 1, 100, EDGE_CHECK_NONE},
};

/* POST /billing/payment */
static void payment_post(edge_req_t *er)
{
    edge_values_t v;
    if (!edge_body(er, payment_fields, BG_ARRAY_SIZE(payment_fields), &v))
        return;
    if (!paddle_configured(er))
        return;
    pay_op_t *op = op_new(er, OP_PAYMENT);
    if (v.str[0] != NULL)
        (void)bg_strlcpy(op->txn_id, v.str[0], sizeof(op->txn_id));
    edge_run(er, payment_work, pay_done);
}

/* ---- GET /billing/history ---- */

static void history_work(void *arg)
{
    pay_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, NULL, &op->rc);
    if (c == NULL)
        return;
    op->rc = bg_billing_history(c, op->user_id, op->cursor, op->limit, &op->page);
}

static void history_done(edge_req_t *er, void *arg)
{
    pay_op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc == BG_ERR_INVALID) {
        edge_invalid_field(er, "cursor", "invalid_value", NULL);
        return;
    }
    if (op->rc != 0) {
        edge_fail(er, op->rc);
        return;
    }
    edge_add_header(er, "cache-control", "no-store");
    edge_respond_json(er, 200, &op->page);
}

static void history_get(edge_req_t *er)
{
    pay_op_t *op = op_new(er, 0);
    op->limit = 50;
    char cursor[64];
    if (!edge_query_limit(er, BG_BILLING_HISTORY_MAX, &op->limit))
        return;
    if (edge_query(er, "cursor", cursor, sizeof(cursor)) && cursor[0] != '\0')
        op->cursor = bg_strdup(cursor);
    edge_run(er, history_work, history_done);
}

/* ---- invoices ---- */

static void invoices_work(void *arg)
{
    pay_op_t *op = arg;
    PGconn *c = edge_pg(op->cfg, NULL, &op->rc);
    if (c == NULL)
        return;
    if (op->kind == OP_INVOICES)
        op->rc = bg_billing_invoices(c, op->user_id, op->cursor, op->limit, &op->page);
    else
        op->rc = bg_billing_invoice(c, op->user_id, op->invoice_id, op->html ? NULL : &op->page,
                                    op->html ? &op->invoice : NULL);
}

/* Appends s HTML-escaped (text and attribute values alike). */
static int put_escaped(bg_buf_t *b, const char *s)
{
    int rc = 0;
    for (; *s != '\0' && rc == 0; s++) {
        switch (*s) {
        case '&':
            rc = bg_buf_puts(b, "&amp;");
            break;
        case '<':
            rc = bg_buf_puts(b, "&lt;");
            break;
        case '>':
            rc = bg_buf_puts(b, "&gt;");
            break;
        case '"':
            rc = bg_buf_puts(b, "&quot;");
            break;
        case '\'':
            rc = bg_buf_puts(b, "&#39;");
            break;
        default:
            rc = bg_buf_putc(b, *s);
        }
    }
    return rc;
}

/* Appends the localized message key (params as bg_i18n_format), HTML-escaped. */
static int put_text(bg_buf_t *b, const char *locale, const char *key, const char *const params[])
{
    bg_buf_t t;
    bg_buf_init(&t, 4096);
    int rc = bg_i18n_format(&t, locale, key, params);
    if (rc == 0)
        rc = bg_buf_putc(&t, '\0');
    if (rc == 0)
        rc = put_escaped(b, t.base);
    bg_buf_dispose(&t);
    return rc;
}

/* Writes a date (UTC) in the locale's form into out. */
static void local_date(const char *locale, int64_t ms, char *out, size_t outlen)
{
    char iso[40];
    out[0] = '\0';
    if (ms <= 0 || bg_timeutil_format_rfc3339(iso, sizeof(iso), ms, false) != 0)
        return;
    char y[5], m[3], d[3];
    snprintf(y, sizeof(y), "%.4s", iso);
    snprintf(m, sizeof(m), "%.2s", iso + 5);
    snprintf(d, sizeof(d), "%.2s", iso + 8);
    const char *params[] = {"year", y, "month", m, "day", d, NULL};
    bg_buf_t t;
    bg_buf_init(&t, outlen);
    if (bg_i18n_format(&t, locale, "invoice.date", params) == 0 && t.len < outlen) {
        memcpy(out, t.base, t.len);
        out[t.len] = '\0';
    }
    bg_buf_dispose(&t);
}

/* Digits after the decimal point of a currency's minor unit (ISO 4217; the usual cases). */
static int minor_digits(const char *currency)
{
    static const char *const zero[] = {"JPY", "KRW", "VND", "CLP", "ISK", "HUF", NULL};
    for (size_t i = 0; zero[i] != NULL; i++)
        if (strcmp(currency, zero[i]) == 0)
            return 0;
    return 2;
}

/* Writes an amount in minor units in the locale's form ("USD 1,234.50", "1 234,50 USD"). */
static void local_amount(const char *locale, int64_t minor, const char *currency, char *out,
                         size_t outlen)
{
    const char *dec = bg_i18n_text(locale, "invoice.decimal_separator");
    const char *grp = bg_i18n_text(locale, "invoice.group_separator");
    int digits = minor_digits(currency);
    bool neg = minor < 0;
    uint64_t v = neg ? (uint64_t)0 - (uint64_t)minor : (uint64_t)minor;
    uint64_t div = digits == 0 ? 1 : 100;
    char whole[32], num[96];
    snprintf(whole, sizeof(whole), "%llu", (unsigned long long)(v / div));
    size_t wl = strlen(whole), n = 0;
    if (neg)
        num[n++] = '-';
    for (size_t i = 0; i < wl && n + 8 < sizeof(num); i++) {
        if (i > 0 && (wl - i) % 3 == 0) {
            const char *g = grp != NULL ? grp : ",";
            size_t gl = strlen(g);
            memcpy(num + n, g, gl);
            n += gl;
        }
        num[n++] = whole[i];
    }
    num[n] = '\0';
    if (digits > 0)
        snprintf(num + n, sizeof(num) - n, "%s%02llu", dec != NULL ? dec : ".",
                 (unsigned long long)(v % div));
    const char *params[] = {"amount", num, "currency", currency, NULL};
    bg_buf_t t;
    bg_buf_init(&t, outlen);
    out[0] = '\0';
    if (bg_i18n_format(&t, locale, "invoice.amount", params) == 0 && t.len < outlen) {
        memcpy(out, t.base, t.len);
        out[t.len] = '\0';
    }
    bg_buf_dispose(&t);
}

/* The page's only style; the CSP admits it by its nonce, and nothing else. */
static const char invoice_css[] =
    "body{font:14px/1.5 system-ui,sans-serif;color:#111;max-width:720px;margin:2em auto;"
    "padding:0 1em}h1{font-size:1.6em;margin:0 0 .2em}table{width:100%;border-collapse:collapse;"
    "margin:1.5em 0}th,td{text-align:left;padding:.4em .2em;border-bottom:1px solid #ddd}"
    "td.n{text-align:right;font-variant-numeric:tabular-nums}tr.total td{font-weight:700;"
    "border-top:2px solid #111}.status{display:inline-block;padding:.1em .6em;border:1px solid "
    "#888;border-radius:1em;font-size:.9em}dl{display:grid;grid-template-columns:max-content 1fr;"
    "gap:.2em 1em}dt{color:#555}.note{color:#555;font-size:.9em}"
    "@media print{body{margin:0;max-width:none}.status{border-color:#000}a{color:#000}"
    "@page{margin:2cm}}";

/* One row of the definition list: label key, value (already localized, escaped here). */
static int put_dl(bg_buf_t *b, const char *locale, const char *key, const char *value)
{
    int rc = bg_buf_puts(b, "<dt>");
    if (rc == 0)
        rc = put_text(b, locale, key, NULL);
    if (rc == 0)
        rc = bg_buf_puts(b, "</dt><dd>");
    if (rc == 0)
        rc = put_escaped(b, value[0] != '\0' ? value : "\xe2\x80\x94");
    if (rc == 0)
        rc = bg_buf_puts(b, "</dd>");
    return rc;
}

static int put_money_row(bg_buf_t *b, const char *locale, const char *key, int64_t minor,
                         const char *currency, bool total)
{
    char amount[96];
    local_amount(locale, minor, currency, amount, sizeof(amount));
    int rc = bg_buf_puts(b, total ? "<tr class=\"total\"><td>" : "<tr><td>");
    if (rc == 0)
        rc = put_text(b, locale, key, NULL);
    if (rc == 0)
        rc = bg_buf_puts(b, "</td><td class=\"n\">");
    if (rc == 0)
        rc = put_escaped(b, amount);
    if (rc == 0)
        rc = bg_buf_puts(b, "</td></tr>");
    return rc;
}

/* The printable invoice in locale into b; nonce admits the inline style. */
static int invoice_html(bg_buf_t *b, const char *locale, const bg_billing_invoice_t *v,
                        const char *nonce)
{
    char number[80], status_key[48], plan_key[64], start[40], end[40], issued[40], paid[40];
    snprintf(number, sizeof(number), "%s", v->number[0] != '\0' ? v->number : "");
    snprintf(status_key, sizeof(status_key), "invoice.status_%s", v->status);
    snprintf(plan_key, sizeof(plan_key), "web.plans.name_%s", v->plan);
    local_date(locale, v->period_start_ms, start, sizeof(start));
    local_date(locale, v->period_end_ms, end, sizeof(end));
    local_date(locale, v->issued_ms, issued, sizeof(issued));
    local_date(locale, v->paid_ms, paid, sizeof(paid));
    const char *plan_name = v->plan[0] != '\0' ? bg_i18n_text(locale, plan_key) : NULL;
    if (plan_name == NULL)
        plan_name = v->plan_name;
    int rc = bg_buf_puts(b, "<!doctype html>\n<html lang=\"");
    if (rc == 0)
        rc = put_escaped(b, locale);
    if (rc == 0)
        rc = bg_buf_puts(b, "\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
                            "content=\"width=device-width,initial-scale=1\"><title>");
    const char *tp[] = {"number", number[0] != '\0' ? number : "\xe2\x80\x94", NULL};
    if (rc == 0)
        rc = put_text(b, locale, "invoice.title", tp);
    if (rc == 0)
        rc = bg_buf_printf(b, "</title><style nonce=\"%s\">%s</style></head><body><h1>", nonce,
                           invoice_css);
    if (rc == 0)
        rc = put_text(b, locale, "invoice.title", tp);
    if (rc == 0)
        rc = bg_buf_puts(b, "</h1><p><span class=\"status\">");
    if (rc == 0)
        rc = put_text(b, locale, status_key, NULL);
    if (rc == 0)
        rc = bg_buf_puts(b, "</span></p><dl>");
    if (rc == 0)
        rc = put_dl(b, locale, "invoice.billed_to", v->email);
    if (rc == 0)
        rc = put_dl(b, locale, "invoice.issued_at", issued);
    if (rc == 0)
        rc = put_dl(b, locale, "invoice.paid_at", paid);
    if (rc == 0)
        rc = bg_buf_puts(b, "</dl><table><thead><tr><th>");
    if (rc == 0)
        rc = put_text(b, locale, "invoice.description", NULL);
    if (rc == 0)
        rc = bg_buf_puts(b, "</th><th class=\"n\">");
    if (rc == 0)
        rc = put_text(b, locale, "invoice.amount_heading", NULL);
    if (rc == 0)
        rc = bg_buf_puts(b, "</th></tr></thead><tbody><tr><td>");
    const char *lp[] = {"plan",  plan_name,
                        "start", start[0] != '\0' ? start : "\xe2\x80\x94",
                        "end",   end[0] != '\0' ? end : "\xe2\x80\x94",
                        NULL};
    if (rc == 0)
        rc = put_text(b, locale, v->period_start_ms > 0 ? "invoice.line_period" : "invoice.line",
                      lp);
    char amount[96];
    local_amount(locale, v->subtotal_minor, v->currency, amount, sizeof(amount));
    if (rc == 0)
        rc = bg_buf_puts(b, "</td><td class=\"n\">");
    if (rc == 0)
        rc = put_escaped(b, amount);
    if (rc == 0)
        rc = bg_buf_puts(b, "</td></tr>");
    if (rc == 0)
        rc = put_money_row(b, locale, "invoice.subtotal", v->subtotal_minor, v->currency, false);
    if (rc == 0)
        rc = put_money_row(b, locale, "invoice.tax", v->tax_minor, v->currency, false);
    if (rc == 0)
        rc = put_money_row(b, locale, "invoice.total", v->total_minor, v->currency, true);
    if (rc == 0)
        rc = bg_buf_puts(b, "</tbody></table><p class=\"note\">");
    if (rc == 0)
        rc = put_text(b, locale, "invoice.note", NULL);
    if (rc == 0)
        rc = bg_buf_puts(b, "</p></body></html>\n");
    return rc;
}

static void invoices_done(edge_req_t *er, void *arg)
{
    pay_op_t *op = arg;
    if (er->req == NULL)
        return;
    if (op->rc == BG_ERR_INVALID && op->kind == OP_INVOICES) {
        edge_invalid_field(er, "cursor", "invalid_value", NULL);
        return;
    }
    if (op->rc == BG_ERR_NOT_FOUND) {
        edge_error(er, "not_found", NULL, NULL, 0);
        return;
    }
    if (op->rc != 0) {
        edge_fail(er, op->rc);
        return;
    }
    edge_add_header(er, "cache-control", "no-store");
    if (!op->html) {
        edge_respond_json(er, 200, &op->page);
        return;
    }
    char nonce[64];
    if (bg_crypto_random_token(18, nonce, sizeof(nonce)) != 0) {
        edge_fail(er, BG_ERR_IO);
        return;
    }
    bg_buf_reset(&op->page);
    if (invoice_html(&op->page, er->locale, &op->invoice, nonce) != 0) {
        edge_fail(er, BG_ERR_TOO_LARGE);
        return;
    }
    char csp[256];
    snprintf(csp, sizeof(csp),
             "default-src 'none'; style-src 'nonce-%s'; base-uri 'none'; form-action 'none'; "
             "frame-ancestors 'none'",
             nonce);
    edge_add_header(er, "content-security-policy", csp);
    edge_add_header(er, "referrer-policy", "no-referrer");
    edge_add_header(er, "x-frame-options", "DENY");
    edge_add_header(er, "content-language", er->locale);
    edge_respond(er, 200, "text/html; charset=utf-8", op->page.base, op->page.len);
}

/* GET /billing/invoices?limit&cursor */
static void invoices_get(edge_req_t *er)
{
    pay_op_t *op = op_new(er, OP_INVOICES);
    op->limit = 20;
    char cursor[64];
    if (!edge_query_limit(er, BG_BILLING_INVOICES_MAX, &op->limit))
        return;
    if (edge_query(er, "cursor", cursor, sizeof(cursor)) && cursor[0] != '\0')
        op->cursor = bg_strdup(cursor);
    edge_run(er, invoices_work, invoices_done);
}

static void invoice_start(edge_req_t *er, bool html)
{
    pay_op_t *op = op_new(er, OP_INVOICE);
    op->html = html;
    /* an id that is not a uuid is no invoice of theirs: 404 from the same path as any other */
    if (er->params[0].len < sizeof(op->invoice_id))
        memcpy(op->invoice_id, er->params[0].base, er->params[0].len);
    edge_run(er, invoices_work, invoices_done);
}

/* GET /billing/invoices/{id} */
static void invoice_get(edge_req_t *er)
{
    invoice_start(er, false);
}

/* GET /billing/invoices/{id}/html */
static void invoice_html_get(edge_req_t *er)
{
    invoice_start(er, true);
}

const edge_route_t edge_routes_checkout[] = {
    {"POST", "/billing/subscribe", "billing_subscribe", subscribe_post, EDGE_ROUTE_JSON, 0,
     EDGE_USER},
    {"POST", "/billing/cancel", "billing_cancel", cancel_post, EDGE_ROUTE_JSON, 0, EDGE_USER},
    {"POST", "/billing/resume", "billing_resume", resume_post, EDGE_ROUTE_JSON, 0, EDGE_USER},
    {"GET", "/billing/history", "billing_history", history_get, 0, 0, EDGE_USER},
    {"POST", "/billing/change", "billing_change", change_post, EDGE_ROUTE_JSON, 0, EDGE_USER},
    {"POST", "/billing/payment", "billing_payment", payment_post, EDGE_ROUTE_JSON, 0, EDGE_USER},
    {"GET", "/billing/invoices", "billing_invoices", invoices_get, 0, 0, EDGE_USER},
    {"GET", "/billing/invoices/{id}", "billing_invoice", invoice_get, 0, 0, EDGE_USER},
    {"GET", "/billing/invoices/{id}/html", "billing_invoice_html", invoice_html_get, 0, 0,
     EDGE_USER},
    {NULL, NULL, NULL, NULL, 0, 0, EDGE_PUBLIC},
};
