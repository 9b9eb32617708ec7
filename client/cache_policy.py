"""--cache-policy's text (a shorthand or CachePolicy JSON) as the wire message; shared by CLI and denoiser."""

from __future__ import annotations

from google.protobuf import json_format

from ditserve.v1 import cache_pb2

SHORTHANDS = {"none": '{"none": {}}', "teacache": '{"teacache": {}}', "dbcache": '{"dbcache": {}}'}


def parse_cache_policy(text: str) -> cache_pb2.CachePolicy:
    """Raises ValueError with protobuf's message when the JSON does not parse as a CachePolicy."""
    try:
        return json_format.Parse(SHORTHANDS.get(text, text), cache_pb2.CachePolicy())
    except json_format.ParseError as error:
        raise ValueError(str(error)) from None
