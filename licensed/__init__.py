"""licensed: a self-hosted license server for software sold through Stripe."""

__version__ = "0.2.0"
