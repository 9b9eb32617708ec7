"""The Tensor wire format: exact round trips and strict rejection of malformed messages."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import numpy as np
import pytest
import torch

from ditserve.client.tensors import ITEMSIZE, TensorError, TensorLimits, from_numpy, to_numpy, validate
from ditserve.services.common import tensor_codec
from ditserve.services.common.errors import InvalidArgument
from ditserve.v1 import tensor_pb2


@pytest.mark.parametrize("dtype", list(tensor_codec.TORCH_DTYPES.values()))
def test_torch_round_trip_is_bit_exact(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    source = (torch.randn(3, 5, 7, generator=generator) * 100).to(dtype)
    message = tensor_codec.encode(source)
    decoded = tensor_codec.decode(message)
    assert decoded.dtype == dtype and decoded.shape == source.shape
    assert torch.equal(decoded.view(torch.uint8), source.view(torch.uint8))


def test_bf16_keeps_every_bit_including_nan_payloads() -> None:
    bits = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16)
    source = bits.view(torch.bfloat16)
    decoded = tensor_codec.decode(tensor_codec.encode(source))
    assert torch.equal(decoded.view(torch.int16), bits)


def test_non_contiguous_tensors_encode_row_major() -> None:
    source = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(tensor_codec.decode(tensor_codec.encode(source)), source)


def test_decode_views_the_message_bytes() -> None:
    """No copy beyond protobuf's own field access: the array is a view of a bytes object."""
    message = tensor_codec.encode(torch.ones(1024, dtype=torch.float32))
    array = to_numpy(message)
    assert not array.flags.owndata and not array.flags.writeable
    owner = array
    while isinstance(owner, np.ndarray):
        owner = owner.base
    assert isinstance(owner, bytes)


def test_numpy_and_torch_codecs_agree() -> None:
    array = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    message = from_numpy(array)
    assert message.datatype == "FP32"
    assert np.array_equal(tensor_codec.decode(message).numpy(), array)
    assert np.array_equal(to_numpy(tensor_codec.encode(torch.from_numpy(array))), array)


def test_empty_tensors_round_trip() -> None:
    decoded = tensor_codec.decode(tensor_codec.encode(torch.empty(0, 4)))
    assert decoded.shape == (0, 4)


def _message(datatype: str, shape: list[int], nbytes: int) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(datatype=datatype, shape=shape, raw_data=b"\0" * nbytes)


@pytest.mark.parametrize(
    ("message", "field", "words"),
    [
        (_message("FP32", [2, 2], 15), "latents.raw_data", "needs 16"),
        (_message("FP32", [2, 2], 17), "latents.raw_data", "needs 16"),
        (_message("FP8", [1], 1), "latents.datatype", "unknown datatype"),
        (_message("", [1], 4), "latents.datatype", "unknown datatype"),
        (_message("FP32", [-1, 4], 0), "latents.shape", "negative"),
        (_message("UINT8", [2**40, 2**30], 0), "latents.shape", "over the limit"),
        (_message("UINT8", [1] * 9, 1), "latents.shape", "rank 9"),
    ],
)
def test_malformed_messages_name_the_field(message: tensor_pb2.Tensor, field: str, words: str) -> None:
    with pytest.raises(TensorError) as caught:
        tensor_codec.decode(message, "latents")
    assert caught.value.field == field
    assert words in str(caught.value)


def test_limits_are_configurable() -> None:
    message = _message("FP32", [256], 1024)
    assert validate(message) == 256
    with pytest.raises(TensorError, match="over the limit of 512"):
        validate(message, limits=TensorLimits(max_bytes=512))


def test_every_datatype_has_a_torch_dtype_of_its_itemsize() -> None:
    assert set(ITEMSIZE) == set(tensor_codec.TORCH_DTYPES)
    for name, dtype in tensor_codec.TORCH_DTYPES.items():
        assert torch.empty(0, dtype=dtype).element_size() == ITEMSIZE[name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("bad", "words"), [(float("nan"), "NaN or Inf"), (-float("inf"), "NaN or Inf"), (-300.0, "beyond")]
)
def test_check_values_refuses_non_finite_and_huge_values(dtype: torch.dtype, bad: float, words: str) -> None:
    tensor = torch.linspace(-200, 200, 1001).to(dtype)
    tensor_codec.check_values(tensor, "prompt_embeds", 256.0)  # within +-256, 200 itself included
    spoiled = tensor.clone()
    spoiled[617] = bad
    with pytest.raises(InvalidArgument, match=words) as caught:
        tensor_codec.check_values(spoiled, "prompt_embeds", 256.0)
    assert caught.value.field == "prompt_embeds"


def test_bf16_values_widen_exactly_to_float32() -> None:
    every = torch.arange(0, 2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    assert np.array_equal(tensor_codec._float_values(every), every.float().numpy(), equal_nan=True)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="torch runs one thread here: no team to leave out")
def test_checking_values_starts_no_openmp_team_on_the_calling_thread() -> None:
    """A torch reduction this large runs in parallel, and on a thread that never ran one libgomp first
    starts a team for it: a handler thread checking a request must not."""
    values = torch.randn(1 << 22)
    counts: list[int] = []

    def check(run: Callable[[], object]) -> None:
        before = len(os.listdir("/proc/self/task"))
        run()
        counts.append(len(os.listdir("/proc/self/task")) - before)

    for run in (lambda: tensor_codec.check_values(values, "latents", 1e4), lambda: values.abs().max()):
        thread = threading.Thread(target=check, args=(run,))
        thread.start()
        thread.join()
    assert counts[0] == 0
    assert counts[1] > 0  # the same size in torch does start one: the count can see a team
