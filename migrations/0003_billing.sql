-- 0003_billing: plans, billing accounts, subscriptions, the double-entry ledger, invoices, payments and
-- the webhook inbox.

-- What can be bought. The request limit applies per `period` (a daily plan: 100 per day); paid plans
-- renew every period; a plan with a `duration` (the trial) ends after it instead of renewing.
CREATE TABLE plans (
    id              text PRIMARY KEY CHECK (id ~ '^[a-z][a-z0-9_]{0,31}$'),
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 100),
    price_minor     bigint NOT NULL CHECK (price_minor >= 0),  -- in minor units of currency (cents)
    currency        text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    request_limit   bigint NOT NULL CHECK (request_limit > 0),
    period          interval NOT NULL CHECK (period > interval '0'),
    duration        interval CHECK (duration > interval '0'),  -- NULL: renews each period
    features        text[] NOT NULL DEFAULT '{}',
    api_access      boolean NOT NULL DEFAULT false,
    purchasable     boolean NOT NULL DEFAULT true,  -- false for the trial: granted, never sold
    paddle_price_id text UNIQUE,  -- set per environment (sandbox and live prices differ)
    active          boolean NOT NULL DEFAULT true,  -- inactive plans stay valid for existing subscribers
    sort_order      integer NOT NULL DEFAULT 0,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    -- api_access is the flag the admission path reads; the feature list says the same for clients.
    CHECK (api_access = ('api_access' = ANY (features)))
);
COMMENT ON TABLE plans IS 'Subscription plans; request_limit per period; seeded by 0005_seed_plans.';
CREATE TRIGGER plans_touch BEFORE UPDATE ON plans
    FOR EACH ROW EXECUTE FUNCTION bg_touch_updated_at();

-- Who pays: a user or an organization, and its customer at Paddle.
CREATE TABLE billing_accounts (
    id                 uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id            uuid UNIQUE REFERENCES users (id),
    organization_id    uuid UNIQUE REFERENCES organizations (id),
    paddle_customer_id text UNIQUE,
    email              text,  -- billing address when it differs from the user's
    currency           text NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$'),
    trial_used_at      timestamptz,  -- the trial is granted once per account
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    CHECK (num_nonnulls(user_id, organization_id) = 1)
);
COMMENT ON TABLE billing_accounts IS 'The paying party (a user or an organization) and its Paddle customer.';
CREATE TRIGGER billing_accounts_touch BEFORE UPDATE ON billing_accounts
    FOR EACH ROW EXECUTE FUNCTION bg_touch_updated_at();

-- A user's plan over time. Paddle webhooks can arrive out of order: last_event_at holds the occurred_at
-- of the newest event applied, and an update carrying an older time is ignored
-- (UPDATE … WHERE last_event_at IS NULL OR last_event_at < $event_time).
CREATE TABLE subscriptions (
    id                     uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    billing_account_id     uuid NOT NULL REFERENCES billing_accounts (id),
    user_id                uuid NOT NULL REFERENCES users (id),  -- whose quota it grants
    organization_id        uuid REFERENCES organizations (id),
    plan_id                text NOT NULL REFERENCES plans (id),
    status                 text NOT NULL
                               CHECK (status IN ('trialing', 'active', 'past_due', 'paused', 'canceled')),
    current_period_start   timestamptz NOT NULL,
    current_period_end     timestamptz NOT NULL,
    trial_ends_at          timestamptz,
    cancel_at_period_end   boolean NOT NULL DEFAULT false,
    canceled_at            timestamptz,
    paused_at              timestamptz,
    scheduled_plan_id      text REFERENCES plans (id),  -- a downgrade takes effect at period end
    scheduled_change_at    timestamptz,
    paddle_subscription_id text UNIQUE,
    paddle_customer_id     text,
    last_event_at          timestamptz,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now(),
    CHECK (current_period_end > current_period_start),
    CHECK ((scheduled_plan_id IS NULL) = (scheduled_change_at IS NULL)),
    CHECK (status <> 'canceled' OR canceled_at IS NOT NULL)
);
COMMENT ON TABLE subscriptions IS 'Plans held by users; at most one live (not canceled) per user.';
-- One live subscription per user: buying a plan during the trial cancels the trial in the same
-- transaction; a plan change updates the live row.
CREATE UNIQUE INDEX subscriptions_live_key ON subscriptions (user_id) WHERE status <> 'canceled';
CREATE INDEX subscriptions_user_idx ON subscriptions (user_id, created_at DESC);
-- Renewal and expiry sweeps: live subscriptions whose period ends soon.
CREATE INDEX subscriptions_period_end_idx ON subscriptions (current_period_end)
    WHERE status <> 'canceled';
