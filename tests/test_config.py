"""Configuration files for the daemons (tidegate/config.py): keys from the flags, the
command line winning, errors naming the file and the key, and the example files in
systemd/etc/tidegate valid for the parsers they are written for."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from tidegate.cli import build_parser, main
from tidegate.config import ConfigError, add_config_flag, apply_config, config_keys, load_config

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "systemd" / "etc" / "tidegate"
# a "# key: value" line of an example file: a flag shown commented out, with a valid value
_COMMENTED = re.compile(r"^# ?([a-z][a-z0-9-]*): (.*?)(?:\s+#.*)?$")


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            sub = action.choices[name]
            assert isinstance(sub, argparse.ArgumentParser)
            return sub
    raise AssertionError("tidegate has no subcommands")


def _parser() -> argparse.ArgumentParser:
    """A parser with one flag of each kind the daemons use, and --config."""
    parser = argparse.ArgumentParser(prog="tidegate test")
    parser.add_argument("paths", nargs="*", metavar="PATH")
    parser.add_argument("--listen", action="append", metavar="ADDR")
    parser.add_argument("--tls-cert", action="append", default=[])
    parser.add_argument("--metrics-listen", default="127.0.0.1:9464")
    parser.add_argument("--queue-max", type=int, default=1000)
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--mode", choices=["a", "b"], default="a")
    parser.add_argument("--no-access-log", action="store_true")
    parser.add_argument("-v", "--verbose", action="store_true")
    add_config_flag(parser, example="/etc/tidegate/test.yaml")
    return parser


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "test.yaml"
    path.write_text(text)
    return path


def _apply(tmp_path: Path, text: str, *argv: str) -> argparse.Namespace:
    path = _write(tmp_path, text)
    return apply_config(_parser().parse_args(["--config", str(path), *argv]))


# --- keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["ingress", "scaler"])
def test_every_flag_of_the_daemons_has_a_key(command: str) -> None:
    """Every long option of `tidegate ingress` and `tidegate scaler`, and each positional,
    is a configuration key for the same action: the keys come from the parser."""
    parser = _subparser(command)
    keys = config_keys(parser)
    for action in parser._actions:
        if action.dest in ("help", "config"):
            assert not set(keys.values()) & {action}
            continue
        if not action.option_strings:
            assert keys[action.dest.replace("_", "-")] is action
        for option in action.option_strings:
            if option.startswith("--"):
                assert keys[option[2:]] is action, option


def test_ingress_takes_config() -> None:
    """`tidegate ingress --config FILE` parses, and the file is named in its --help."""
    args = build_parser().parse_args(["ingress", "--config", "/etc/tidegate/ingress.yaml"])
    assert args.config == "/etc/tidegate/ingress.yaml"
    assert "--config" in _subparser("ingress").format_help()


def test_scaler_takes_config() -> None:
    """`tidegate scaler --config FILE` parses: the unit's ExecStart depends on it."""
    args = build_parser().parse_args(["scaler", "--config", "/etc/tidegate/scaler.yaml"])
    assert args.config == "/etc/tidegate/scaler.yaml"


# --- the example files ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["ingress", "scaler"])
def test_example_file_is_valid(tmp_path: Path, command: str) -> None:
    """The example /etc/tidegate file loads through its daemon's parser, every flag is in
    it (set or commented out), and every commented-out value is valid for its flag too."""
    parser = _subparser(command)
    path = EXAMPLES / f"{command}.yaml"
    load_config(path, parser)
    text = path.read_text()
    set_keys = set(re.findall(r"^([a-z][a-z0-9-]*):", text, re.MULTILINE))
    commented = {}
    for line in text.splitlines():
        match = _COMMENTED.match(line)
        if match and match.group(1) in config_keys(parser):
            commented[match.group(1)] = match.group(2)
    canonical = {
        next((o[2:] for o in a.option_strings if o.startswith("--")), a.dest.replace("_", "-"))
        for a in config_keys(parser).values()
    }
    assert canonical - set_keys - set(commented) == set(), "flags missing from the example"
    assert not set_keys & set(commented), "set and commented out both"
    assert set_keys <= set(config_keys(parser))
    uncommented = tmp_path / f"{command}.yaml"
    uncommented.write_text("".join(f"{k}: {v}\n" for k, v in commented.items()))
    load_config(uncommented, parser)


def test_example_values() -> None:
    """The example files set what the units rely on: the sockets in /run/tidegate, the
    services directory, and a certificate for the https socket out of the box."""
    ingress = load_config(EXAMPLES / "ingress.yaml", _subparser("ingress"))
    scaler = load_config(EXAMPLES / "scaler.yaml", _subparser("scaler"))
    assert ingress["control_socket"] == scaler["ingress_socket"] == "/run/tidegate/ingress.sock"
    assert scaler["socket"] == "/run/tidegate/scaler.sock"
    assert scaler["paths"] == ["/etc/tidegate/services"]
    assert ingress["tls_self_signed"] is True


# --- values and precedence -----------------------------------------------------------------------


