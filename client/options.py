"""CLI plumbing kept out of cli.py: --help that shows every default, `serve --config FILE`, one-line
errors for an unreachable service, and tokens from a file or the environment. Imports no torch."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import grpc


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' to every flag whose help does not already say its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text.lower() or default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Every parser and subparser of `ditserve` shows its defaults."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]


def load_config(path: str) -> dict[str, object]:
    """A YAML or JSON mapping of flag names (with '-' or '_') to values; JSON by suffix, else YAML."""
    text = Path(path).read_text()
    if path.endswith(".json"):
        data = json.loads(text)
    else:
        try:
            import yaml
        except ImportError:
            raise SystemExit(f"--config {path}: YAML needs PyYAML (in 'ditserve[serve]'); or use JSON") from None
        data = yaml.safe_load(text)
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
    return data


def config_tokens(config: dict[str, object]) -> list[str]:
    """The mapping as command-line tokens, so argparse checks names, types and choices as for flags."""
    tokens: list[str] = []
    for key, value in config.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            tokens.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, list):
            tokens += [flag, ",".join(str(item) for item in value)]
        elif isinstance(value, dict):
            tokens += [flag, json.dumps(value)]
        else:
            tokens += [flag, str(value)]
    return tokens


def expand_config(argv: list[str]) -> list[str]:
    """`--config FILE` (or `--config=FILE`) replaced in place by the file's flags: later flags win."""
    out: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == "--config" and index + 1 < len(argv):
            out += config_tokens(load_config(argv[index + 1]))
            index += 2
            continue
        if token.startswith("--config="):
            out += config_tokens(load_config(token.split("=", 1)[1]))
        else:
            out.append(token)
        index += 1
    return out


def token_default() -> str | None:
    """$DITSERVE_TOKEN, else the first token line of the file $DITSERVE_TOKEN_FILE names."""
    from ditserve.client.security import token_from_file

    return os.environ.get("DITSERVE_TOKEN") or token_from_file(os.environ.get("DITSERVE_TOKEN_FILE"))


def rpc_error_line(command: str, target: str, error: grpc.RpcError) -> str:
    """One line for a failed call, with a hint for the codes a user can fix."""
    code = error.code() if hasattr(error, "code") else None
    details = (error.details() if hasattr(error, "details") else str(error)) or ""
    first = details.strip().splitlines()[0] if details.strip() else ""
    name = code.name if code is not None else "ERROR"
    hints = {
        grpc.StatusCode.UNAVAILABLE: f"is a ditserve gateway running at {target}? Start one with `ditserve up`,"
        " or pass --target HOST:PORT",
        grpc.StatusCode.UNAUTHENTICATED: "pass --token, --token-file, $DITSERVE_TOKEN or $DITSERVE_TOKEN_FILE",
        grpc.StatusCode.DEADLINE_EXCEEDED: "raise --timeout, or ask for fewer steps or a smaller size",
    }
    hint = hints.get(code)
    return f"ditserve {command}: {name}: {first}" + (f" (hint: {hint})" if hint else "")