CREATE TRIGGER subscriptions_touch BEFORE UPDATE ON subscriptions
    FOR EACH ROW EXECUTE FUNCTION bg_touch_updated_at();

-- ---------------------------------------------------------------------------------------------------
-- The ledger (DESIGN.md §4). Double entry, append-only:
--   * an account holds one unit: an ISO 4217 currency (amounts in minor units) or 'request' (request
--     credits). Its balance is the sum of its entries' amounts.
--   * a transaction has two or more entries, and its amounts sum to zero in every unit; the check runs
--     at COMMIT (a deferred constraint trigger), so entries can be inserted one by one.
--   * entries and transactions are never updated or deleted: a mistake is corrected by a new
--     transaction (reverses_id points at the one it undoes).
--   * every transaction has a unique idempotency_key (Paddle event id, job id, …): a redelivered event
--     inserts nothing the second time (INSERT … ON CONFLICT (idempotency_key) DO NOTHING).
-- Example, granting 100 requests of a plan: +100 on the user's 'credits' account, −100 on the system
-- 'grants' account, both in unit 'request'.
-- ---------------------------------------------------------------------------------------------------
CREATE TABLE ledger_accounts (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    owner_type text NOT NULL CHECK (owner_type IN ('system', 'user', 'organization')),
    owner_id   uuid,  -- users.id or organizations.id; NULL for system accounts
    purpose    text NOT NULL CHECK (purpose ~ '^[a-z][a-z0-9_]{0,31}$'),  -- 'credits', 'held', 'revenue', …
    unit       text NOT NULL CHECK (unit ~ '^[A-Z]{3}$' OR unit = 'request'),
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((owner_type = 'system') = (owner_id IS NULL)),
    -- lets entries reference (account, unit), which ties an entry's unit to its account's
    UNIQUE (id, unit)
);
COMMENT ON TABLE ledger_accounts IS 'Ledger accounts, one unit each (currency or request credits).';
-- The natural key: find-or-create an account with INSERT … ON CONFLICT on these columns.
CREATE UNIQUE INDEX ledger_accounts_key ON ledger_accounts (owner_type, owner_id, purpose, unit)
    NULLS NOT DISTINCT;

