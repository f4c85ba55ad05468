"""Service files: one YAML file per service, decoded into typed, frozen Structs.

Section 1 of the contract is the user-facing spec; this module is its only reader. Its rules:

- Everything is checked here, once, before anything runs: unknown keys, wrong types, values out
  of range and fields that contradict each other raise :class:`SpecError`, whose message is
  ``<file>: <key path>: <reason>`` (``hello.yaml: autoscaling.max_size: must be >= min_size
  (got 0 < 1)``). Only the first problem is reported, in the order the file is read, so the
  message is one line a user can act on. ``<file>`` is the path as it was given, as compilers
  print it.
- In the Structs durations are float seconds and sizes int bytes: the file's "5s" and "1GB"
  go through :mod:`ingress.units`, which the ingress's flags use too.
- Defaults are App Runner's where it has one, and live on the Struct fields only.
- A key written with no value (``secrets:`` with every entry commented out) counts as absent.
- Relative paths (``build.context``, secret files) are relative to the service file's
  directory, as in Docker Compose, so ``tidegate up`` works from any directory.

Decisions the contract leaves open:

- Domains are exact host names: the ingress routes by an exact Host lookup, so wildcards such
  as ``*.example.com`` are rejected rather than silently never matching.
- ``port`` is the container port in bridge mode only; with host networking or the process
  runtime every instance gets a free port in ``PORT``, so writing ``port`` there is an error.
  The process runtime always uses the host network (``network.mode`` defaults to host for it).
- ``PORT`` and every name starting with ``TIDEGATE_`` are reserved for what tidegate sets.
- A secret file's one trailing newline is dropped (what ``echo secret > file`` leaves).
- Environment values may be strings or numbers; booleans are rejected, because YAML reads
  ``yes``/``no``/``on``/``off`` as booleans and the text the user meant would be lost.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Literal, cast

import msgspec
import yaml

from ingress.messages import InstanceSpec, ServiceRouting
from ingress.units import parse_duration, parse_size

__all__ = [
    "MAX_SIZE_LIMIT",
    "AutoscalingSpec",
    "BuildSpec",
    "HealthCheckSpec",
    "InstanceSize",
    "NetworkSpec",
    "QueueSpec",
    "SecretRef",
    "ServiceSpec",
    "SpecError",
    "check_together",
    "load_service_file",
    "load_service_files",
    "parse_service",
    "parse_service_text",
    "resolve_secrets",
    "routing_for",
]

Runtime = Literal["docker", "process"]
HealthProtocol = Literal["tcp", "http"]
NetworkMode = Literal["bridge", "host"]

MAX_SIZE_LIMIT = 25  # App Runner's max_size quota; a caller may raise it (max_size_limit=)
_MAX_CONCURRENCY = 1000  # App Runner's upper limit for max_concurrency
_MAX_THRESHOLD = 20  # App Runner's 1..20 for healthy/unhealthy thresholds
_MAX_START_SECONDS = 600.0  # a start slower than 10 minutes is a broken start
_MAX_HEALTH_SECONDS = 20.0  # App Runner's 20 s ceiling for interval and timeout
_MAX_CPU = 64.0  # vCPU; the contract's ceiling
_MIN_MEMORY = parse_size("64MB")  # the contract's floor (Docker itself takes 6MB)
_DOCKERFILE = "Dockerfile"
_RESERVED_ENV = "PORT"
_RESERVED_PREFIX = "TIDEGATE_"  # TIDEGATE_SERVICE, TIDEGATE_INSTANCE and any later ones

_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"  # RFC 1123 section 2.1 host name label
_NAME = re.compile(rf"^{_LABEL}$")
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_MAX_DOMAIN = 253  # RFC 1035 section 2.3.4, as text without the trailing dot
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")  # POSIX shell variable names
_NETWORK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # what Docker accepts
_NO_SPACE = re.compile(r"^\S+$")


class SpecError(ValueError):
    """A service file (or a secret it names) that cannot be used; ``str()`` is the whole
    one-line message ``<source>: <key path>: <reason>`` (no key path for whole-file errors)."""

    def __init__(self, source: str, path: str, reason: str) -> None:
        self.source = source
        self.path = path
        self.reason = reason
        super().__init__(f"{source}: {path}: {reason}" if path else f"{source}: {reason}")


class BuildSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Build the image with the engine instead of naming one (``build: DIR`` is short for
    ``build: {context: DIR}``)."""

    context: str  # directory sent to the engine, relative to the service file; required
    dockerfile: str = _DOCKERFILE  # path inside the context; default "Dockerfile"


