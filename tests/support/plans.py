"""The plans file every test server reads."""

SOLD_PLANS = """\
[products.dashcaddy]
name = "DashCaddy"
key_prefix = "DC"

[plans.pro-monthly]
product = "dashcaddy"
name = "DashCaddy Pro, monthly"
tier = "PRO"
stripe_price = "price_pro_monthly"
max_machines = 1
features = ["sso", "recipes"]
grace_days = 7

[plans.team-monthly]
product = "dashcaddy"
name = "DashCaddy Team, monthly"
tier = "TEAM"
stripe_price = "price_team_monthly"
max_machines = 3
features = ["sso", "recipes", "swarm"]
grace_days = 7
"""
"""The plans whose prices the Stripe emulator sells (support/emulator.py makes them there)."""

TEST_PLANS = (
    SOLD_PLANS
    + """
[products.desktop]
name = "Desktop App"
key_prefix = "DT"

[plans.basic-monthly]
product = "dashcaddy"
name = "DashCaddy Basic, monthly"
tier = "BASE"
stripe_price = "price_basic_monthly"
max_machines = 1
features = []
grace_days = 3

[plans.pro-year]
product = "dashcaddy"
name = "DashCaddy Pro, one year"
tier = "PRO"
stripe_price = "price_pro_year"
features = ["sso"]
duration_days = 365

[plans.lifetime]
product = "dashcaddy"
name = "DashCaddy Lifetime"
tier = "LIFE"
max_machines = 2
features = ["sso", "recipes", "swarm"]
lifetime = true
public = false

[plans.desktop-pro]
product = "desktop"
name = "Desktop Pro"
tier = "PRO"
stripe_price = "price_desktop_pro"
features = ["export"]
duration_days = 30
"""
)
