"""The CLI parses what it documents: every generation flag reaches the request."""

from __future__ import annotations

from ditserve.client.cli import build_parser


def test_generate_and_demo_accept_every_generation_flag() -> None:
    flags = [
        "--negative-prompt", "", "--width", "64", "--height", "64", "--steps", "3", "--guidance-scale", "2",
        "--true-cfg-scale", "3", "--seed", "1", "--num-images", "2", "--format", "raw", "--timeout", "5",
        "--profile-steps", "1",
    ]  # fmt: skip
    for argv in (["generate", "a prompt", *flags], ["demo", *flags]):
        args = build_parser(argv).parse_args(argv)
        assert (args.steps, args.seed, args.num_images, args.profile_steps) == (3, 1, 2, 1)
        assert args.format == "raw" and args.true_cfg_scale == 3.0
