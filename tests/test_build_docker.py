"""Building a service's image (``build:``) with DockerRuntime.build and scaler.build, against
the real engine.

Contexts are directories under tmp_path, FROM scratch with the host's busybox copied in, read
through real service files so that the loader's path resolution is part of what is tested.
Each test has its own service name (``tgtest-<random>``), so its images are tagged
``tidegate-build/tgtest-<random>:latest`` and labelled with that name; on the way out, also
when the test fails, they are removed (with the untagged step images under them). No build
here fails after a step that made a new image, so no failure leaves one behind either.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from scaler.build import build_tag, resolve_image
from scaler.runtime import LABEL_SERVICE, LaunchError
from scaler.runtimes.docker import DockerRuntime
from scaler.spec import ServiceSpec, load_service_file
from tests.images import (  # images_fixture registers the `images` fixture here
    BUSYBOX,
    SERVICE_PREFIX,
    TEST_SCOPE,
    TestImages,
    images_fixture,  # noqa: F401
)

pytestmark = [pytest.mark.docker, pytest.mark.slow]

HELLO = "hello from a tidegate build test\n"
APP_DOCKERFILE = """\
FROM scratch
COPY busybox /bin/busybox
COPY www /www
CMD ["/bin/busybox", "cat", "/www/index.html"]
"""


class Builds:
    """One test's service: writes contexts and service files, and checks the engine's images."""

    def __init__(self, client: Any, root: Path) -> None:
        self.client = client
        self.root = root
        self.service = f"{SERVICE_PREFIX}{secrets.token_hex(4)}"

    def context(self, dockerfile: str, files: dict[str, str] | None = None) -> Path:
        """tmp/app: the Dockerfile, busybox and `files` (default www/index.html = HELLO)."""
        app = self.root / "app"
        app.mkdir(exist_ok=True)
        (app / "Dockerfile").write_text(dockerfile)
        shutil.copy2(BUSYBOX, app / "busybox")
        for name, text in (files if files is not None else {"www/index.html": HELLO}).items():
            (app / name).parent.mkdir(parents=True, exist_ok=True)
            (app / name).write_text(text)
        return app

    def spec(self, build: str = "{context: app}") -> ServiceSpec:
        """The service, loaded from tmp/<service>.yaml: relative paths are from tmp."""
        path = self.root / f"{self.service}.yaml"
        path.write_text(f"name: {self.service}\nruntime: docker\nbuild: {build}\n")
        return load_service_file(path)

    def images(self) -> list[Any]:
        return list(self.client.images.list(filters={"label": f"{LABEL_SERVICE}={self.service}"}))

    def run(self, image: str) -> str:
        """What the image's command prints (it cats the page)."""
        return bytes(self.client.containers.run(image, remove=True)).decode()


@pytest.fixture
def builds(images: TestImages, tmp_path: Path) -> Iterator[Builds]:
    import docker

    client = docker.from_env()
    b = Builds(client, tmp_path)
    try:
        yield b
    finally:
        for image in b.images():
            with contextlib.suppress(Exception):  # gone already with a later one
                client.images.remove(image.id, force=True)
        client.close()


@pytest.fixture
async def runtime(builds: Builds) -> AsyncIterator[DockerRuntime]:
    rt = DockerRuntime(scope_labels=TEST_SCOPE)
    try:
        yield rt
    finally:
        await rt.close()


async def test_build_resolves_the_spec_to_the_built_image(
    builds: Builds, runtime: DockerRuntime
) -> None:
    builds.context(APP_DOCKERFILE)
    spec = builds.spec()
    assert spec.build is not None and spec.build.context == str(builds.root / "app")

    resolved = await resolve_image(spec, runtime)

    assert resolved.image is not None and resolved.image.startswith("sha256:")
    assert resolved.build == spec.build  # kept, so the hash still covers it
    assert resolved.spec_hash() != spec.spec_hash()
    assert msgspec.structs.replace(resolved, image=None) == spec  # nothing else changed
    image = builds.client.images.get(resolved.image)
    assert image.id == resolved.image
    assert build_tag(builds.service) in image.tags
    assert image.labels[LABEL_SERVICE] == builds.service
    assert await asyncio.to_thread(builds.run, resolved.image) == HELLO

    again = await resolve_image(spec, runtime)  # unchanged context: the engine's cache
    assert again.image == resolved.image
    assert again.spec_hash() == resolved.spec_hash()


async def test_a_changed_file_changes_the_image_and_the_hash(
    builds: Builds, runtime: DockerRuntime
) -> None:
    app = builds.context(APP_DOCKERFILE)
    spec = builds.spec()
    first = await resolve_image(spec, runtime)

    (app / "www" / "index.html").write_text("changed\n")
    second = await resolve_image(spec, runtime)

    assert second.image != first.image
    assert second.spec_hash() != first.spec_hash()
    assert await asyncio.to_thread(builds.run, str(second.image)) == "changed\n"
    # the tag moved to the new build; the old one is still there for its running instances
    assert build_tag(builds.service) in builds.client.images.get(str(second.image)).tags
    assert {str(first.image), str(second.image)} <= {image.id for image in builds.images()}


