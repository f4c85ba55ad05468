"""Service files: defaults, every rule's exact message, hashing, routing and secrets."""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import yaml

from ingress.messages import InstanceSpec, ServiceRouting
from scaler.spec import (
    AutoscalingSpec,
    BuildSpec,
    HealthCheckSpec,
    InstanceSize,
    NetworkSpec,
    QueueSpec,
    SecretRef,
    ServiceSpec,
    SpecError,
    load_service_file,
    load_service_files,
    parse_service,
    resolve_secrets,
    routing_for,
)

MINIMAL = "name: hello\nimage: hello:1\n"


@pytest.fixture
def write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], str]:
    """Writes YAML text to a file in a fresh working directory; returns its relative name."""
    monkeypatch.chdir(tmp_path)

    def write(text: str, name: str = "hello.yaml") -> str:
        Path(name).write_text(textwrap.dedent(text), encoding="utf-8")
        return name

    return write


@pytest.fixture
def load(write: Callable[[str, str], str]) -> Callable[[str], ServiceSpec]:
    """Writes YAML text to hello.yaml and loads it."""

    def load(text: str) -> ServiceSpec:
        return load_service_file(write(text, "hello.yaml"))

    return load


def test_minimal_file_gets_app_runner_defaults(load: Callable[[str], ServiceSpec]) -> None:
    """A file with only a name and an image gets every default the contract lists."""
    spec = load(MINIMAL)
    assert spec == ServiceSpec(name="hello", image="hello:1")
    assert spec.runtime == "docker"
    assert spec.port == 8080
    assert spec.env == {} and spec.secrets == {}
    assert spec.instance == InstanceSize(cpu=0.5, memory=1_000_000_000)
    assert spec.autoscaling == AutoscalingSpec(
        min_size=1, max_size=25, max_concurrency=100, scale_down_delay=60.0
    )
    assert spec.health_check == HealthCheckSpec(
        protocol="tcp",
        path="/",
        interval=5.0,
        timeout=2.0,
        healthy_threshold=1,
        unhealthy_threshold=5,
    )
    assert spec.domains == ()
    assert spec.request_timeout == 120.0
    assert spec.queue == QueueSpec(max_length=1000, timeout=30.0)
    assert spec.network == NetworkSpec(mode="bridge", networks=())


