"""A training step of the default model on the CPU: today's against the previous forms, side by side.

    python benchmarks/training_step_cpu.py [--rounds 5] [--steps 10]

The step is `training.train.fit` (what `stmae-edge train` runs after the backbone pass), on the
default preset, batch 16, on stand-in features of the real shape: the step does not read the
backbone, and its time does not depend on the values. Two ways to write the same model:
- previous (until the twelfth session): attention written out (MatMul, scale, Softmax, MatMul, as the
  ONNX graph still has it), and tokens cut and put back by a six-axis permute;
- today: PyTorch's fused attention kernel, and pixel (un)shuffle for the tokens (models/stmae.py).
They take turns in every round, each from the same seeded initial weights; the table gives medians.
The default trains 20 epochs of 42 steps on magnetic_tile's 681 training images (840 steps).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from quality_magnetic_tile import write_table  # noqa: E402

from stmae_edge.cli import use_available_cores  # noqa: E402
from stmae_edge.models import stmae  # noqa: E402
from stmae_edge.training.train import TrainConfig, fit  # noqa: E402

BEGIN, END = "<!-- training-step-cpu:begin -->", "<!-- training-step-cpu:end -->"
BATCH = 16
DEFAULT_STEPS = 840  # 20 epochs x 42 steps of 16 on magnetic_tile's 681 training images


class PreviousForms(stmae.STMAE):
    """The default as it was written before: six-axis permutes for the tokens (the attention is
    switched back in `previous_attention`)."""

    def tokenize(self, feats: torch.Tensor) -> torch.Tensor:
        b, ch, _, _ = feats.shape
        s, p = self.config.tokens_per_side, self.config.patch
        return feats.reshape(b, ch, s, p, s, p).permute(0, 2, 4, 1, 3, 5).reshape(b, s * s, self.token_dim)

    def fold(self, tokens: torch.Tensor) -> torch.Tensor:
        b = tokens.shape[0]
        s, p, ch = self.config.tokens_per_side, self.config.patch, self.features.channels
        return tokens.reshape(b, s, s, ch, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, ch, s * p, s * p)


def seconds_per_step(previous: bool, features: torch.Tensor, steps: int) -> float:
    torch.manual_seed(0)
    model = (PreviousForms if previous else stmae.STMAE)(stmae.preset("small"), backbone_weights="random")
    fused = stmae.fused_attention
    if previous:
        stmae.fused_attention = stmae.explicit_attention  # what Attention calls outside export
    try:
        fit(model, features[:BATCH], TrainConfig(epochs=1, batch_size=BATCH))  # warm-up: allocator, threads
        started = time.perf_counter()
        fit(model, features, TrainConfig(epochs=1, batch_size=BATCH))
        return (time.perf_counter() - started) / steps
    finally:
        stmae.fused_attention = fused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per turn")
    parser.add_argument("--md", type=Path, default=REPO / "docs" / "BENCHMARKS.md")
    args = parser.parse_args()
    use_available_cores()
    config = stmae.preset("small")
    channels = stmae.STMAE(config, backbone_weights="random").features.channels
    features = torch.randn(args.steps * BATCH, channels, config.grid, config.grid,
                           generator=torch.Generator().manual_seed(0)).half()  # cached as train.py caches them
    times: dict[str, list[float]] = {"previous": [], "today": []}
    for r in range(args.rounds):
        for name in times:
            times[name].append(seconds_per_step(name == "previous", features, args.steps))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{n} {t[-1]:.3f} s" for n, t in times.items()), flush=True)
    previous, today = (statistics.median(times[n]) for n in ("previous", "today"))
    rows = [f"| {label} | {seconds:.3f} | {previous / seconds:.2f}x | {seconds * DEFAULT_STEPS:.0f} s |"
            for label, seconds in (("previous: attention written out, tokens by six-axis permutes", previous),
                                   ("today: fused attention, pixel (un)shuffle", today))]
    write_table(args.md, BEGIN, END, f"python benchmarks/training_step_cpu.py --rounds {args.rounds} --steps {args.steps}",
                f"default preset, batch {BATCH}, {args.steps} timed steps per turn, turns interleaved, medians of "
                f"{args.rounds} rounds",
                ["training step", "seconds per step", "speed", f"the default's {DEFAULT_STEPS} steps"], rows)


if __name__ == "__main__":
    main()
