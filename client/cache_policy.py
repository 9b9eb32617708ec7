"""A cache policy as users write it (a shorthand, CachePolicy JSON, or a parsed JSON object) as the wire
message; shared by the CLI's --cache-policy, the denoiser's default and the HTTP API's cache_policy."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf import json_format

from ditserve.v1 import cache_pb2

SHORTHANDS: dict[str, dict[str, Any]] = {"none": {"none": {}}, "teacache": {"teacache": {}}, "dbcache": {"dbcache": {}}}


def parse_cache_policy(value: str | dict[str, Any]) -> cache_pb2.CachePolicy:
    """Raises ValueError naming the problem when the value is not a CachePolicy."""
    if isinstance(value, str):
        if value in SHORTHANDS:
            value = SHORTHANDS[value]
        else:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ValueError(f"{value!r} is none, teacache, dbcache or a CachePolicy as JSON") from None
    if not isinstance(value, dict):
        raise ValueError(f"{value!r} is none, teacache, dbcache or a CachePolicy as JSON")
    try:
        return json_format.ParseDict(value, cache_pb2.CachePolicy())
    except json_format.ParseError as error:
        raise ValueError(str(error)) from None