def test_full_example_is_read(load: Callable[[str], ServiceSpec], tmp_path: Path) -> None:
    """The contract's example (with build dropped: it is exclusive with image) reads as written."""
    spec = load(
        """\
        name: hello                  # required
        runtime: docker
        image: hello:1
        command: ["python3", "app.py"]
        port: 8081
        env: {LOG_LEVEL: info, WORKERS: 4, RATIO: 0.5}
        secrets:
          DB_PASSWORD: {file: /etc/tidegate/secrets/db-password}
          API_KEY: {env: HOST_API_KEY}
          TOKEN: {file: token.txt}
        instance: {cpu: 1, memory: 2GB}
        autoscaling:
          min_size: 0
          max_size: 5
          max_concurrency: 50
          scale_down_delay: 2m
        health_check:
          protocol: http
          path: /healthz
          interval: 10s
          timeout: 500ms
          healthy_threshold: 2
          unhealthy_threshold: 3
          start_timeout: 2m
        domains: [hello.example.com, www.hello.example.com]
        request_timeout: 30s
        queue:
          max_length: 10
          timeout: 5s
        network:
          mode: bridge
          networks: [db, cache_net]
        """
    )
    assert spec == ServiceSpec(
        name="hello",
        image="hello:1",
        command=("python3", "app.py"),
        port=8081,
        env={"LOG_LEVEL": "info", "WORKERS": "4", "RATIO": "0.5"},
        secrets={
            "DB_PASSWORD": SecretRef(file="/etc/tidegate/secrets/db-password"),
            "API_KEY": SecretRef(env="HOST_API_KEY"),
            "TOKEN": SecretRef(file=str(tmp_path / "token.txt")),
        },
        instance=InstanceSize(cpu=1.0, memory=2_000_000_000),
        autoscaling=AutoscalingSpec(
            min_size=0, max_size=5, max_concurrency=50, scale_down_delay=120.0
        ),
        health_check=HealthCheckSpec(
            protocol="http",
            path="/healthz",
            interval=10.0,
            timeout=0.5,
            healthy_threshold=2,
            unhealthy_threshold=3,
            start_timeout=120.0,
        ),
        domains=("hello.example.com", "www.hello.example.com"),
        request_timeout=30.0,
        queue=QueueSpec(max_length=10, timeout=5.0),
        network=NetworkSpec(mode="bridge", networks=("db", "cache_net")),
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "build: ./app",
            ServiceSpec(name="hello", build=BuildSpec(context="{dir}/app")),
            id="build-shorthand",
        ),
        pytest.param(
            "build: {context: /src/app, dockerfile: Dockerfile.prod}",
            ServiceSpec(
                name="hello", build=BuildSpec(context="/src/app", dockerfile="Dockerfile.prod")
            ),
            id="build-mapping-absolute",
        ),
        pytest.param(
            "runtime: process\ncommand: [python3, -m, http.server]",
            ServiceSpec(
                name="hello",
                runtime="process",
                command=("python3", "-m", "http.server"),
                network=NetworkSpec(mode="host"),
            ),
            id="process-runtime-uses-host-network",
        ),
        pytest.param(
            "image: hello:1\nnetwork: {mode: host}",
            ServiceSpec(name="hello", image="hello:1", network=NetworkSpec(mode="host")),
            id="docker-host-network",
        ),
        pytest.param(
            "image: hello:1\nsecrets:\nenv:\ndomains:\nautoscaling:",
            ServiceSpec(name="hello", image="hello:1"),
            id="empty-sections-are-absent",
        ),
        pytest.param(
            "image: hello:1\nhealth_check: {protocol: http}",
            ServiceSpec(name="hello", image="hello:1", health_check=HealthCheckSpec("http")),
            id="http-health-check-default-path",
        ),
    ],
)
def test_valid_variants(
    load: Callable[[str], ServiceSpec], tmp_path: Path, text: str, expected: ServiceSpec
) -> None:
    """Shorthands, runtime-dependent defaults and empty sections decode as documented."""
    spec = load("name: hello\n" + text + "\n")
    if expected.build is not None:
        context = expected.build.context.replace("{dir}", str(tmp_path))
        build = msgspec.structs.replace(expected.build, context=context)
        expected = msgspec.structs.replace(expected, build=build)
    assert spec == expected


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        pytest.param("250ms", 0.25, id="ms"),
        pytest.param("5s", 5.0, id="s"),
        pytest.param("2m", 120.0, id="m"),
        pytest.param("1h", 3600.0, id="h"),
        pytest.param("90", 90.0, id="number"),
        pytest.param("'90'", 90.0, id="quoted-number"),
        pytest.param("1.5", 1.5, id="float"),
        pytest.param("0", 0.0, id="zero-allowed-here"),
    ],
)
def test_durations(load: Callable[[str], ServiceSpec], value: str, seconds: float) -> None:
    """Durations are strings with units or plain numbers, stored as float seconds."""
    spec = load(f"{MINIMAL}autoscaling: {{scale_down_delay: {value}}}\n")
    assert spec.autoscaling.scale_down_delay == pytest.approx(seconds)
    assert isinstance(spec.autoscaling.scale_down_delay, float)


@pytest.mark.parametrize(
    ("value", "size"),
    [
        pytest.param("512MB", 512_000_000, id="MB"),
        pytest.param("2GB", 2_000_000_000, id="GB"),
        pytest.param("1GiB", 1024**3, id="GiB"),
        pytest.param("1.5GB", 1_500_000_000, id="fraction"),
        pytest.param("134217728", 134217728, id="bare-bytes"),
        pytest.param("64MB", 64_000_000, id="minimum"),
    ],
)
def test_sizes(load: Callable[[str], ServiceSpec], value: str, size: int) -> None:
    """Sizes are strings with units or plain numbers of bytes, stored as int bytes."""
    assert load(f"{MINIMAL}instance: {{memory: {value}}}\n").instance.memory == size


