"""Tenants: the tree region > district > hospital > department, with per-tenant
settings (enabled, quotas, retention, late-arrival window, HMAC policy)."""
