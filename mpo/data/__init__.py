"""Preference data: records and formats, rendering, packing."""

from mpo.data.plan import plan_packing

__all__ = ["plan_packing"]