# Each case is appended to MINIMAL's name line unless it starts with "!" (then it is the whole
# file); the message is the whole str() of the SpecError.
BAD_FILES = [
    pytest.param(
        "image: hello:1\nautoscaling: {min_size: 1, max_size: 0}",
        "hello.yaml: autoscaling.max_size: must be >= min_size (got 0 < 1)",
        id="contract-example",
    ),
    pytest.param(
        "image: hello:1\nautoscaling:\n  max_sise: 3",
        "hello.yaml: autoscaling.max_sise: unknown key",
        id="unknown-nested-key",
    ),
    pytest.param(
        "image: hello:1\nreplicas: 3", "hello.yaml: replicas: unknown key", id="unknown-top-key"
    ),
    pytest.param("!image: hello:1", "hello.yaml: name: required", id="name-missing"),
    pytest.param(
        "!name: Hello\nimage: hello:1",
        "hello.yaml: name: must be a DNS label: a-z, 0-9 and -, 1..63 characters, no - at either"
        " end (got 'Hello')",
        id="name-uppercase",
    ),
    pytest.param(
        "!name: -hello\nimage: hello:1",
        "hello.yaml: name: must be a DNS label: a-z, 0-9 and -, 1..63 characters, no - at either"
        " end (got '-hello')",
        id="name-leading-dash",
    ),
    pytest.param(
        f"!name: {'a' * 64}\nimage: hello:1",
        "hello.yaml: name: must be a DNS label: a-z, 0-9 and -, 1..63 characters, no - at either"
        f" end (got '{'a' * 64}')",
        id="name-too-long",
    ),
    pytest.param(
        "!name: 123\nimage: hello:1",
        "hello.yaml: name: must be a non-empty string (got number 123)",
        id="name-not-a-string",
    ),
    pytest.param(
        "runtime: podman\nimage: hello:1",
        "hello.yaml: runtime: must be one of docker, process (got 'podman')",
        id="runtime-unknown",
    ),
    pytest.param(
        "port: 8080",
        "hello.yaml: image: required for runtime docker (or give build)",
        id="docker-needs-image-or-build",
    ),
    pytest.param(
        "image: hello:1\nbuild: ./app",
        "hello.yaml: build: not allowed together with image (give one of them)",
        id="docker-image-and-build",
    ),
    pytest.param(
        "image: hello 1",
        "hello.yaml: image: must be an image reference (got 'hello 1')",
        id="image-with-space",
    ),
    pytest.param(
        "build: {dockerfile: Dockerfile}",
        "hello.yaml: build.context: required",
        id="build-without-context",
    ),
    pytest.param(
        "build: {context: ., file: Dockerfile}",
        "hello.yaml: build.file: unknown key",
        id="build-unknown-key",
    ),
    pytest.param(
        "runtime: process\nimage: hello:1\ncommand: [app]",
        "hello.yaml: image: not allowed with runtime process",
        id="process-with-image",
    ),
    pytest.param(
        "runtime: process",
        "hello.yaml: command: required for runtime process",
        id="process-needs-command",
    ),
    pytest.param(
        "runtime: process\ncommand: python3 app.py",
        "hello.yaml: command: must be a list of strings (argv), e.g. [python3, app.py]"
        " (got string 'python3 app.py')",
        id="command-as-string",
    ),
    pytest.param(
        "image: hello:1\ncommand: [sleep, 5]",
        "hello.yaml: command[1]: must be a string (got number 5)",
        id="command-item-not-a-string",
    ),
    pytest.param(
        "image: hello:1\ncommand: []", "hello.yaml: command: must not be empty", id="command-empty"
    ),
    pytest.param(
        "image: hello:1\nport: '8080'",
        "hello.yaml: port: must be an integer (got string '8080')",
        id="port-quoted",
    ),
    pytest.param(
        "image: hello:1\nport: 0",
        "hello.yaml: port: must be between 1 and 65535 (got 0)",
        id="port-zero",
    ),
    pytest.param(
        "image: hello:1\nport: 8080\nnetwork: {mode: host}",
        "hello.yaml: port: not used with network mode host (each instance gets a free port in"
        " PORT)",
        id="port-with-host-network",
    ),
    pytest.param(
        "runtime: process\ncommand: [app]\nport: 9000",
        "hello.yaml: port: not used with runtime process (each instance gets a free port in PORT)",
        id="port-with-process-runtime",
    ),
    pytest.param(
        "image: hello:1\nenv: {1BAD: x}",
        "hello.yaml: env.1BAD: must be an environment variable name ([A-Za-z_][A-Za-z0-9_]*)",
        id="env-bad-name",
    ),
    pytest.param(
        "image: hello:1\nenv: {PORT: '80'}",
        "hello.yaml: env.PORT: reserved: tidegate sets PORT and TIDEGATE_* itself",
        id="env-port-reserved",
    ),
    pytest.param(
        "image: hello:1\nenv: {TIDEGATE_SERVICE: x}",
        "hello.yaml: env.TIDEGATE_SERVICE: reserved: tidegate sets PORT and TIDEGATE_* itself",
        id="env-tidegate-reserved",
    ),
    pytest.param(
        "image: hello:1\nenv: {DEBUG: yes}",
        "hello.yaml: env.DEBUG: must be a string (got boolean true; quote it, YAML reads yes/no"
        " as booleans)",
        id="env-boolean",
    ),
    pytest.param(
        "image: hello:1\nenv: {LIST: [a]}",
        "hello.yaml: env.LIST: must be a string or a number (got a list)",
        id="env-list",
    ),
    pytest.param(
        "image: hello:1\nenv: [A=1]",
        "hello.yaml: env: must be a mapping (got a list)",
        id="env-as-list",
    ),
    pytest.param(
        "image: hello:1\nsecrets: {DB: {file: /x, env: DB}}",
        "hello.yaml: secrets.DB: must have exactly one of file or env",
        id="secret-both-sources",
    ),
    pytest.param(
        "image: hello:1\nsecrets: {DB: {}}",
        "hello.yaml: secrets.DB: must have exactly one of file or env",
        id="secret-no-source",
    ),
    pytest.param(
        "image: hello:1\nsecrets: {DB: {path: /x}}",
        "hello.yaml: secrets.DB.path: unknown key",
        id="secret-unknown-key",
    ),
    pytest.param(
        "image: hello:1\nsecrets: {DB: {env: host-var}}",
        "hello.yaml: secrets.DB.env: must be an environment variable name (got 'host-var')",
        id="secret-bad-env-var",
    ),
    pytest.param(
        "image: hello:1\nenv: {LOG: x}\nsecrets: {LOG: {env: LOG}}",
        "hello.yaml: secrets.LOG: also set in env (env.LOG); give it in one place",
        id="secret-collides-with-env",
    ),
    pytest.param(
        "image: hello:1\nsecrets: {TIDEGATE_INSTANCE: {env: X}}",
        "hello.yaml: secrets.TIDEGATE_INSTANCE: reserved: tidegate sets PORT and TIDEGATE_* itself",
        id="secret-reserved-name",
    ),
    pytest.param(
        "image: hello:1\ninstance: {cpu: 0}",
        "hello.yaml: instance.cpu: must be > 0 and <= 64 vCPU (got 0)",
        id="cpu-zero",
    ),
    pytest.param(
        "image: hello:1\ninstance: {cpu: 65}",
        "hello.yaml: instance.cpu: must be > 0 and <= 64 vCPU (got 65)",
        id="cpu-too-many",
    ),
    pytest.param(
        "image: hello:1\ninstance: {cpu: 1 vCPU}",
        "hello.yaml: instance.cpu: must be a number (got string '1 vCPU')",
        id="cpu-as-text",
    ),
    pytest.param(
        "image: hello:1\ninstance: {memory: 32MB}",
        "hello.yaml: instance.memory: must be at least 64MB (got 32000000 bytes)",
        id="memory-too-small",
    ),
    pytest.param(
        "image: hello:1\ninstance: {memory: lots}",
        "hello.yaml: instance.memory: not a size: 'lots' (use e.g. 512MB, 64KiB, 2GB)",
        id="memory-not-a-size",
    ),
    pytest.param(
        "image: hello:1\nautoscaling: {min_size: 26}",
        "hello.yaml: autoscaling.min_size: must be between 0 and 25 (got 26)",
        id="min-size-over-quota",
    ),
    pytest.param(
        "image: hello:1\nautoscaling: {min_size: -1}",
        "hello.yaml: autoscaling.min_size: must be between 0 and 25 (got -1)",
        id="min-size-negative",
    ),
    pytest.param(
        "image: hello:1\nautoscaling: {max_size: 30}",
        "hello.yaml: autoscaling.max_size: must be between 1 and 25 (got 30)",
        id="max-size-over-quota",
    ),
    pytest.param(
        "image: hello:1\nautoscaling: {min_size: 0, max_size: 0}",
        "hello.yaml: autoscaling.max_size: must be between 1 and 25 (got 0)",
        id="max-size-zero",
    ),
    pytest.param(
        "image: hello:1\nautoscaling: {max_size: 2.5}",
        "hello.yaml: autoscaling.max_size: must be an integer (got number 2.5)",
        id="max-size-float",
    ),
    pytest.param(
        "image: hello:1\nautoscaling: {max_concurrency: 0}",
        "hello.yaml: autoscaling.max_concurrency: must be between 1 and 1000 (got 0)",
        id="max-concurrency-zero",
    ),
    pytest.param(
        "image: hello:1\nautoscaling: {max_concurrency: 1001}",
        "hello.yaml: autoscaling.max_concurrency: must be between 1 and 1000 (got 1001)",
        id="max-concurrency-over-limit",
    ),
    pytest.param(
        "image: hello:1\nautoscaling: {scale_down_delay: soon}",
        "hello.yaml: autoscaling.scale_down_delay: not a duration: 'soon' (use e.g. 250ms, 5s,"
        " 2m, 1h)",
        id="duration-not-a-duration",
    ),
    pytest.param(
        "image: hello:1\nautoscaling: {scale_down_delay: -5}",
        "hello.yaml: autoscaling.scale_down_delay: duration must not be negative (got -5)",
        id="duration-negative",
    ),
    pytest.param(
        "image: hello:1\nautoscaling: {scale_down_delay: [1]}",
        "hello.yaml: autoscaling.scale_down_delay: must be a duration such as 250ms, 5s or 2m"
        " (got a list)",
        id="duration-wrong-type",
    ),
    pytest.param(
        "image: hello:1\nautoscaling: 3",
        "hello.yaml: autoscaling: must be a mapping (got number 3)",
        id="section-not-a-mapping",
    ),
    pytest.param(
        "image: hello:1\nhealth_check: {protocol: https}",
        "hello.yaml: health_check.protocol: must be one of tcp, http (got 'https')",
        id="health-protocol-unknown",
    ),
    pytest.param(
        "image: hello:1\nhealth_check: {path: /healthz}",
        "hello.yaml: health_check.path: only used with protocol: http",
        id="health-path-with-tcp",
    ),
    pytest.param(
        "image: hello:1\nhealth_check: {protocol: http, path: healthz}",
        "hello.yaml: health_check.path: must start with / and contain no spaces (got 'healthz')",
        id="health-path-relative",
    ),
    pytest.param(
        "image: hello:1\nhealth_check: {timeout: 5s}",
        "hello.yaml: health_check.timeout: must be shorter than interval (got 5s >= 5s)",
        id="health-timeout-not-below-interval",
    ),
    pytest.param(
        "image: hello:1\nhealth_check: {interval: 0}",
        "hello.yaml: health_check.interval: must be more than 0s (got 0)",
        id="health-interval-zero",
    ),
    pytest.param(
        "image: hello:1\nhealth_check: {interval: 30s}",
        "hello.yaml: health_check.interval: must be at most 20s (got '30s')",
        id="health-interval-over-20s",
    ),
    pytest.param(
        "image: hello:1\nhealth_check: {healthy_threshold: 21}",
        "hello.yaml: health_check.healthy_threshold: must be between 1 and 20 (got 21)",
        id="health-threshold-over-20",
    ),
    pytest.param(
        "image: hello:1\nhealth_check: {start_timeout: 11m}",
        "hello.yaml: health_check.start_timeout: must be at most 600s (got '11m')",
        id="start-timeout-over-10m",
    ),
    pytest.param(
        "image: hello:1\nhealth_check: {unhealthy_threshold: 0}",
        "hello.yaml: health_check.unhealthy_threshold: must be between 1 and 20 (got 0)",
        id="health-threshold-zero",
    ),
    pytest.param(
        "image: hello:1\ndomains: ['*.example.com']",
        "hello.yaml: domains[0]: wildcards are not supported: list each host name"
        " (got '*.example.com')",
        id="domain-wildcard",
    ),
    pytest.param(
        "image: hello:1\ndomains: [a.example.com, 'b.example.com:8080']",
        "hello.yaml: domains[1]: must be a host name without a port (got 'b.example.com:8080')",
        id="domain-with-port",
    ),
    pytest.param(
        "image: hello:1\ndomains: [Hello.example.com]",
        "hello.yaml: domains[0]: must be lowercase (got 'Hello.example.com')",
        id="domain-uppercase",
    ),
    pytest.param(
        "image: hello:1\ndomains: [a_b.example.com]",
        "hello.yaml: domains[0]: must be a DNS name such as hello.example.com"
        " (got 'a_b.example.com')",
        id="domain-bad-character",
    ),
    pytest.param(
        "image: hello:1\ndomains: [a.example.com, a.example.com]",
        "hello.yaml: domains[1]: listed twice (also domains[0]) (got 'a.example.com')",
        id="domain-twice",
    ),
    pytest.param(
        "image: hello:1\ndomains: hello.example.com",
        "hello.yaml: domains: must be a list (got string 'hello.example.com')",
        id="domains-not-a-list",
    ),
    pytest.param(
        "image: hello:1\ndomains: [42]",
        "hello.yaml: domains[0]: must be a string (got number 42)",
        id="domain-not-a-string",
    ),
    pytest.param(
        "image: hello:1\nrequest_timeout: 0s",
        "hello.yaml: request_timeout: must be more than 0s (got '0s')",
        id="request-timeout-zero",
    ),
    pytest.param(
        "image: hello:1\nqueue: {max_length: 0}",
        "hello.yaml: queue.max_length: must be at least 1 (got 0)",
        id="queue-length-zero",
    ),
    pytest.param(
        "image: hello:1\nqueue: {timeout: true}",
        "hello.yaml: queue.timeout: must be a duration such as 250ms, 5s or 2m (got boolean true)",
        id="queue-timeout-boolean",
    ),
    pytest.param(
        "image: hello:1\nnetwork: {mode: overlay}",
        "hello.yaml: network.mode: must be one of bridge, host (got 'overlay')",
        id="network-mode-unknown",
    ),
    pytest.param(
        "image: hello:1\nnetwork: {mode: host, networks: [db]}",
        "hello.yaml: network.networks: not allowed with mode host",
        id="networks-with-host-mode",
    ),
    pytest.param(
        "runtime: process\ncommand: [app]\nnetwork: {mode: bridge}",
        "hello.yaml: network.mode: must be host with runtime process",
        id="process-with-bridge",
    ),
    pytest.param(
        "image: hello:1\nnetwork: {networks: [db, -bad]}",
        "hello.yaml: network.networks[1]: must be a Docker network name (got '-bad')",
        id="network-name-bad",
    ),
    pytest.param(
        "!- name: hello\n- image: hello:1",
        "hello.yaml: must be a mapping (got a list)",
        id="file-is-a-list",
    ),
    pytest.param(
        "!hello", "hello.yaml: must be a mapping (got string 'hello')", id="file-is-a-string"
    ),
    pytest.param(
        "!", "hello.yaml: the file is empty (expected a mapping of settings)", id="empty-file"
    ),
    pytest.param(
        "!# only a comment\n",
        "hello.yaml: the file is empty (expected a mapping of settings)",
        id="comment-only-file",
    ),
    pytest.param(
        "image: hello:1\n1: x", "hello.yaml: keys must be strings (got number 1)", id="int-key"
    ),
]


