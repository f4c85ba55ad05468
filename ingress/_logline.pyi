# The C access-log line (ingress/_logline.c); ingress.accesslog.py_line is the same in Python.

def line(
    offset: int,
    t0: int,
    granted: int,
    answered: int,
    end: int,
    request_id: bytes | str,
    trace_id: bytes | str | None,
    client: bytes | str,
    method: bytes | str | None,
    path: bytes | str | None,
    host: bytes | str | None,
    service: bytes | str | None,
    instance: bytes | str | None,
    status: int,
    bytes_in: int,
    bytes_out: int,
) -> bytes: ...
