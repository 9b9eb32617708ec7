"""CLI ergonomics: SGLang's flag names, `up` passing denoiser options through, `serve --config`,
defaults in --help, --version, tokens from a file, and one-line errors for an unreachable gateway."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ditserve import __version__
from ditserve.client.cli import _security, _stack, build_parser
from ditserve.client.config import repo_root
from ditserve.client.options import DefaultsHelpFormatter, expand_config


def parse(*argv: str) -> argparse.Namespace:
    argv = expand_config(list(argv))
    return build_parser(argv).parse_args(argv)


def test_sglang_flag_names_are_aliases() -> None:
    assert parse("generate", "p", "--num-inference-steps", "7").steps == 7
    assert parse("up", "--model-path", "/m").model == Path("/m")
    args = parse("serve", "denoiser", "--model-path", "/m", "--ulysses-degree", "2", "--ring-degree", "2")
    assert (args.model, args.sp_ulysses, args.sp_ring) == (Path("/m"), 2, 2)


def test_up_passes_denoiser_options_through() -> None:
    args = parse(
        "up", "--batching", "continuous", "--max-batch-size", "4", "--attention-backend", "torch_sdpa",
        "--cache-policy", "teacache", "--dtype", "fp32", "--ulysses-degree", "2", "--http-port", "8123",
        "--quantize", "int8-weight", "--compile", "--attention-benchmark", "off",
    )  # fmt: skip
    stack = _stack(args)
    denoiser = stack.command("denoiser")
    for flag, value in [
        ("--batching", "continuous"),
        ("--max-batch-size", "4"),
        ("--attention-backend", "torch_sdpa"),
        ("--cache-policy", "teacache"),
        ("--dtype", "fp32"),
        ("--sp-ulysses", "2"),
        ("--quantize", "int8-weight"),
        ("--attention-benchmark", "off"),
    ]:
        assert denoiser[denoiser.index(flag) + 1] == value
    assert "--compile" in denoiser
    assert "--batching" not in stack.command("encoder")
    gateway = stack.command("gateway")
    assert gateway[gateway.index("--http-port") + 1] == "8123"
    assert "--no-http" in _stack(parse("up", "--no-http")).command("gateway")
    # Unset denoiser flags stay the denoiser's own defaults.
    plain = _stack(parse("up")).command("denoiser")
    assert not {"--batching", "--compile", "--quantize", "--attention-benchmark"} & set(plain)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_serve_config_file_sets_flags_and_later_flags_win(tmp_path: Path, suffix: str) -> None:
    config = {"port": 6000, "max_queue": 3, "batching": "dynamic", "allow-pickle": True, "cache_policy": {"none": {}}}
    path = tmp_path / f"denoiser{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(config))
    else:
        import yaml

        path.write_text(yaml.safe_dump(config))
    args = parse("serve", "denoiser", "--config", str(path), "--max-queue", "9")
    assert (args.port, args.max_queue, args.batching, args.allow_pickle) == (6000, 9, "dynamic", True)
    assert json.loads(args.cache_policy) == {"none": {}}


def test_serve_config_rejects_unknown_keys(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("max_quue: 3\n")
    result = subprocess.run(
        [sys.executable, "-m", "ditserve.client.cli", "serve", "denoiser", "--config", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "--max-quue" in result.stderr


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found += _parsers(sub)
    return found


@pytest.mark.parametrize("argv", [["serve", "gateway"], ["serve", "denoiser"], ["up"], ["generate", "p"]])
def test_help_shows_every_default(argv: list[str]) -> None:
    parser = build_parser(argv)
    for sub in _parsers(parser):
        formatter = sub._get_formatter()
        assert isinstance(formatter, DefaultsHelpFormatter)
        for action in sub._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
                continue
            assert "default" in formatter._get_help_string(action).lower(), (sub.prog, action.option_strings)
    text = subprocess.run(
        [sys.executable, "-m", "ditserve.client.cli", "serve", "gateway", "--help"], capture_output=True, text=True
    ).stdout
    assert "--http-port" in text and "default: 8000" in text


def test_version_is_the_installed_one() -> None:
    result = subprocess.run([sys.executable, "-m", "ditserve.client.cli", "--version"], capture_output=True, text=True)
    assert result.stdout.strip() == f"ditserve {__version__}"
    declared = re.search(r'^version = "(.+)"$', (repo_root() / "pyproject.toml").read_text(), re.M).group(1)
    assert __version__ == declared == importlib.metadata.version("ditserve")


def test_token_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("# mine\nfile-token\n")
    assert _security(parse("generate", "p", "--token-file", str(token))).token == "file-token"
    monkeypatch.delenv("DITSERVE_TOKEN", raising=False)
    monkeypatch.setenv("DITSERVE_TOKEN_FILE", str(token))
    assert _security(parse("info")).token == "file-token"
    monkeypatch.setenv("DITSERVE_TOKEN", "env-token")
    assert _security(parse("info")).token == "env-token"
    assert _security(parse("info", "--token", "flag-token")).token == "flag-token"


@pytest.mark.parametrize("command", [["info"], ["generate", "a prompt", "--timeout", "5"]])
def test_unreachable_gateway_is_one_line_with_a_hint(command: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ditserve.client.cli", *command, "--target", "127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("ditserve ")]
    assert "UNAVAILABLE" in line and "ditserve up" in line and "--target" in line


def test_up_names_the_missing_extra_or_model(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    from ditserve.client import cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    with pytest.raises(SystemExit, match=r"pip install 'ditserve\[serve\]'\): missing diffusers"):
        cli._check_can_serve("up", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", real)
    with pytest.raises(SystemExit, match=f"no model at {tmp_path}.*--model DIR or set DITSERVE_MODEL"):
        cli._check_can_serve("up", str(tmp_path))
