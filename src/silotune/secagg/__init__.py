"""Secure aggregation that holds against an active coordinator: one stage driver, any carrier."""
