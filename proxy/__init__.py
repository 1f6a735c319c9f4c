"""stripe-sidecar: a Stripe-aware sidecar proxy."""

__version__ = "0.1.0"
__all__ = ["__version__"]
