-- 0005_seed_plans: the plans of the product plan (§8.2.1) and the 14-day trial.
-- Prices are in US cents. Paddle price ids differ between sandbox and live and are set by the operator
-- (UPDATE plans SET paddle_price_id = … WHERE id = …). Later price changes are new migrations.
INSERT INTO plans (id, name, price_minor, currency, request_limit, period, duration, features,
                   api_access, purchasable, sort_order)
VALUES
    ('daily', 'Daily', 99, 'USD', 100, interval '1 day', NULL,
     ARRAY['email_support'], false, true, 10),
    ('weekly', 'Weekly', 499, 'USD', 1000, interval '7 days', NULL,
     ARRAY['email_support', 'chat_support'], false, true, 20),
    ('monthly', 'Monthly', 1999, 'USD', 10000, interval '1 month', NULL,
     ARRAY['email_support', 'chat_support', 'priority_support', 'api_access'], true, true, 30),
    -- 12 × 19.99 = 239.88: the yearly price is about 17 % less.
    ('yearly', 'Yearly', 19999, 'USD', 150000, interval '1 year', NULL,
     ARRAY['email_support', 'chat_support', 'priority_support', 'phone_support', 'api_access',
           'advanced_analytics'], true, true, 40),
    -- Granted once per billing account, never sold: 50 requests a day for 14 days, no API access.
    ('trial', 'Trial', 0, 'USD', 50, interval '1 day', interval '14 days',
     ARRAY['email_support'], false, false, 0);
