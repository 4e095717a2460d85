"""Helpers and doubles the tests share: a frozen clock, test plans, running servers,
Stripe objects and a Stripe double, an identity provider, an SMTP sink."""
