-- 0010_billing_changes_invoices: plan changes that keep what was paid for, invoices from Paddle
-- transactions, and refunds and chargebacks (Paddle adjustments).
--
-- Plan changes. Paddle changes a subscription's items at once, whatever the proration mode; a
-- downgrade (PATCH with proration_billing_mode full_next_billing_period) is billed at the next
-- renewal. The user keeps the plan paid for until then: every snapshot with a billing period
-- records its plan here, and the plan a subscription grants is the most expensive per day among
-- the plans seen for its current period (an upgrade counts at once, a downgrade from the next
-- period). This is a function of the set of snapshots, so it does not depend on their order. When
-- the newest snapshot's plan differs, subscriptions.scheduled_plan_id / scheduled_change_at (0003)
-- say which plan follows and when.
CREATE TABLE subscription_period_plans (
    subscription_id uuid NOT NULL REFERENCES subscriptions (id) ON DELETE CASCADE,
    period_start    timestamptz NOT NULL,
    plan_id         text NOT NULL REFERENCES plans (id),
    PRIMARY KEY (subscription_id, period_start, plan_id)
);
COMMENT ON TABLE subscription_period_plans IS
    'Plans seen in Paddle snapshots per billing period: the period grants the dearest (per day).';

-- Invoices come from Paddle transactions (one per transaction, keyed by paddle_transaction_id);
-- plan_id is the plan of its items (NULL when none is known).
ALTER TABLE invoices ADD COLUMN plan_id text REFERENCES plans (id);
-- Refunds and chargebacks are payments rows (kind refund/chargeback, provider_payment_id the
-- adjustment id) about the transaction they reverse.
ALTER TABLE payments ADD COLUMN paddle_transaction_id text;
CREATE INDEX payments_paddle_txn_idx ON payments (paddle_transaction_id)
    WHERE paddle_transaction_id IS NOT NULL;
CREATE INDEX invoices_account_issued_idx ON invoices (billing_account_id, issued_at DESC, id DESC);