def test_file_values_fill_in(tmp_path: Path) -> None:
    """Each kind of flag takes its value from the file, converted as on the command line."""
    args = _apply(
        tmp_path,
        "paths: [/srv/a.yaml, /srv/b]\n"
        "listen: [':80', '[::]:8080']\n"
        "tls_cert: /etc/a.pem\n"  # underscore spelling; one value of a repeatable flag
        "metrics-listen: 0.0.0.0:9464\n"
        "queue-max: 5\n"
        "state-dir: /var/lib/x\n"
        "mode: b\n"
        "no-access-log: true\n"
        "verbose: true\n",
    )
    assert args.paths == ["/srv/a.yaml", "/srv/b"]
    assert args.listen == [":80", "[::]:8080"]
    assert args.tls_cert == ["/etc/a.pem"]
    assert args.metrics_listen == "0.0.0.0:9464"
    assert args.queue_max == 5
    assert args.state_dir == Path("/var/lib/x")
    assert args.mode == "b"
    assert args.no_access_log is True
    assert args.verbose is True


def test_numbers_become_text(tmp_path: Path) -> None:
    """A number where the flag takes text is its text, as the command line would give it."""
    args = _apply(tmp_path, "metrics-listen: 9464\nqueue-max: '7'\n")
    assert args.metrics_listen == "9464"
    assert args.queue_max == 7


def test_command_line_wins(tmp_path: Path) -> None:
    """A flag on the command line replaces the file's value, a repeatable one too (no
    appending to the file's list), and paths on the command line replace the file's."""
    text = "paths: [/srv/a]\nlisten: [':80']\nqueue-max: 5\nmetrics-listen: 0.0.0.0:1\n"
    args = _apply(
        tmp_path,
        text,
        "/srv/cli",
        "--listen",
        "127.0.0.1:8080",
        "--queue-max",
        "1000",  # the default's value, given explicitly: still the command line's
        "--metrics-listen",
        "127.0.0.1:9464",
    )
    assert args.paths == ["/srv/cli"]
    assert args.listen == ["127.0.0.1:8080"]
    assert args.queue_max == 1000
    assert args.metrics_listen == "127.0.0.1:9464"


def test_false_and_null_keep_defaults(tmp_path: Path) -> None:
    """`false` for an on/off flag and `null` for any flag leave the default; and an on/off
    flag given on the command line stays on whatever the file says."""
    args = _apply(tmp_path, "no-access-log: false\nqueue-max: null\nverbose: false\n", "-v")
    assert args.no_access_log is False
    assert args.queue_max == 1000
    assert args.verbose is True


def test_empty_file_and_no_config(tmp_path: Path) -> None:
    """An empty file changes nothing; without --config the arguments are returned as parsed."""
    args = _apply(tmp_path, "# nothing set\n")
    assert args.listen is None and args.queue_max == 1000
    parsed = _parser().parse_args(["--queue-max", "3"])
    assert apply_config(parsed) is parsed


def test_parsed_arguments_are_not_changed(tmp_path: Path) -> None:
    """apply_config returns a copy, so applying the file again (a reload) starts from the
    command line, not from the last file's values."""
    path = _write(tmp_path, "queue-max: 5\n")
    parsed = _parser().parse_args(["--config", str(path)])
    assert apply_config(parsed).queue_max == 5
    assert parsed.queue_max == 1000
    path.write_text("listen: [':81']\n")
    again = apply_config(parsed)
    assert again.queue_max == 1000 and again.listen == [":81"]


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param("lisen: [':80']\n", "lisen: unknown key (did you mean 'listen'?)", id="typo"),
        pytest.param("bogus: 1\n", "bogus: unknown key; the keys are the flags of", id="unknown"),
        pytest.param("--listen: x\n", "--listen: write the flag without dashes: listen", id="dash"),
        pytest.param("config: /x.yaml\n", "config: a configuration file cannot", id="config"),
        pytest.param(
            "metrics-listen: off\n",
            "metrics-listen: must be a string or a number (got false; quote it",
            id="yaml-off",
        ),
        pytest.param("listen: [yes]\n", "listen[0]: must be a string or a number", id="item"),
        pytest.param(
            "metrics-listen: [a]\n", "must be a string or a number (got a list)", id="list"
        ),
        pytest.param("queue-max: many\n", "queue-max: must be an integer (got 'many')", id="int"),
        pytest.param("mode: c\n", "mode: must be one of 'a', 'b' (got 'c')", id="choices"),
        pytest.param("verbose: 'yes'\n", "verbose: must be true or false (got 'yes')", id="bool"),
        pytest.param("listen: {a: 1}\n", "listen[0]: must be a string or a number", id="mapping"),
        pytest.param("queue-max: 1\nqueue-max: 2\n", "queue-max: given twice", id="twice"),
        pytest.param(
            "queue-max: 1\nqueue_max: 2\n",
            "queue_max: given twice (also as 'queue-max')",
            id="alias",
        ),
        pytest.param("- listen\n", "expected a mapping of flag names to values", id="not-mapping"),
        pytest.param("listen: [a\n", "line 2, column 1: invalid YAML", id="yaml"),
        pytest.param("1: x\n", "1: keys must be strings", id="int-key"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    """A bad file is a ConfigError whose message starts with the file and names the key."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, _parser())
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


def test_unreadable_file(tmp_path: Path) -> None:
    """A missing file is an error naming it, and so is one that is not UTF-8."""
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read: No such file"):
        load_config(tmp_path / "missing.yaml", _parser())
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"listen: \xff\n")
    with pytest.raises(ConfigError, match=r"binary\.yaml: not UTF-8 text \(byte 8\)"):
        load_config(binary, _parser())


def test_ingress_config_error_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`tidegate ingress --config` with a bad file exits 2 with one line on stderr."""
    path = _write(tmp_path, "metrics-listen: off\n")
    assert main(["ingress", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"tidegate ingress: {path}: metrics-listen: must be a string")
    assert err.count("\n") == 1