CREATE TABLE ledger_transactions (
    id              uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    idempotency_key text NOT NULL UNIQUE CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    kind            text NOT NULL CHECK (kind ~ '^[a-z][a-z0-9_.]{0,63}$'),  -- 'grant.plan', 'usage.settle'
    description     text NOT NULL DEFAULT '' CHECK (length(description) <= 500),
    reverses_id     uuid REFERENCES ledger_transactions (id),
    user_id         uuid,  -- whom it concerns, for listings; not a foreign key (history outlives rows)
    metadata        jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(metadata) = 'object'),
    effective_at    timestamptz NOT NULL DEFAULT now(),  -- when it counts (a webhook's occurred_at)
    created_at      timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE ledger_transactions IS 'Ledger transactions; append-only; unique idempotency_key.';
CREATE INDEX ledger_transactions_user_idx ON ledger_transactions (user_id, created_at DESC)
    WHERE user_id IS NOT NULL;

CREATE TABLE ledger_entries (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    transaction_id uuid NOT NULL REFERENCES ledger_transactions (id),
    account_id     uuid NOT NULL,
    unit           text NOT NULL,
    amount         bigint NOT NULL CHECK (amount <> 0),  -- signed; the transaction sums to 0 per unit
    created_at     timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (account_id, unit) REFERENCES ledger_accounts (id, unit)
);
COMMENT ON TABLE ledger_entries IS 'Ledger entries; append-only; balanced per unit per transaction.';
CREATE INDEX ledger_entries_transaction_idx ON ledger_entries (transaction_id);
-- Balances and statements of an account; INCLUDE lets sum(amount) run as an index-only scan.
CREATE INDEX ledger_entries_account_idx ON ledger_entries (account_id, id) INCLUDE (amount);

-- Checks one transaction: at least two entries, zero sum in every unit. Raised as check_violation at
-- COMMIT, which rolls the whole database transaction back.
CREATE FUNCTION bg_ledger_check_transaction(tx uuid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    n      bigint;
    bad    text;
    excess numeric;
BEGIN
    SELECT count(*) INTO n FROM ledger_entries WHERE transaction_id = tx;
    IF n < 2 THEN
        RAISE EXCEPTION 'ledger transaction % has % entries; at least two are needed', tx, n
            USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_transaction_balanced';
    END IF;
    SELECT unit, sum(amount) INTO bad, excess FROM ledger_entries
     WHERE transaction_id = tx GROUP BY unit HAVING sum(amount) <> 0 LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'ledger transaction % is unbalanced in unit %: entries sum to %', tx, bad, excess
            USING ERRCODE = 'check_violation', CONSTRAINT = 'ledger_transaction_balanced';
    END IF;
END
$$;

CREATE FUNCTION bg_ledger_entry_balanced() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM bg_ledger_check_transaction(NEW.transaction_id);
    RETURN NULL;
END
$$;

CREATE FUNCTION bg_ledger_transaction_balanced() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM bg_ledger_check_transaction(NEW.id);
    RETURN NULL;
END
$$;

-- Deferred to COMMIT: by then every entry of the transaction is in. The trigger on transactions
-- catches a transaction committed without entries; the one on entries catches entries added to an
-- older transaction that would unbalance it.
CREATE CONSTRAINT TRIGGER ledger_entries_balanced AFTER INSERT ON ledger_entries
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION bg_ledger_entry_balanced();
CREATE CONSTRAINT TRIGGER ledger_transactions_balanced AFTER INSERT ON ledger_transactions
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION bg_ledger_transaction_balanced();

-- Append-only, whoever connects (the owner of a table bypasses REVOKE, not triggers).
CREATE TRIGGER ledger_entries_append_only BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION bg_refuse_change();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION bg_refuse_change();
CREATE TRIGGER ledger_transactions_append_only BEFORE UPDATE OR DELETE ON ledger_transactions
    FOR EACH ROW EXECUTE FUNCTION bg_refuse_change();
CREATE TRIGGER ledger_transactions_no_truncate BEFORE TRUNCATE ON ledger_transactions
    FOR EACH STATEMENT EXECUTE FUNCTION bg_refuse_change();
REVOKE UPDATE, DELETE, TRUNCATE ON ledger_entries, ledger_transactions FROM PUBLIC;

-- Balances derived from the entries (DESIGN.md §4: the truth from which Redis counters are rebuilt).
CREATE VIEW ledger_balances AS
    SELECT a.id AS account_id, a.owner_type, a.owner_id, a.purpose, a.unit,
           coalesce(sum(e.amount), 0)::bigint AS balance
      FROM ledger_accounts a
      LEFT JOIN ledger_entries e ON e.account_id = a.id
     GROUP BY a.id;
COMMENT ON VIEW ledger_balances IS 'Balance of every ledger account, summed from its entries.';

-- ---------------------------------------------------------------------------------------------------

-- Invoices as Paddle issues them (one per billed transaction), for /billing/history.
CREATE TABLE invoices (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    billing_account_id    uuid NOT NULL REFERENCES billing_accounts (id),
    subscription_id       uuid REFERENCES subscriptions (id),
    number                text UNIQUE,  -- the human-facing invoice number
    paddle_transaction_id text UNIQUE,
    status                text NOT NULL
                              CHECK (status IN ('draft', 'issued', 'paid', 'past_due', 'void', 'refunded')),
    currency              text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    subtotal_minor        bigint NOT NULL CHECK (subtotal_minor >= 0),
    tax_minor             bigint NOT NULL DEFAULT 0 CHECK (tax_minor >= 0),
    total_minor           bigint NOT NULL CHECK (total_minor >= 0),
    period_start          timestamptz,
    period_end            timestamptz,
    issued_at             timestamptz,
    paid_at               timestamptz,
    pdf_url               text,
    ledger_transaction_id uuid REFERENCES ledger_transactions (id),
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE invoices IS 'Invoices (from Paddle transactions), listed in /billing/history.';
CREATE INDEX invoices_account_idx ON invoices (billing_account_id, created_at DESC);
CREATE TRIGGER invoices_touch BEFORE UPDATE ON invoices
    FOR EACH ROW EXECUTE FUNCTION bg_touch_updated_at();

-- Money movements at the provider: charges, refunds, chargebacks.
CREATE TABLE payments (
    id                    uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    billing_account_id    uuid NOT NULL REFERENCES billing_accounts (id),
    invoice_id            uuid REFERENCES invoices (id),
    subscription_id       uuid REFERENCES subscriptions (id),
    provider              text NOT NULL DEFAULT 'paddle',
    provider_payment_id   text NOT NULL,
    kind                  text NOT NULL DEFAULT 'charge' CHECK (kind IN ('charge', 'refund', 'chargeback')),
    status                text NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed', 'canceled')),
    amount_minor          bigint NOT NULL CHECK (amount_minor >= 0),
    currency              text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    method                text,  -- 'card', 'paypal', …
    failure_reason        text,
    ledger_transaction_id uuid REFERENCES ledger_transactions (id),
    occurred_at           timestamptz NOT NULL,
    created_at            timestamptz NOT NULL DEFAULT now(),
    updated_at            timestamptz NOT NULL DEFAULT now(),
    UNIQUE (provider, provider_payment_id)
);
COMMENT ON TABLE payments IS 'Payments, refunds and chargebacks at the provider.';
CREATE INDEX payments_account_idx ON payments (billing_account_id, occurred_at DESC);
CREATE TRIGGER payments_touch BEFORE UPDATE ON payments
    FOR EACH ROW EXECUTE FUNCTION bg_touch_updated_at();

-- Every webhook delivery is recorded before it is acknowledged; (provider, event_id) makes a
-- redelivered event a no-op (INSERT … ON CONFLICT DO NOTHING). A worker processes unprocessed rows.
CREATE TABLE webhook_inbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    provider     text NOT NULL CHECK (provider ~ '^[a-z][a-z0-9_:.-]{0,63}$'),  -- 'paddle', 'telegram:<bot>'
    event_id     text NOT NULL CHECK (length(event_id) BETWEEN 1 AND 200),
    event_type   text NOT NULL CHECK (length(event_type) BETWEEN 1 AND 100),
    occurred_at  timestamptz,
    payload      jsonb NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,
    attempts     integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    error        text,
    UNIQUE (provider, event_id)
);
COMMENT ON TABLE webhook_inbox IS 'Received webhooks, deduplicated on (provider, event_id).';
CREATE INDEX webhook_inbox_pending_idx ON webhook_inbox (received_at) WHERE processed_at IS NULL;
