"""The encoder's embedding cache on the shipped stack: a repeated prompt is a hit and the same bytes."""

from __future__ import annotations

import uuid

import pytest
from helpers import sample, scrape

from ditserve.client.stub import StageClient
from ditserve.v1 import encoder_pb2

pytestmark = pytest.mark.integration
LOOKUPS = "ditserve_embedding_cache_lookups_total"


def test_a_repeated_prompt_is_answered_from_the_cache_with_the_models_bytes(stack: object) -> None:
    encoder = StageClient(stack.ports.address("encoder")).encoder
    port = stack.ports.metrics["encoder"]
    # A prompt no other test of the session's stack sends, so its first lookup is a miss.
    prompt = f"a purple cross on a white background {uuid.uuid4().hex}"
    request = encoder_pb2.EncodeRequest(prompts=[prompt, ""], allow_empty=True)
    before = scrape(port)
    first = encoder.Encode(request, timeout=60)  # the new prompt is a miss: the model's own embedding
    second = encoder.Encode(request, timeout=60)
    after = scrape(port)
    assert [e.SerializeToString() for e in second.embeddings] == [e.SerializeToString() for e in first.embeddings]
    hits = sample(after, LOOKUPS, result="hit") - sample(before, LOOKUPS, result="hit")
    misses = sample(after, LOOKUPS, result="miss") - sample(before, LOOKUPS, result="miss")
    assert 1 <= misses <= 2 and hits == 4 - misses  # the empty prompt may have been cached before
    assert sample(after, "ditserve_embedding_cache_bytes") > 0