@pytest.mark.parametrize(("text", "message"), BAD_FILES)
def test_bad_files(load: Callable[[str], ServiceSpec], text: str, message: str) -> None:
    """Each broken file is rejected with one message: file, key path and reason."""
    text = text[1:] if text.startswith("!") else "name: hello\n" + text
    with pytest.raises(SpecError) as caught:
        load(text + "\n")
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            "name: hello\nimage: a:1\nautoscaling:\n  min_size: 1\n  min_size: 2\n",
            "hello.yaml: autoscaling.min_size: duplicate key (line 5, column 3; first at line 4)",
            id="nested-duplicate",
        ),
        pytest.param(
            "name: hello\nimage: a:1\nname: other\n",
            "hello.yaml: name: duplicate key (line 3, column 1; first at line 1)",
            id="top-level-duplicate",
        ),
        pytest.param(
            "name: hello\nimage: a:1\nsecrets: {A: {file: /x, file: /y}}\n",
            "hello.yaml: secrets.A.file: duplicate key (line 3, column 25; first at line 3)",
            id="flow-style-duplicate",
        ),
        pytest.param(
            "name: hello\nimage: [unclosed\n",
            "hello.yaml: line 3, column 1: expected ',' or ']', but got '<stream end>'",
            id="unclosed-flow-sequence",
        ),
        pytest.param(
            "name: hello\n  image: a:1\n",
            "hello.yaml: line 2, column 8: mapping values are not allowed here",
            id="bad-indentation",
        ),
        pytest.param(
            "name: hello\n---\nname: other\n",
            "hello.yaml: line 2, column 1: expected a single document in the stream, but found"
            " another document",
            id="two-documents",
        ),
        pytest.param(
            "name: !!python/object:os.system hello\n",
            "hello.yaml: line 1, column 7: could not determine a constructor for the tag"
            " 'tag:yaml.org,2002:python/object:os.system'",
            id="unsafe-tag",
        ),
    ],
)
def test_bad_yaml(load: Callable[[str], ServiceSpec], text: str, message: str) -> None:
    """Duplicate keys and YAML errors name the file, and the key path or line and column."""
    with pytest.raises(SpecError) as caught:
        load(text)
    assert str(caught.value) == message


