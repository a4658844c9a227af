"""KV-cached decoding against recomputing the window, side by side, on one GPT-NeoX.

Both decode the same greedy continuation (checked token for token). Rounds alternate the two methods so
that machine noise falls on both alike; the ratio of median times is the figure to read.

    python bench/generation_cache.py                            # tiny NeoX on the CPU
    python bench/generation_cache.py --d-model 1024 --layers 8 --new 512 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from papertrain.recipes.lm.sampling.model import Sampler, stream
from papertrain.recipes.transformers.neox.model import GPTNeoX


class WithoutCache(torch.nn.Module):
    """The same model, hiding `new_cache`, so that `stream` recomputes the whole window each step."""

    def __init__(self, model: GPTNeoX):
        super().__init__()
        self.model, self.block_size = model, model.block_size

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


def timed(model: torch.nn.Module, prompt: torch.Tensor, new: int, device: torch.device) -> tuple[float, list[int]]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = list(stream(model, prompt, new, Sampler(temperature=0.0)))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    parser.add_argument("--new", type=int, default=256, help="tokens to generate")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = GPTNeoX(vocab_size=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=args.heads,
                    block_size=args.prompt + args.new).to(device).eval()
    prompt = torch.randint(0, args.vocab, (1, args.prompt), device=device)
    times: dict[str, list[float]] = {"cached": [], "recomputed": []}
    outputs = {}
    timed(model, prompt, 8, device)  # warm-up
    for _ in range(args.rounds):
        for name, runner in (("cached", model), ("recomputed", WithoutCache(model))):
            seconds, tokens = timed(runner, prompt, args.new, device)
            times[name].append(seconds)
            outputs[name] = tokens
    assert outputs["cached"] == outputs["recomputed"], "the two methods decoded different tokens"
    cached, recomputed = statistics.median(times["cached"]), statistics.median(times["recomputed"])
    print(f"GPTNeoX d_model={args.d_model} layers={args.layers} on {device}: prompt {args.prompt}, "
          f"{args.new} new tokens, {args.rounds} rounds (same tokens from both)")
    print(f"  cached      {cached:7.3f} s  {args.new / cached:8.1f} tokens/s")
    print(f"  recomputed  {recomputed:7.3f} s  {args.new / recomputed:8.1f} tokens/s")
    print(f"  speed-up of the KV cache: {recomputed / cached:.2f}x")


if __name__ == "__main__":
    main()
