"""tidegate ingress: the data plane (HTTP/1.1 + TLS reverse proxy)."""