def test_unreadable_files(write: Callable[[str, str], str]) -> None:
    """A missing file and a file that is not UTF-8 are errors naming the file."""
    with pytest.raises(SpecError) as caught:
        load_service_file("missing.yaml")
    assert str(caught.value) == "missing.yaml: cannot read: No such file or directory"
    Path("latin1.yaml").write_bytes(b"name: caf\xe9\n")
    with pytest.raises(SpecError) as caught:
        load_service_file("latin1.yaml")
    assert str(caught.value) == "latin1.yaml: not UTF-8 text (byte 9)"


def test_spec_error_parts() -> None:
    """SpecError is a ValueError that keeps its source, key path and reason apart."""
    with pytest.raises(ValueError, match=r"^x\.yaml: port: must be an integer") as caught:
        parse_service({"name": "x", "image": "x", "port": "80"}, "x.yaml")
    assert isinstance(caught.value, SpecError)
    assert (caught.value.source, caught.value.path) == ("x.yaml", "port")
    assert caught.value.reason == "must be an integer (got string '80')"


def test_max_size_limit_can_be_raised() -> None:
    """A caller's max_size_limit lifts the quota of 25 for max_size and min_size."""
    data = {"name": "big", "image": "big:1", "autoscaling": {"min_size": 30, "max_size": 40}}
    spec = parse_service(data, "big.yaml", max_size_limit=50)
    assert (spec.autoscaling.min_size, spec.autoscaling.max_size) == (30, 40)
    with pytest.raises(SpecError, match=r"max_size: must be between 1 and 35 \(got 40\)$"):
        parse_service(data, "big.yaml", max_size_limit=35)


