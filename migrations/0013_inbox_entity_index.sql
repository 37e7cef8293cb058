-- 0013_inbox_entity_index: find a Paddle entity's events (a transaction's, for the payment method
-- /billing/account shows) without scanning the inbox.
CREATE INDEX webhook_inbox_paddle_entity_idx ON webhook_inbox ((payload -> 'data' ->> 'id'))
    WHERE provider = 'paddle';
