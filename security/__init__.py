"""Security: identities and sessions, Casbin authorisation over the tenant tree,
SM3/SM4 cryptography, the audit hash chain, and rate limits. Imports nothing of
rmiot but the database helpers."""
