"""The scaler's control API: what `tidegate status`, `apply`, `pause` and `resume` talk to.

Served with aiohttp on the scaler's own unix socket (mode 0600, taken the way the ingress
takes its: :class:`ingress.unixsock.UnixListener`); the endpoints and messages are listed in
:mod:`scaler.messages`. The :class:`~scaler.daemon.Scaler` implements :class:`ScalerTarget`;
this module only translates HTTP to calls on it, with the same JSON error bodies as the
ingress's API.
"""

from __future__ import annotations

import logging
import os
import urllib.parse
from typing import Protocol

import msgspec
from aiohttp import web

from ingress.control import (
    UnixJsonClient,
    decode_body,
    error_response,
    json_errors,
    serve_unix,
)
from ingress.paths import runtime_root
from ingress.unixsock import UnixListener
from scaler.messages import (
    ApplyFile,
    ApplyRequest,
    ApplyResponse,
    ServiceStatus,
    StatusReport,
)
from scaler.spec import SpecError

__all__ = ["ScalerApiServer", "ScalerClient", "ScalerTarget", "default_scaler_socket"]

_log = logging.getLogger(__name__)

_MAX_BODY_BYTES = 4 * 1024 * 1024  # service files are a few KB; a few hundred fit
_SHUTDOWN_GRACE = 2.0  # seconds close() lets handlers finish (an apply waits for a build)


def default_scaler_socket() -> str:
    """``scaler.sock`` in tidegate's runtime directory (:func:`ingress.paths.runtime_root`)."""
    return str(runtime_root() / "scaler.sock")


class ScalerTarget(Protocol):
    """What the API drives: the scaler, or a fake in tests."""

    def status(self, service: str | None = None) -> StatusReport:
        """KeyError if ``service`` is given and unknown."""
        ...

    async def apply(self, files: list[ApplyFile]) -> ApplyResponse:
        """SpecError if any file is bad (nothing is changed then)."""
        ...

    def pause(self, service: str) -> ServiceStatus:
        """KeyError if unknown."""
        ...

    def resume(self, service: str) -> ServiceStatus:
        """KeyError if unknown."""
        ...

    async def delete(self, service: str) -> None:
        """KeyError if unknown."""
        ...


class ScalerApiServer:
    """Serves the scaler's API for ``target`` on the unix socket at ``path``."""

    def __init__(self, target: ScalerTarget, path: str | os.PathLike[str]) -> None:
        self._target = target
        self._listener = UnixListener(path)
        self._runner: web.AppRunner | None = None
        self._encoder = msgspec.json.Encoder()

    @property
    def path(self) -> str:
        return self._listener.path

    async def start(self) -> None:
        """Listen; ControlSocketError if a live process already answers on the socket."""
        if self._runner is not None:
            raise RuntimeError("ScalerApiServer.start() called twice")
        app = web.Application(middlewares=[json_errors], client_max_size=_MAX_BODY_BYTES)
        app.router.add_get("/v1/status", self._status)
        app.router.add_post("/v1/apply", self._apply)
        app.router.add_post("/v1/services/{name}/pause", self._pause)
        app.router.add_post("/v1/services/{name}/resume", self._resume)
        app.router.add_delete("/v1/services/{name}", self._delete)
        self._runner = await serve_unix(app, self._listener, _SHUTDOWN_GRACE)

    async def close(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
            self._listener.unlink()

    def _json(self, value: object) -> web.Response:
        return web.Response(body=self._encoder.encode(value), content_type="application/json")

    async def _status(self, request: web.Request) -> web.Response:
        service = request.query.get("service")
        try:
            return self._json(self._target.status(service))
        except KeyError:
            return _unknown(service or "")

    async def _apply(self, request: web.Request) -> web.Response:
        body = decode_body(await request.read(), ApplyRequest)
        if isinstance(body, web.Response):
            return body
        if not body.files:
            return error_response(400, "files: give at least one service file")
        try:
            return self._json(await self._target.apply(body.files))
        except SpecError as exc:
            return error_response(400, str(exc))

    async def _pause(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            return self._json(self._target.pause(name))
        except KeyError:
            return _unknown(name)

    async def _resume(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            return self._json(self._target.resume(name))
        except KeyError:
            return _unknown(name)

    async def _delete(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            await self._target.delete(name)
        except KeyError:
            return _unknown(name)
        return web.Response(status=204)


def _unknown(name: str) -> web.Response:
    return error_response(404, f"unknown service {name!r}")


class ScalerClient(UnixJsonClient):
    """A client of the scaler's API, for the commands and tests; errors are
    :class:`ingress.control.ControlError` (status 0: the scaler could not be reached)."""

    base_url = "http://tidegate-scaler"

    async def status(self, service: str | None = None) -> StatusReport:
        url = "/v1/status"
        if service is not None:
            url += "?service=" + urllib.parse.quote(service, safe="")
        return msgspec.json.decode(await self._call("GET", url), type=StatusReport)

    async def apply(self, files: list[ApplyFile]) -> ApplyResponse:
        body = msgspec.json.encode(ApplyRequest(files=files))
        return msgspec.json.decode(await self._call("POST", "/v1/apply", body), type=ApplyResponse)

    async def pause(self, service: str) -> ServiceStatus:
        data = await self._call("POST", f"/v1/services/{_quote(service)}/pause")
        return msgspec.json.decode(data, type=ServiceStatus)

    async def resume(self, service: str) -> ServiceStatus:
        data = await self._call("POST", f"/v1/services/{_quote(service)}/resume")
        return msgspec.json.decode(data, type=ServiceStatus)

    async def delete(self, service: str) -> None:
        await self._call("DELETE", f"/v1/services/{_quote(service)}")


def _quote(name: str) -> str:
    return urllib.parse.quote(name, safe="")