def test_min_size_above_default_max_raises_it() -> None:
    """With a raised limit and no max_size, max_size follows a min_size above 25."""
    data = {"name": "big", "image": "big:1", "autoscaling": {"min_size": 30}}
    assert parse_service(data, "big.yaml", max_size_limit=50).autoscaling.max_size == 30


def test_specs_are_frozen_and_round_trip() -> None:
    """A spec cannot be changed in place and survives JSON encoding unchanged."""
    spec = parse_service(
        {"name": "x", "image": "x:1", "secrets": {"A": {"env": "B"}}, "domains": ["x.test"]},
        "x.yaml",
    )
    with pytest.raises(AttributeError):
        spec.port = 1  # type: ignore[misc]
    assert msgspec.json.decode(msgspec.json.encode(spec), type=ServiceSpec) == spec


HASH_BASE = """\
name: hello
image: hello:1
env: {A: "1", B: "2"}
secrets: {S: {env: HOST_S}}
"""


@pytest.mark.parametrize(
    ("extra", "same"),
    [
        pytest.param(
            "autoscaling: {min_size: 0, max_size: 3, max_concurrency: 5}", True, id="autoscaling"
        ),
        pytest.param("domains: [hello.example.com]", True, id="domains"),
        pytest.param("queue: {max_length: 5, timeout: 1s}", True, id="queue"),
        pytest.param("request_timeout: 5s", True, id="request-timeout"),
        pytest.param("health_check: {protocol: http}", True, id="health-check"),
        pytest.param("instance: {cpu: 0.5, memory: 1GB}", True, id="explicit-defaults"),
        pytest.param("port: 9000", False, id="port"),
        pytest.param("command: [serve]", False, id="command"),
        pytest.param("instance: {cpu: 1}", False, id="cpu"),
        pytest.param("instance: {memory: 2GB}", False, id="memory"),
        pytest.param("network: {networks: [db]}", False, id="network"),
    ],
)
def test_spec_hash_tracks_what_defines_an_instance(extra: str, same: bool) -> None:
    """Only changes that need new instances change the hash."""
    base = parse_service(yaml.safe_load(HASH_BASE), "h.yaml")
    changed = parse_service(yaml.safe_load(HASH_BASE + extra), "h.yaml")
    assert (base.spec_hash() == changed.spec_hash()) is same


