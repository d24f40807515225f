#!/usr/bin/env python
"""Compare the cost of RMT's attention strategies on the same inputs, as ratios.

Prints, for one batch of random inputs and small backbones:

- training-step time (forward, backward, optimizer step) of RMT with per-task passes and with the
  fused one-pass mask, each divided by the MMBT step time (same backbones, same batch);
- inference throughput of each strategy divided by that of the bare backbones (the CNN on the
  pixels plus the encoder on the text tokens, no RMT sequence);
- peak memory of each training step relative to MMBT (CUDA only; CPU runs print n/a).

Times are medians over `--repeats` runs after `--warmup` runs, measured with `time.perf_counter`.
Ratios, not absolute times, are the result: they transfer between machines far better.

    python benchmarks/benchmark_rmt.py [--batch_size 16] [--text_length 96] [--device cpu]
"""

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from configuration_rmt import RMTConfig
from modeling_rmt import RMTForMultimodalClassification

ENCODER = {
    "model_type": "bert",
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "vocab_size": 30522,
}
VARIANTS = {
    "mmbt": {"use_mask_attention": False, "use_multitask": False},
    "rmt_per_task": {"use_mask_attention": True, "attention_strategy": "per_task"},
    "rmt_fused": {"use_mask_attention": True, "attention_strategy": "fused"},
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=16, help="Samples per batch.")
    parser.add_argument("--text_length", type=int, default=96, help="Text tokens per sample, CLS included.")
    parser.add_argument("--image_size", type=int, default=128, help="Side of the square input image in pixels.")
    parser.add_argument("--image_model_name", default="resnet10t", help="timm CNN.")
    parser.add_argument("--repeats", type=int, default=5, help="Timed runs per measurement (median reported).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed runs before each measurement.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Torch device.")
    return parser.parse_args()


def build_model(args: argparse.Namespace, **overrides) -> RMTForMultimodalClassification:
    torch.manual_seed(0)
    config = RMTConfig(
        text_config=dict(ENCODER),
        image_model_name=args.image_model_name,
        image_pretrained=False,
        image_size=args.image_size,
        **overrides,
    )
    return RMTForMultimodalClassification(config).to(args.device)


def make_batch(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(1000, 20000, (args.batch_size, args.text_length), generator=generator),
        "attention_mask": torch.ones(args.batch_size, args.text_length, dtype=torch.long),
        "pixel_values": torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator),
        "modality_mask": torch.ones(args.batch_size, 2, dtype=torch.long),
        "labels": torch.randint(0, 2, (args.batch_size,), generator=generator),
    }
    return {key: value.to(args.device) for key, value in batch.items()}


def median_seconds(step: Callable[[], None], args: argparse.Namespace) -> float:
    def synchronize() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    synchronize()
    timings = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        synchronize()
        timings.append(time.perf_counter() - start)
    return statistics.median(timings)


def training_step(model: RMTForMultimodalClassification, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        optimizer.step()

    return step


def inference_step(model: RMTForMultimodalClassification, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    inputs = {key: value for key, value in batch.items() if key != "labels"}
    model.eval()

    def step() -> None:
        with torch.no_grad():
            model(**inputs)

    return step


def bare_backbones_step(model: RMTForMultimodalClassification, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """Forward of the CNN on the pixels and of the encoder on the text tokens alone: the cost floor."""
    image_encoder = model.rmt.embeddings.image_encoder
    encoder = model.rmt.encoder
    model.eval()

    def step() -> None:
        with torch.no_grad():
            image_encoder(batch["pixel_values"])
            encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    return step


def peak_memory_bytes(step: Callable[[], None], args: argparse.Namespace) -> int | None:
    if not args.device.startswith("cuda"):
        return None
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def main() -> None:
    args = parse_args()
    batch = make_batch(args)
    models = {name: build_model(args, **overrides) for name, overrides in VARIANTS.items()}

    train_seconds = {name: median_seconds(training_step(model, batch), args) for name, model in models.items()}
    memory = {name: peak_memory_bytes(training_step(model, batch), args) for name, model in models.items()}
    bare_seconds = median_seconds(bare_backbones_step(models["mmbt"], batch), args)
    infer_seconds = {name: median_seconds(inference_step(model, batch), args) for name, model in models.items()}

    print(
        f"device {args.device}, batch {args.batch_size}, text length {args.text_length}, image "
        f"{args.image_size} px, CNN {args.image_model_name}, encoder {ENCODER['num_hidden_layers']} layers x "
        f"{ENCODER['hidden_size']}, median of {args.repeats} runs"
    )
    print(f"{'model':<14}{'train step / MMBT':>20}{'inference / bare backbones':>30}{'peak memory / MMBT':>22}")
    for name in models:
        train_ratio = train_seconds[name] / train_seconds["mmbt"]
        throughput_ratio = bare_seconds / infer_seconds[name]
        memory_ratio = "n/a" if memory[name] is None else f"{memory[name] / memory['mmbt']:.2f}"
        print(f"{name:<14}{train_ratio:>20.2f}{throughput_ratio:>30.2f}{memory_ratio:>22}")


if __name__ == "__main__":
    main()
