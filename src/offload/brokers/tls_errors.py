"""What to tell a user whose broker connection failed its TLS handshake (shared by the Redis,
NATS and RabbitMQ brokers, which all take the same TLS options in their URLs)."""

from __future__ import annotations

TLS_SETTINGS_HINT = (
    "check the TLS options in OFFLOAD_BROKER_URL: ssl_ca_certs (the CA that signed the server's "
    "certificate), ssl_certfile and ssl_keyfile (a client certificate, if the server asks for one)"
)


def tls_hint(exc: BaseException | None) -> str | None:
    """The hint for a failed TLS handshake (the server is there; the settings are wrong), or None
    when `exc` is not one. ssl.SSLError's text always names SSL; redis-py and aiormq wrap it in
    their own exceptions, so the text is what survives."""
    if exc is not None and "SSL" in str(exc):
        return TLS_SETTINGS_HINT
    return None
