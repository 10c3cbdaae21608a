"""TLS for the NATS broker from its URL's options (named like the Redis broker's):

    nats://host:4222?ssl_ca_certs=/etc/nats/ca.pem&ssl_certfile=/etc/nats/client.pem&ssl_keyfile=...

Any of them makes every connection TLS (the servers are dialled as tls://, so a server that does
not speak TLS is an error, never a silent plain connection). The context is built when the URL is
parsed, so a missing or unreadable file is a ConfigurationError when the App is made.
"""

from __future__ import annotations

import ssl
from urllib.parse import parse_qs, urlsplit

from offload.errors import ConfigurationError

TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_password")


def wants_tls(url: str) -> bool:
    query = parse_qs(urlsplit(url).query)
    return any(name in query for name in TLS_OPTIONS)


def tls_context(url: str) -> ssl.SSLContext | None:
    """The client's SSLContext for the URL's TLS options (None: none given): the system's CAs or
    ssl_ca_certs to check the server, and a client certificate from ssl_certfile (+ ssl_keyfile,
    ssl_password) for a server that verifies clients (`tls { verify: true }`)."""
    query = {k: v[-1] for k, v in parse_qs(urlsplit(url).query, keep_blank_values=True).items()}
    given = {name: query[name] for name in TLS_OPTIONS if name in query}
    if not given:
        return None
    for name, value in given.items():
        if not value:
            raise ConfigurationError(f"empty {name} in the NATS broker URL: give a path or leave it out")
    certfile = given.get("ssl_certfile")
    if certfile is None and ("ssl_keyfile" in given or "ssl_password" in given):
        raise ConfigurationError(
            "ssl_keyfile / ssl_password in the NATS broker URL need ssl_certfile (the client certificate)"
        )
    ca = given.get("ssl_ca_certs")
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"ssl_ca_certs={ca!r} in the NATS broker URL cannot be loaded: {exc}"
        ) from None
    if certfile is not None:
        try:
            context.load_cert_chain(certfile, given.get("ssl_keyfile"), given.get("ssl_password"))
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(
                f"the client certificate (ssl_certfile={certfile!r}) in the NATS broker URL cannot be "
                f"loaded: {exc}"
            ) from None
    return context