class SecretRef(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a secret's value comes from when an instance starts: exactly one of the two."""

    file: str | None = None  # read this file (relative to the service file); no default
    env: str | None = None  # or copy this variable of the scaler's environment; no default


class InstanceSize(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cpu: float = 0.5  # vCPU per instance, in (0, 64]; default 0.5
    memory: int = parse_size("1GB")  # bytes per instance, at least 64MB; default 1GB


class AutoscalingSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    min_size: int = 1  # instances kept while idle, 0..25; 0 = scale to zero; default 1
    max_size: int = 25  # instances at most, min_size..25 (25 = App Runner's quota); default 25
    max_concurrency: int = 100  # in-flight requests per instance, 1..1000; default 100
    scale_down_delay: float = 60.0  # seconds idle before an instance goes; default 60s


class HealthCheckSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    protocol: HealthProtocol = "tcp"  # tcp: the port accepts; http: GET path is 2xx/3xx
    path: str = "/"  # request path for http (must start with /); default "/"
    interval: float = 5.0  # seconds between checks, in (0, 20]; default 5s
    timeout: float = 2.0  # seconds one check may take, below interval; default 2s
    healthy_threshold: int = 1  # successes in a row to become ready, 1..20; default 1
    unhealthy_threshold: int = 5  # failures in a row to be replaced, 1..20; default 5
    start_timeout: float = 60.0  # seconds a new instance may take to be healthy, up to 10m


class QueueSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Requests held while instances start or all are at max_concurrency."""

    max_length: int = 1000  # held requests at most (at least 1); past it 503; default 1000
    timeout: float = 30.0  # seconds a request may be held before a 503; default 30s


class NetworkSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # bridge: the port is published on 127.0.0.1 only; host: the host's network stack.
    # Default bridge for docker; the process runtime is always host.
    mode: NetworkMode = "bridge"
    networks: tuple[str, ...] = ()  # extra Docker networks to join (bridge only); default none


class ServiceSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One service file, checked, with every default filled in."""

    name: str  # DNS label [a-z0-9-], 1..63 characters; required, unique per host
    runtime: Runtime = "docker"  # docker | process; default docker
    image: str | None = None  # docker: a local image reference; exclusive with build
    build: BuildSpec | None = None  # docker: build this instead of naming an image
    command: tuple[str, ...] | None = None  # argv; process: required; docker: overrides CMD
    port: int = 8080  # container port in bridge mode, 1..65535; default 8080
    env: dict[str, str] = {}  # environment variables for every instance; default none
    secrets: dict[str, SecretRef] = {}  # more variables, resolved at start; default none
    # Each section below defaults to its Struct's defaults (units and values on its fields).
    instance: InstanceSize = msgspec.field(default_factory=InstanceSize)  # 0.5 vCPU, 1GB
    autoscaling: AutoscalingSpec = msgspec.field(default_factory=AutoscalingSpec)  # 1..25
    health_check: HealthCheckSpec = msgspec.field(default_factory=HealthCheckSpec)  # tcp, 5s
    domains: tuple[str, ...] = ()  # exact Host names; none = the default route; default none
    request_timeout: float = 120.0  # seconds for a whole request before a 504; default 120s
    queue: QueueSpec = msgspec.field(default_factory=QueueSpec)  # 1000 requests, 30s
    network: NetworkSpec = msgspec.field(default_factory=NetworkSpec)  # bridge, no extras

    def spec_hash(self) -> str:
        """12 hex digits naming what an instance is made of (the ``tidegate.revision`` label).

        It changes exactly when running instances must be replaced: runtime, image or build,
        command, port, env, secret *references* (never values), size and network. Scaling,
        domains, queue, timeouts and health checks are applied without a new deployment.
        An image tag that now points elsewhere is the runtime's to notice, not this hash's.
        """
        identity = (
            self.runtime,
            self.image,
            self.build,
            self.command,
            self.port,
            self.env,
            self.secrets,
            self.instance,
            self.network,
        )
        # Sorted keys make env and secrets order-free; the version prefix is there so that a
        # change of this encoding is a deliberate new revision, not an accident.
        canonical = msgspec.json.encode(identity, order="sorted")
        return hashlib.sha256(b"tidegate-spec-v1\0" + canonical).hexdigest()[:12]


_SERVICE_DEFAULTS = ServiceSpec(name="defaults")


def routing_for(spec: ServiceSpec, instances: Iterable[InstanceSpec]) -> ServiceRouting:
    """What the ingress needs to route and hold this service's requests, with these instances."""
    return ServiceRouting(
        name=spec.name,
        domains=list(spec.domains),
        default=not spec.domains,
        max_concurrency=spec.autoscaling.max_concurrency,
        queue_max_length=spec.queue.max_length,
        queue_timeout=spec.queue.timeout,
        request_timeout=spec.request_timeout,
        instances=list(instances),
    )


def resolve_secrets(spec: ServiceSpec, environ: Mapping[str, str]) -> dict[str, str]:
    """The secrets' values, read now (at instance start) from files and ``environ``.

    A missing or unreadable source raises :class:`SpecError` naming the secret and where it was
    looked for; a value never appears in a message.
    """
    source = f"service {spec.name}"
    values: dict[str, str] = {}
    for name, ref in spec.secrets.items():
        path = f"secrets.{name}"
        if ref.file is not None:
            try:
                text = Path(ref.file).read_bytes().decode("utf-8")
            except OSError as exc:
                raise SpecError(source, path, f"cannot read {ref.file}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise SpecError(source, path, f"{ref.file} is not UTF-8 text") from None
            value = text.removesuffix("\n").removesuffix("\r")
        else:
            assert ref.env is not None  # parse_service guarantees exactly one
            if ref.env not in environ:
                raise SpecError(source, path, f"environment variable {ref.env} is not set")
            value = environ[ref.env]
        if "\0" in value:
            raise SpecError(source, path, "value contains a NUL byte")
        values[name] = value
    return values


# --- reading files -----------------------------------------------------------------------------


def load_service_files(
    paths: Iterable[str | os.PathLike[str]], *, max_size_limit: int = MAX_SIZE_LIMIT
) -> list[ServiceSpec]:
    """Every file's service, checked one by one and then against each other: names and
    domains are unique per host, and only one service may take the default route."""
    loaded = [(load_service_file(p, max_size_limit=max_size_limit), os.fspath(p)) for p in paths]
    check_together(loaded)
    return [spec for spec, _ in loaded]


def check_together(loaded: Iterable[tuple[ServiceSpec, str]]) -> None:
    """Services that run on one host: names and domains unique, one default route at most.
    Each is given with its source (a file name); the first of a clash is kept, the later
    one's source is named in the :class:`SpecError`."""
    names: dict[str, str] = {}
    domains: dict[str, tuple[str, str]] = {}
    default: tuple[str, str] | None = None
    for spec, source in loaded:
        if spec.name in names:
            reason = f"{spec.name!r} is already the name of the service in {names[spec.name]}"
            raise SpecError(source, "name", reason)
        for i, domain in enumerate(spec.domains):
            if domain in domains:
                other, other_source = domains[domain]
                reason = f"{domain!r} is already routed to service {other} in {other_source}"
                raise SpecError(source, f"domains[{i}]", reason)
        if not spec.domains:
            if default is not None:
                reason = (
                    f"none given, but service {default[0]} in {default[1]} already takes the "
                    "default route (give one of them domains)"
                )
                raise SpecError(source, "domains", reason)
            default = (spec.name, source)
        names[spec.name] = source
        domains.update({domain: (spec.name, source) for domain in spec.domains})


def load_service_file(
    path: str | os.PathLike[str], *, max_size_limit: int = MAX_SIZE_LIMIT
) -> ServiceSpec:
    """The service in one YAML file; :class:`SpecError` for anything wrong with it."""
    source = os.fspath(path)
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise SpecError(source, "", f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise SpecError(source, "", f"not UTF-8 text (byte {exc.start})") from None
    return parse_service_text(text, source, max_size_limit=max_size_limit)


def parse_service_text(
    text: str, source: str, *, max_size_limit: int = MAX_SIZE_LIMIT
) -> ServiceSpec:
    """The service in YAML ``text`` read from the file ``source`` (relative paths in it are
    resolved from that file's directory); :class:`SpecError` for anything wrong."""
    data = _load_yaml(text, source)
    base_dir = os.path.dirname(os.path.abspath(source))
    return parse_service(data, source, base_dir=base_dir, max_size_limit=max_size_limit)


def _load_yaml(text: str, source: str) -> object:
    """One YAML document with safe types only; duplicate keys are errors, not last-one-wins."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            raise SpecError(source, "", "the file is empty (expected a mapping of settings)")
        duplicate = _find_duplicate_key(node, "", set())
        if duplicate is not None:
            raise SpecError(source, *duplicate)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and problem.startswith("but "):  # "expected X" + "but found Y"
            problem = f"{exc.context}, {problem}"
        if mark is None:
            raise SpecError(source, "", f"invalid YAML: {problem}") from None
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        raise SpecError(source, where, problem) from None
    except yaml.YAMLError as exc:
        raise SpecError(source, "", f"invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def _find_duplicate_key(node: yaml.Node, path: str, seen: set[int]) -> tuple[str, str] | None:
    """(key path, reason) of the first key written twice in one mapping, else None."""
    if id(node) in seen:  # an alias: already checked where its anchor was
        return None
    seen.add(id(node))
    children: list[tuple[str, yaml.Node]] = []
    if isinstance(node, yaml.MappingNode):
        first: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            child = path
            if isinstance(key_node, yaml.ScalarNode):
                key = str(key_node.value)
                child = _at(path, key)
                if key in first:
                    mark, earlier = key_node.start_mark, first[key].start_mark
                    where = f"line {mark.line + 1}, column {mark.column + 1}"
                    return child, f"duplicate key ({where}; first at line {earlier.line + 1})"
                first[key] = key_node
            children.append((child, value_node))
    elif isinstance(node, yaml.SequenceNode):
        children = [(_at(path, i), item) for i, item in enumerate(node.value)]
    for child, child_node in children:
        found = _find_duplicate_key(child_node, child, seen)
        if found is not None:
            return found
    return None


# --- checking values ---------------------------------------------------------------------------


def parse_service(
    data: object,
    source: str,
    *,
    base_dir: str | None = None,
    max_size_limit: int = MAX_SIZE_LIMIT,
) -> ServiceSpec:
    """A checked :class:`ServiceSpec` from a decoded file (``source`` names it in errors).

    Relative paths are joined to ``base_dir`` when one is given. ``max_size_limit`` raises
    (or lowers) the ceiling of ``autoscaling.min_size`` and ``max_size``, 25 by default.
    """
    try:
        return _service(data, base_dir, max_size_limit)
    except _Invalid as exc:
        raise SpecError(source, exc.path, exc.reason) from None


class _Invalid(Exception):
    def __init__(self, path: str, reason: str) -> None:
        super().__init__(path, reason)
        self.path = path
        self.reason = reason


def _service(data: object, base_dir: str | None, max_size_limit: int) -> ServiceSpec:
    top = _Fields(data, "", ServiceSpec)
    if not top.has("name"):
        raise _Invalid("name", "required")
    name = top.text("name")
    if not _NAME.match(name):
        reason = "must be a DNS label: a-z, 0-9 and -, 1..63 characters, no - at either end"
        raise _Invalid("name", f"{reason} (got {name!r})")
    runtime = cast(Runtime, top.choice("runtime", ("docker", "process"), "docker"))

    image = top.text("image") if top.has("image") else None
    if image is not None and not _NO_SPACE.match(image):
        raise _Invalid("image", f"must be an image reference (got {image!r})")
    build = _build(top.value("build"), base_dir) if top.has("build") else None
    command = _command(top.value("command")) if top.has("command") else None
    if runtime == "docker":
        if image is None and build is None:
            raise _Invalid("image", "required for runtime docker (or give build)")
        if image is not None and build is not None:
            raise _Invalid("build", "not allowed together with image (give one of them)")
    else:
        for key in ("image", "build"):
            if top.has(key):
                raise _Invalid(key, "not allowed with runtime process")
        if command is None:
            raise _Invalid("command", "required for runtime process")

    network = _network(top.value("network"), runtime)
    if top.has("port") and (runtime == "process" or network.mode == "host"):
        why = "runtime process" if runtime == "process" else "network mode host"
        raise _Invalid("port", f"not used with {why} (each instance gets a free port in PORT)")
    port = top.integer("port", _SERVICE_DEFAULTS.port, 1, 65535)

    env = _env(top.value("env"))
    secrets = _secrets(top.value("secrets"), env, base_dir)
    domains = _domains(top.value("domains"))
    return ServiceSpec(
        name=name,
        runtime=runtime,
        image=image,
        build=build,
        command=command,
        port=port,
        env=env,
        secrets=secrets,
        instance=_instance(top.value("instance")),
        autoscaling=_autoscaling(top.value("autoscaling"), max_size_limit),
        health_check=_health_check(top.value("health_check")),
        domains=domains,
        request_timeout=top.duration("request_timeout", _SERVICE_DEFAULTS.request_timeout),
        queue=_queue(top.value("queue")),
        network=network,
    )


def _build(value: object, base_dir: str | None) -> BuildSpec:
    if isinstance(value, str):
        value = {"context": value}
    fields = _Fields(value, "build", BuildSpec)
    if not fields.has("context"):
        raise _Invalid("build.context", "required")
    context = _join(base_dir, fields.text("context"))
    return BuildSpec(context=context, dockerfile=fields.text("dockerfile", _DOCKERFILE))


def _command(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Invalid(
            "command", f"must be a list of strings (argv), e.g. [python3, app.py] {_got(value)}"
        )
    if not value:
        raise _Invalid("command", "must not be empty")
    for i, arg in enumerate(value):
        if not isinstance(arg, str):
            raise _Invalid(f"command[{i}]", f"must be a string {_got(arg)}")
    return tuple(value)


def _env(value: object) -> dict[str, str]:
    fields = _Fields(value, "env", None)
    env: dict[str, str] = {}
    for name, raw in fields.items():
        path = _check_env_name(name, "env")
        if isinstance(raw, bool):
            reason = (
                f"must be a string (got {_describe(raw)}; quote it, YAML reads yes/no as booleans)"
            )
            raise _Invalid(path, reason)
        if not isinstance(raw, str | int | float):
            raise _Invalid(path, f"must be a string or a number {_got(raw)}")
        text = str(raw)
        if "\0" in text:
            raise _Invalid(path, "must not contain a NUL byte")
        env[name] = text
    return env


def _secrets(value: object, env: Mapping[str, str], base_dir: str | None) -> dict[str, SecretRef]:
    fields = _Fields(value, "secrets", None)
    secrets: dict[str, SecretRef] = {}
    for name, raw in fields.items():
        path = _check_env_name(name, "secrets")
        if name in env:
            raise _Invalid(path, f"also set in env (env.{name}); give it in one place")
        ref = _Fields(raw, path, SecretRef)
        if ref.has("file") == ref.has("env"):
            raise _Invalid(path, "must have exactly one of file or env")
        if ref.has("file"):
            file = _join(base_dir, ref.text("file"))
            secrets[name] = SecretRef(file=file)
        else:
            var = ref.text("env")
            if not _ENV_NAME.match(var):
                raise _Invalid(f"{path}.env", f"must be an environment variable name (got {var!r})")
            secrets[name] = SecretRef(env=var)
    return secrets


def _check_env_name(name: str, section: str) -> str:
    path = _at(section, name)
    if not _ENV_NAME.match(name):
        raise _Invalid(path, "must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)")
    if name == _RESERVED_ENV or name.startswith(_RESERVED_PREFIX):
        raise _Invalid(
            path, f"reserved: tidegate sets {_RESERVED_ENV} and {_RESERVED_PREFIX}* itself"
        )
    return path


def _instance(value: object) -> InstanceSize:
    fields = _Fields(value, "instance", InstanceSize)
    default = InstanceSize()
    cpu = fields.number("cpu", default.cpu)
    if not 0 < cpu <= _MAX_CPU:
        raise _Invalid("instance.cpu", f"must be > 0 and <= {_MAX_CPU:g} vCPU (got {cpu:g})")
    memory = fields.size("memory", default.memory)
    if memory < _MIN_MEMORY:
        raise _Invalid("instance.memory", f"must be at least 64MB (got {memory} bytes)")
    return InstanceSize(cpu=cpu, memory=memory)


def _autoscaling(value: object, limit: int) -> AutoscalingSpec:
    fields = _Fields(value, "autoscaling", AutoscalingSpec)
    default = AutoscalingSpec()
    min_size = fields.integer("min_size", default.min_size, 0, limit)
    # The range is checked after the comparison so that min_size: 1, max_size: 0 gets the
    # contract's example message rather than a range message.
    max_size = fields.integer("max_size", max(default.max_size, min_size), None, None)
    if max_size < min_size:
        raise _Invalid("autoscaling.max_size", f"must be >= min_size (got {max_size} < {min_size})")
    if not 1 <= max_size <= limit:
        raise _Invalid("autoscaling.max_size", f"must be between 1 and {limit} (got {max_size})")
    return AutoscalingSpec(
        min_size=min_size,
        max_size=max_size,
        max_concurrency=fields.integer(
            "max_concurrency", default.max_concurrency, 1, _MAX_CONCURRENCY
        ),
        scale_down_delay=fields.duration(
            "scale_down_delay", default.scale_down_delay, allow_zero=True
        ),
    )


def _health_check(value: object) -> HealthCheckSpec:
    fields = _Fields(value, "health_check", HealthCheckSpec)
    default = HealthCheckSpec()
    protocol = cast(HealthProtocol, fields.choice("protocol", ("tcp", "http"), default.protocol))
    if fields.has("path") and protocol != "http":
        raise _Invalid("health_check.path", "only used with protocol: http")
    path = fields.text("path", default.path)
    if not path.startswith("/") or not _NO_SPACE.match(path):
        raise _Invalid(
            "health_check.path", f"must start with / and contain no spaces (got {path!r})"
        )
    interval = fields.duration("interval", default.interval, ceiling=_MAX_HEALTH_SECONDS)
    timeout = fields.duration("timeout", default.timeout, ceiling=_MAX_HEALTH_SECONDS)
    if timeout >= interval:
        raise _Invalid(
            "health_check.timeout",
            f"must be shorter than interval (got {timeout:g}s >= {interval:g}s)",
        )
    return HealthCheckSpec(
        protocol=protocol,
        path=path,
        interval=interval,
        timeout=timeout,
        healthy_threshold=fields.integer(
            "healthy_threshold", default.healthy_threshold, 1, _MAX_THRESHOLD
        ),
        unhealthy_threshold=fields.integer(
            "unhealthy_threshold", default.unhealthy_threshold, 1, _MAX_THRESHOLD
        ),
        start_timeout=fields.duration(
            "start_timeout", default.start_timeout, ceiling=_MAX_START_SECONDS
        ),
    )


def _domains(value: object) -> tuple[str, ...]:
    items = _list(value, "domains")
    first: dict[str, int] = {}
    for i, domain in enumerate(items):
        path = f"domains[{i}]"
        if not isinstance(domain, str):
            raise _Invalid(path, f"must be a string {_got(domain)}")
        if ":" in domain:
            reason = "must be a host name without a port"
        elif domain.startswith("*"):
            reason = "wildcards are not supported: list each host name"
        elif domain != domain.lower():
            reason = "must be lowercase"
        elif len(domain) > _MAX_DOMAIN or not _DOMAIN.match(domain):
            reason = "must be a DNS name such as hello.example.com"
        elif domain in first:
            reason = f"listed twice (also domains[{first[domain]}])"
        else:
            first[domain] = i
            continue
        raise _Invalid(path, f"{reason} (got {domain!r})")
    return tuple(first)  # every domain, in order: each was added once


def _queue(value: object) -> QueueSpec:
    fields = _Fields(value, "queue", QueueSpec)
    default = QueueSpec()
    return QueueSpec(
        max_length=fields.integer("max_length", default.max_length, 1, None),
        timeout=fields.duration("timeout", default.timeout),
    )


def _network(value: object, runtime: Runtime) -> NetworkSpec:
    fields = _Fields(value, "network", NetworkSpec)
    default_mode = "host" if runtime == "process" else NetworkSpec().mode
    mode = cast(NetworkMode, fields.choice("mode", ("bridge", "host"), default_mode))
    if runtime == "process" and mode != "host":
        raise _Invalid("network.mode", "must be host with runtime process")
    networks = _list(fields.value("networks"), "network.networks")
    if networks and mode == "host":
        why = "runtime process" if runtime == "process" else "mode host"
        raise _Invalid("network.networks", f"not allowed with {why}")
    names: list[str] = []
    for i, name in enumerate(networks):
        if not isinstance(name, str) or not _NETWORK_NAME.match(name):
            got = repr(name) if isinstance(name, str) else _describe(name)
            raise _Invalid(f"network.networks[{i}]", f"must be a Docker network name (got {got})")
        names.append(name)
    return NetworkSpec(mode=mode, networks=tuple(names))


# --- reading one mapping -----------------------------------------------------------------------


class _Fields:
    """One mapping of the file, its keys checked against a Struct's fields (or any string keys
    when ``struct`` is None); values are read by key, with the default when absent."""

    def __init__(self, value: object, path: str, struct: type[msgspec.Struct] | None) -> None:
        self._path = path
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise _Invalid(path, f"must be a mapping {_got(value)}")
        known = None if struct is None else set(struct.__struct_fields__)
        for key in value:
            if not isinstance(key, str):
                raise _Invalid(path, f"keys must be strings (got {_describe(key)})")
            if known is not None and key not in known:
                raise _Invalid(_at(path, key), "unknown key")
        self._values: dict[str, object] = value

    def items(self) -> list[tuple[str, object]]:
        return list(self._values.items())

    def has(self, key: str) -> bool:
        return self._values.get(key) is not None

    def value(self, key: str) -> object:
        return self._values.get(key)

    def text(self, key: str, default: str | None = None) -> str:
        value = self._values.get(key)
        if value is None and default is not None:
            return default
        if not isinstance(value, str) or not value:
            raise _Invalid(_at(self._path, key), f"must be a non-empty string {_got(value)}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self._values.get(key)
        if value is None:
            return default
        if value not in choices:
            shown = repr(value) if isinstance(value, str) else _describe(value)
            raise _Invalid(
                _at(self._path, key), f"must be one of {', '.join(choices)} (got {shown})"
            )
        return value

    def integer(self, key: str, default: int, low: int | None, high: int | None) -> int:
        value = self._values.get(key)
        if value is None:
            return default
        path = _at(self._path, key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(path, f"must be an integer {_got(value)}")
        if high is not None and low is not None and not low <= value <= high:
            raise _Invalid(path, f"must be between {low} and {high} (got {value})")
        if high is None and low is not None and value < low:
            raise _Invalid(path, f"must be at least {low} (got {value})")
        return value

    def number(self, key: str, default: float) -> float:
        value = self._values.get(key)
        if value is None:
            return default
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise _Invalid(_at(self._path, key), f"must be a number {_got(value)}")
        return float(value)

    def duration(
        self, key: str, default: float, *, allow_zero: bool = False, ceiling: float | None = None
    ) -> float:
        value = self._values.get(key)
        if value is None:
            return default
        path = _at(self._path, key)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _Invalid(path, f"must be a duration such as 250ms, 5s or 2m {_got(value)}")
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise _Invalid(path, str(exc)) from None
        if not math.isfinite(seconds) or (seconds == 0 and not allow_zero):
            raise _Invalid(
                path, f"must be {'at least' if allow_zero else 'more than'} 0s (got {value!r})"
            )
        if ceiling is not None and seconds > ceiling:
            raise _Invalid(path, f"must be at most {ceiling:g}s (got {value!r})")
        return seconds

    def size(self, key: str, default: int) -> int:
        value = self._values.get(key)
        if value is None:
            return default
        path = _at(self._path, key)
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise _Invalid(path, f"must be a size such as 512MB or 2GB {_got(value)}")
        try:
            return parse_size(value)
        except ValueError as exc:
            raise _Invalid(path, str(exc)) from None


def _list(value: object, path: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise _Invalid(path, f"must be a list {_got(value)}")
    return value


def _at(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _join(base_dir: str | None, path: str) -> str:
    return path if base_dir is None else os.path.normpath(os.path.join(base_dir, path))


def _got(value: object) -> str:
    return f"(got {_describe(value)})"


def _describe(value: object) -> str:
    """A value's YAML type and, for scalars, the value itself, short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"string {shown!r}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__