@pytest.mark.parametrize(
    "changed",
    [
        pytest.param({"image": "hello:2"}, id="image"),
        pytest.param({"env": {"A": "1", "B": "3"}}, id="env-value"),
        pytest.param({"env": {"A": "1"}}, id="env-removed"),
        pytest.param({"secrets": {"S": {"env": "OTHER"}}}, id="secret-reference"),
        pytest.param({"secrets": {"S": {"file": "/s"}}}, id="secret-source"),
    ],
)
def test_spec_hash_changes_with_image_env_and_secrets(changed: dict[str, object]) -> None:
    """A new image, env or secret reference changes the hash."""
    base: dict[str, object] = {
        "name": "hello",
        "image": "hello:1",
        "env": {"A": "1", "B": "2"},
        "secrets": {"S": {"env": "HOST_S"}},
    }
    before = parse_service(base, "h.yaml").spec_hash()
    assert parse_service(base | changed, "h.yaml").spec_hash() != before


def test_spec_hash_is_stable_across_key_order() -> None:
    """The same settings in another order, env included, give the same short hex hash."""
    one = parse_service(
        {"name": "a", "image": "a:1", "env": {"X": "1", "Y": "2"}, "port": 81}, "a.yaml"
    )
    two = parse_service(
        {"port": 81, "env": {"Y": "2", "X": "1"}, "image": "a:1", "name": "a"}, "b.yaml"
    )
    assert one.spec_hash() == two.spec_hash()
    assert len(one.spec_hash()) == 12
    assert int(one.spec_hash(), 16) >= 0


