"""The web dashboard: live pages for the health commission, hospital operators
and on-call engineers, served by the platform on its own HTTP port
(``[dashboard]``).

It holds no data and no users of its own: it is a client of the platform's
gRPC API acting as the person logged in (``gateway``), so logins, sessions,
TOTP, authorisation by tenant reach, NOT_FOUND across tenants,
de-identification for commission roles and the audit of every call are the
API's own. The HTTP layer (``server``) adds an audit record and a span per
request, and pushes live figures with server-sent events.
"""