async def test_a_spec_with_an_image_is_returned_as_it_is() -> None:
    def no_engine() -> Any:
        raise AssertionError("resolve_image must not reach the engine for an image")

    spec = ServiceSpec(name=f"{SERVICE_PREFIX}image", image="tidegate-test/any:1")
    rt = DockerRuntime(no_engine)
    try:
        assert await resolve_image(spec, rt) is spec
    finally:
        await rt.close()


async def test_stages_are_not_taken_for_base_images(builds: Builds, runtime: DockerRuntime) -> None:
    builds.context(
        "ARG BASE=base\n"
        "FROM scratch AS Base\n"
        "COPY busybox /bin/busybox\n"
        "FROM ${BASE}\n"
        "COPY --from=base /bin/busybox /bin/busybox2\n"
        "COPY --from=0 /bin/busybox /bin/busybox3\n"
    )
    resolved = await resolve_image(builds.spec(), runtime)
    assert resolved.image is not None and resolved.image.startswith("sha256:")


async def test_a_missing_context_is_a_launch_error(builds: Builds, runtime: DockerRuntime) -> None:
    spec = builds.spec("{context: nowhere}")
    with pytest.raises(LaunchError, match=r"nowhere: the build context does not exist$"):
        await resolve_image(spec, runtime)


async def test_a_missing_dockerfile_is_a_launch_error(
    builds: Builds, runtime: DockerRuntime
) -> None:
    builds.context(APP_DOCKERFILE)
    spec = builds.spec("{context: app, dockerfile: Dockerfile.prod}")
    with pytest.raises(LaunchError, match=r"app: there is no Dockerfile Dockerfile\.prod in it$"):
        await resolve_image(spec, runtime)


@pytest.mark.parametrize(
    ("dockerfile", "line"),
    [
        ("FROM doesnotexist-tidegate:never\n", 1),
        ("ARG BASE=doesnotexist-tidegate:never\nFROM scratch AS ok\nFROM ${BASE}\n", 3),
        ("FROM scratch\nCOPY --from=doesnotexist-tidegate:never / /\n", 2),
    ],
    ids=["from", "from-arg", "copy-from"],
)
async def test_a_missing_base_image_fails_without_pulling(
    builds: Builds, runtime: DockerRuntime, dockerfile: str, line: int
) -> None:
    builds.context(dockerfile)
    spec = builds.spec()
    started = time.monotonic()
    with pytest.raises(LaunchError) as caught:
        await resolve_image(spec, runtime)
    message = str(caught.value)
    # Left to itself the engine would try the registry, even with pull=False.
    assert message.endswith(
        f"image doesnotexist-tidegate:never (Dockerfile line {line}) is not on this host, "
        "and tidegate never pulls: pull or build it first"
    )
    assert "registry" not in message
    assert time.monotonic() - started < 5.0
    assert builds.images() == []


async def test_a_failing_step_is_a_launch_error_with_its_output(
    builds: Builds, runtime: DockerRuntime
) -> None:
    # The base is built first, labelled, so that the failed build leaves no step image of
    # its own (the engine keeps a failed build's last good step, as `docker build` does).
    builds.context("FROM scratch\nCOPY busybox /bin/busybox\n")
    base = await runtime.build(
        context=str(builds.root / "app"),
        dockerfile="Dockerfile",
        tag=f"tidegate-build/{builds.service}:base",
        labels={LABEL_SERVICE: builds.service},
    )
    # scratch has no /bin/sh, so the step's command is in exec form and runs busybox's own
    builds.context(
        f'FROM {base}\nRUN ["/bin/busybox", "sh", "-c", "echo tidegate-step-output >&2; exit 3"]\n'
    )
    with pytest.raises(LaunchError) as caught:
        await resolve_image(builds.spec(), runtime)
    message = str(caught.value)
    assert message.startswith(f"cannot build image {build_tag(builds.service)} from ")
    assert "returned a non-zero code: 3" in message
    assert "Step 2/3 : RUN" in message  # the failing step, then what it printed
    assert message.endswith("tidegate-step-output)")
    assert "\n" not in message and "\x1b" not in message
    assert [image.id for image in builds.images()] == [base]


# With the API version left to find out, the client fails as it is made (the default's way);
# with one given, the build's own request is what fails (dockerd gone since).
@pytest.mark.parametrize("version", [None, "1.41"], ids=["when-made", "when-building"])
async def test_an_unreachable_engine_is_a_launch_error(builds: Builds, version: str | None) -> None:
    import docker

    builds.context(APP_DOCKERFILE)
    spec = builds.spec()
    socket = f"unix://{builds.root}/no.sock"
    rt = DockerRuntime(lambda: docker.DockerClient(base_url=socket, version=version))
    try:
        with pytest.raises(LaunchError, match=r"^cannot reach the Docker engine"):
            await resolve_image(spec, rt)
    finally:
        await rt.close()
