-- 0009_paddle_inbox: what the billing worker needs to apply Paddle events in occurred_at order.
--
-- webhook_inbox.outcome says what applying an event did, for audit and support: 'applied' (it moved
-- the subscription or posted to the ledger), 'stale' (an older snapshot than the one applied; kept,
-- never applied), 'recorded' (stored, nothing to change: a duplicate money event, a failed
-- payment), 'ignored' (a type the billing worker does not act on).
ALTER TABLE webhook_inbox ADD COLUMN outcome text
    CHECK (outcome IN ('applied', 'stale', 'recorded', 'ignored'));
CREATE INDEX webhook_inbox_type_idx ON webhook_inbox (provider, event_type, occurred_at);

-- subscriptions.last_event_at orders whole snapshots (status, plan, flags). A canceled or paused
-- snapshot carries no billing period, so the period has its own clock: the occurred_at of the
-- newest snapshot that had one. Then the period a row ends with is the same whatever order the
-- events arrived in. NULL: the period is a placeholder (the first event seen had none).
ALTER TABLE subscriptions ADD COLUMN paddle_period_at timestamptz;
-- Paddle's own price of the current plan, for support (the plan is found through plans.paddle_price_id).
ALTER TABLE subscriptions ADD COLUMN paddle_price_id text;
