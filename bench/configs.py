"""Configuration text for the backend and the reference proxies; pure functions, no I/O.

Rules shared by every file rendered here, so the comparison is about the proxy and nothing else:
one worker or thread, no access log, listen on 127.0.0.1 only, keep-alive both to the client
and to the backend. Every path is absolute and inside the run's temp dir, so nothing touches
the system's nginx or haproxy (pid files, temp dirs, logs).
"""

from __future__ import annotations

from pathlib import Path

__all__ = [
    "LARGE_PATH",
    "LARGE_SIZE",
    "SMALL_BODY",
    "SMALL_PATH",
    "backend_nginx_conf",
    "haproxy_conf",
    "proxy_nginx_conf",
]

SMALL_PATH = "/small"
LARGE_PATH = "/64k"
# 100 bytes of plain ASCII without quotes or backslashes, so it can sit inside an nginx string.
SMALL_BODY = ("tidegate proxy benchmark: small response body " + "." * 100)[:100]
LARGE_SIZE = 65536

# nginx recycles a keep-alive connection after `keepalive_requests` requests (1000 by default
# since 1.19.10). Left at that, every proxy would reconnect to the backend, and wrk to the
# proxy, a few times a second, and the figures would partly measure connection setup rather
# than proxying. One million is more than a 10 s cell ever sends over one connection.
_KEEPALIVE_REQUESTS = 1_000_000


def _nginx_common(prefix: Path) -> str:
    # `daemon off` keeps the master in our process group so it dies with it; the temp paths
    # point into the prefix because the packaged defaults live under /var/lib/nginx.
    return f"""\
daemon off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr warn;
events {{
    worker_connections 4096;
}}
"""


def _nginx_http_common(prefix: Path) -> str:
    return f"""\
    access_log off;
    keepalive_requests {_KEEPALIVE_REQUESTS};
    keepalive_timeout 75s;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
"""


def backend_nginx_conf(prefix: Path, port: int, docroot: Path) -> str:
    """The fast backend: /small answered from memory, /64k a static file under `docroot`."""
    return f"""\
{_nginx_common(prefix)}http {{
{_nginx_http_common(prefix)}    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        location = {SMALL_PATH} {{
            default_type text/plain;
            return 200 "{SMALL_BODY}";
        }}
        location = {LARGE_PATH} {{
            root {docroot};
        }}
    }}
}}
"""


def proxy_nginx_conf(prefix: Path, port: int, upstream_port: int) -> str:
    """nginx as a keep-alive reverse proxy, configured as its docs recommend for upstream reuse."""
    # `proxy_http_version 1.1` plus an empty Connection header is what lets the `keepalive`
    # pool work (nginx docs, ngx_http_upstream_module, "keepalive"); buffering stays default.
    return f"""\
{_nginx_common(prefix)}http {{
{_nginx_http_common(prefix)}    upstream backend {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests {_KEEPALIVE_REQUESTS};
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def haproxy_conf(port: int, upstream_port: int) -> str:
    """HAProxy in HTTP mode, one thread, reusing backend connections, no logging."""
    # No `log` line anywhere: HAProxy logs nothing unless told to. `http-reuse always` shares
    # idle backend connections between clients, as nginx's keepalive pool does.
    return f"""\
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 75s

frontend bench
    bind 127.0.0.1:{port}
    default_backend backend

backend backend
    server s1 127.0.0.1:{upstream_port}
"""
