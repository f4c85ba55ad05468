"""The routing table kept across ingress restarts (ingress/routestore.py, --routes-file)."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from ingress.messages import InstanceSpec
from tests.backends import running_backends
from tests.conftest import routing, running_ingress, url, wait_for


async def test_a_restarted_ingress_routes_at_once_from_its_saved_table(tmp_path: Path) -> None:
    path = tmp_path / "routes.json"
    async with running_backends(1) as (backend,):
        async with running_ingress([], routes_file=str(path)) as ingress:
            ingress.router.put_service(routing())
            ingress.router.put_instances("svc", [InstanceSpec(id="i1", address=backend.address)])

            def saved() -> bool:
                if not path.exists():
                    return False
                table = json.loads(path.read_text())
                return [i["id"] for i in table[0]["instances"]] == ["i1"]

            await wait_for(saved, 5, "the table saved")
        assert saved()  # closing the ingress did not empty it
        assert oct(path.stat().st_mode & 0o777) == "0o600"

        async with (
            running_ingress([], routes_file=str(path)) as again,
            aiohttp.ClientSession() as session,
            session.get(url(again, "/echo")) as response,
        ):
            assert response.status == 200  # no control call: the saved table serves
            assert backend.requests == 1
            again.router.delete_service("svc")
            await wait_for(lambda: json.loads(path.read_text()) == [], 5, "the deletion saved")


@pytest.mark.parametrize("content", ["{not json", '[{"name": 3}]'])
async def test_an_unreadable_table_is_ignored(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "routes.json"
    path.write_text(content)
    async with running_ingress([], routes_file=str(path)) as ingress:
        assert ingress.router.all_services() == []
    assert "ignoring the saved routes" in caplog.text