@pytest.mark.parametrize(
    ("domains", "default"),
    [
        pytest.param(["hello.example.com"], False, id="with-domains"),
        pytest.param([], True, id="default-route"),
    ],
)
def test_routing_for(domains: list[str], default: bool) -> None:
    """The ingress gets the domains, default route, concurrency, queue and timeout."""
    spec = parse_service(
        {
            "name": "hello",
            "image": "hello:1",
            "domains": domains,
            "autoscaling": {"max_concurrency": 7},
            "queue": {"max_length": 9, "timeout": "3s"},
            "request_timeout": "45s",
        },
        "hello.yaml",
    )
    instances = [InstanceSpec(id="i1", address="127.0.0.1:32768")]
    assert routing_for(spec, instances) == ServiceRouting(
        name="hello",
        domains=domains,
        default=default,
        max_concurrency=7,
        queue_max_length=9,
        queue_timeout=3.0,
        request_timeout=45.0,
        instances=instances,
    )


def test_resolve_secrets(tmp_path: Path) -> None:
    """Files lose one trailing newline; env references read the given environment."""
    (tmp_path / "db").write_text("s3cret\n")
    spec = parse_service(
        {
            "name": "hello",
            "image": "hello:1",
            "secrets": {"DB": {"file": "db"}, "API": {"env": "HOST_API"}},
        },
        "hello.yaml",
        base_dir=str(tmp_path),
    )
    assert resolve_secrets(spec, {"HOST_API": "k\n"}) == {"DB": "s3cret", "API": "k\n"}


@pytest.mark.parametrize(
    ("secret", "environ", "message"),
    [
        pytest.param(
            {"file": "/nonexistent/db"},
            {},
            "service hello: secrets.DB: cannot read /nonexistent/db: No such file or directory",
            id="missing-file",
        ),
        pytest.param(
            {"env": "HOST_DB"},
            {"OTHER": "hunter2"},
            "service hello: secrets.DB: environment variable HOST_DB is not set",
            id="missing-env",
        ),
        pytest.param(
            {"env": "HOST_DB"},
            {"HOST_DB": "hunter2\0"},
            "service hello: secrets.DB: value contains a NUL byte",
            id="nul-byte",
        ),
    ],
)
def test_resolve_secrets_failures(
    secret: dict[str, str], environ: dict[str, str], message: str
) -> None:
    """A secret that cannot be resolved is named, and its value never shown."""
    spec = parse_service(
        {"name": "hello", "image": "hello:1", "secrets": {"DB": secret}}, "hello.yaml"
    )
    with pytest.raises(SpecError) as caught:
        resolve_secrets(spec, environ)
    assert str(caught.value) == message
    assert "hunter2" not in str(caught.value)


def test_load_service_files(write: Callable[[str, str], str]) -> None:
    """Several files load in order when names and domains differ and one takes the default."""
    a = write("name: a\nimage: a:1\n", "a.yaml")
    b = write("name: b\nimage: b:1\ndomains: [b.test]\n", "b.yaml")
    specs = load_service_files([a, Path(b)])
    assert [spec.name for spec in specs] == ["a", "b"]


@pytest.mark.parametrize(
    ("first", "second", "message"),
    [
        pytest.param(
            "name: hello\nimage: a:1\ndomains: [a.test]\n",
            "name: hello\nimage: b:1\ndomains: [b.test]\n",
            "b.yaml: name: 'hello' is already the name of the service in a.yaml",
            id="same-name",
        ),
        pytest.param(
            "name: a\nimage: a:1\ndomains: [a.test, shared.test]\n",
            "name: b\nimage: b:1\ndomains: [b.test, shared.test]\n",
            "b.yaml: domains[1]: 'shared.test' is already routed to service a in a.yaml",
            id="same-domain",
        ),
        pytest.param(
            "name: a\nimage: a:1\n",
            "name: b\nimage: b:1\n",
            "b.yaml: domains: none given, but service a in a.yaml already takes the default"
            " route (give one of them domains)",
            id="two-default-routes",
        ),
        pytest.param(
            "name: a\nimage: a:1\n",
            "name: b\nimage: b:1\nport: x\n",
            "b.yaml: port: must be an integer (got string 'x')",
            id="one-bad-file",
        ),
    ],
)
def test_load_service_files_conflicts(
    write: Callable[[str, str], str], first: str, second: str, message: str
) -> None:
    """Files that clash are rejected naming both; a bad file is reported as on its own."""
    paths = [write(first, "a.yaml"), write(second, "b.yaml")]
    with pytest.raises(SpecError) as caught:
        load_service_files(paths)
    assert str(caught.value) == message


def test_relative_paths_follow_the_file(write: Callable[[str, str], str], tmp_path: Path) -> None:
    """Build contexts and secret files are relative to the service file, not the cwd."""
    os.mkdir("svc")
    name = write("name: a\nbuild: app\nsecrets: {S: {file: s.txt}}\n", "svc/a.yaml")
    spec = load_service_file(name)
    assert spec.build == BuildSpec(context=str(tmp_path / "svc" / "app"))
    assert spec.secrets["S"] == SecretRef(file=str(tmp_path / "svc" / "s.txt"))
