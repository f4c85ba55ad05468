"""Services with ``build:``: the image is built from the service file's context before any
instance starts, and the service then runs that exact image.

Why it works this way:

- **The spec names the built image by id, not by tag.** A tag moves on every rebuild, and
  :meth:`ServiceSpec.spec_hash` cannot see where a tag points. The id is content-addressed, so
  putting it in ``image`` makes the hash (which covers ``image`` and ``build``) change exactly
  when the build's output changes: that new revision is what replaces the running instances,
  one by one. It also pins every instance to the image it was started from, whatever the tag
  points to later.
- **An unchanged context gives the same id**, because the engine reuses its cached steps: a
  restarted ``tidegate up`` adopts its instances instead of replacing them. (After the build
  cache is pruned a rebuild makes a new id, and so one needless rolling replacement.)
- **``build`` stays in the returned spec**, so the hash still covers it: a different context or
  Dockerfile is a different service even where the output happens to be the same, and status
  can still say where the image came from.
- **The tag** ``tidegate-build/<service>:latest`` is for people (``docker images``), and the
  ``tidegate.service`` label finds a service's old builds to prune (``docker image prune
  --filter label=tidegate.service=<service>``); tidegate itself uses neither. Containers inherit
  image labels, which is harmless: the runtime sets the same ``tidegate.service`` on its own.
- **Nothing is pulled** (see :meth:`DockerRuntime.build`): the base images must be on the host.
"""

from __future__ import annotations

import msgspec

from scaler.runtime import LABEL_SERVICE
from scaler.runtimes.docker import DockerRuntime
from scaler.spec import ServiceSpec

__all__ = ["BUILD_REPOSITORY", "build_tag", "resolve_image"]

BUILD_REPOSITORY = "tidegate-build"  # built images are tagged BUILD_REPOSITORY/<service>:latest


def build_tag(service: str) -> str:
    """The tag a service's built image gets."""
    return f"{BUILD_REPOSITORY}/{service}:latest"


async def resolve_image(spec: ServiceSpec, runtime: DockerRuntime) -> ServiceSpec:
    """`spec` itself when it names an image; otherwise its build context built with `runtime`
    and `spec` with ``image`` set to the built image's id (``build`` kept).

    Raises :class:`scaler.runtime.LaunchError` saying why the build failed."""
    if spec.build is None:
        return spec
    image_id = await runtime.build(
        context=spec.build.context,
        dockerfile=spec.build.dockerfile,
        tag=build_tag(spec.name),
        labels={LABEL_SERVICE: spec.name},
    )
    return msgspec.structs.replace(spec, image=image_id)
