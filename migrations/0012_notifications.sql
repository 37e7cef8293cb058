-- 0012_notifications: what the notify worker needs to derive notifications from durable facts
-- (docs/notifications.md).
--
-- The producer reads applied Paddle events from webhook_inbox in (processed_at, id) order past a
-- cursor kept here, so a restart neither repeats nor skips them (notifications.dedupe_key makes a
-- repeat harmless anyway). The cursor starts at the moment this migration runs: events applied
-- before notifications existed are history, not news.
CREATE TABLE notification_cursors (
    name        text PRIMARY KEY CHECK (name ~ '^[a-z][a-z0-9_.]{0,63}$'),
    position_at timestamptz NOT NULL,  -- processed_at of the last inbox row read
    position_id bigint NOT NULL DEFAULT 0,  -- its id (ties on processed_at)
    updated_at  timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE notification_cursors IS 'Where the notification producer stopped reading a source.';
CREATE TRIGGER notification_cursors_touch BEFORE UPDATE ON notification_cursors
    FOR EACH ROW EXECUTE FUNCTION bg_touch_updated_at();
INSERT INTO notification_cursors (name, position_at) VALUES ('paddle_inbox', now());

-- The producer's scan: applied Paddle events in the order they were applied.
CREATE INDEX webhook_inbox_processed_idx ON webhook_inbox (processed_at, id)
    WHERE provider = 'paddle' AND processed_at IS NOT NULL;
-- "Renewed" compares a subscription event with the earlier events of the same subscription.
CREATE INDEX webhook_inbox_paddle_subscription_idx ON webhook_inbox ((payload -> 'data' ->> 'id'))
    WHERE provider = 'paddle' AND event_type LIKE 'subscription.%';
-- "Trial ending in 3 days": trials by their end.
CREATE INDEX subscriptions_trial_end_idx ON subscriptions (trial_ends_at) WHERE status = 'trialing';
-- GET /notifications: a user's in-app notifications, newest first, and the unread count.
CREATE INDEX notifications_web_idx ON notifications (user_id, created_at DESC, id DESC)
    WHERE channel = 'web';
