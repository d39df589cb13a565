"""A trained stage's probabilities for swift rows: over its own labels (the five, or 高风险/非高风险), one forward pass
a batch; and the resumable scoring jobs behind `python -m tools.model.score` (one process) and tools.model.shards
(one process per GPU).

The model and template are prepared by swift itself (the checkpoint's args.json supplies model, template,
dtype and external plugins, exactly as `swift infer --adapters` does), so anything swift can load scores
the same way. Each batch costs one forward pass: the distribution of the first answer token, restricted to
the labels' first tokens (distinct, checked) and renormalised. Rows are padded on the left, so the last
position is where the answer starts. Matches `swift infer --max_new_tokens 1 --logprobs` but never drops a
label outside the top-N.

Speed (bench/README.md): rows are grouped by image size (bucket=False: file order), worker processes encode
images ahead of the GPU (workers, $SCORE_WORKERS; none on CPU), a bf16 model on CUDA runs under autocast
($SCORE_AUTOCAST=0: off), without a KV cache, and the knobs of tools.model.speedups (merge, float8, compiled
decoder layers) apply at load; compiled layers compile a graph per input shape, so only the image sizes that enough
images have run through them (the others eagerly), and a smaller last batch is filled up to the batch size so
that it needs no graph of its own. The base model's weight files are read ahead of loading them (tools.model.prefetch;
$SCORE_PREFETCH=0 turns that off). The probabilities come back in the order of the input rows.
"""
from __future__ import annotations

import json
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tools.fileio import read_json, read_jsonl, write_json
from tools.model import prefetch, prior
from tools.model.shm import use_files_if_shm_is_small
from tools.probs import write_probs
from tools.state import file_digest, images_digest, model_record
from tools.task import (LABELS, PROMPT, TRAINED_ON, label_token_ids, probs_partial_of,
                        probs_record_of, user_message)


def load(swift_argv: list[str], merge: bool | None = None, labels: tuple[str, ...] = LABELS):
    """(model, template, label ids, swift's InferArguments) prepared by swift from `swift infer`-style arguments.
    The label ids are the first tokens of `labels`, or None for a model with a classification head
    (--task_type seq_cls: its logits are the classes). The speed-up knobs (tools.model.speedups: SCORE_MERGE,
    SCORE_FP8, SCORE_COMPILE_LLM) are applied in memory; merge overrides SCORE_MERGE. Prints where the time went
    (issue 15's start-up limit: <= 20 s per stage)."""
    start = time.perf_counter()
    prefetch.start(swift_argv)  # SCORE_PREFETCH (on by default): the weights are read while Python imports
    from swift.arguments import InferArguments
    from swift.pipelines.utils import prepare_model_template
    from swift.utils import parse_args

    from tools.model import speedups

    imported = time.perf_counter()
    args, remaining = parse_args(InferArguments, swift_argv)
    if remaining:
        raise SystemExit(f"error: swift does not know these arguments: {' '.join(remaining)}")
    model, template = prepare_model_template(args)
    model.eval()
    prepared = time.perf_counter()
    model = speedups.apply(model, merge)
    print(f"load: importing swift {imported - start:.1f} s, model and adapter {prepared - imported:.1f} s, "
          f"speed-ups {time.perf_counter() - prepared:.1f} s", flush=True)
    template.model = model
    template.set_mode("transformers")  # inference encoding: no answer, left padding
    head = getattr(args, "task_type", "causal_lm") == "seq_cls"
    return model, template, None if head else label_token_ids(template.tokenizer, labels), args


def default_workers(model) -> int:
    """Encoding processes beside a GPU forward: SCORE_WORKERS, else up to 8 on CUDA, none on CPU (the CPU is
    busy with the forward there, and forking would only add start-up time)."""
    import os

    from tools.model.speedups import on_cuda

    if os.environ.get("SCORE_WORKERS", "").strip():
        return max(0, int(os.environ["SCORE_WORKERS"]))
    if not on_cuda(model):
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 2))


def image_sizes(rows: list[dict]) -> list[list[tuple[int, int]]]:
    """Each row's images' (width, height), read from their headers; (0, 0) for one that cannot be read (the
    encoder will report it)."""
    from PIL import Image

    out = []
    for row in rows:
        sizes = []
        for path in row.get("images", []):
            try:
                with Image.open(path) as img:  # reads the header only
                    sizes.append(img.size)
            except OSError:
                sizes.append((0, 0))
        out.append(sizes)
    return out


def _prompt_length(row: dict) -> int:
    return len("".join(str(m.get("content", "")) for m in row["messages"] if m["role"] != "assistant"))


def bucket_order(rows: list[dict], sizes: list[list[tuple[int, int]]] | None = None) -> list[int]:
    """Row indices grouped by their images' token count (visual_size), then prompt length, then image size, so a
    batch holds rows of one sequence length and is padded only where one length ends inside it (portrait and
    landscape photos of one token count share batches); ties keep the input order. `sizes`: image_sizes(rows), if
    read already."""
    sizes = image_sizes(rows) if sizes is None else sizes
    return sorted(range(len(rows)), key=lambda i: (visual_size(sizes[i]), _prompt_length(rows[i]), sizes[i]))


def visual_size(sizes: list[tuple[int, int]]) -> int:
    """A row's images' size as the language model sees it: their visual tokens at $MAX_PIXELS (the scripts export
    it; tools.data.images.model_size), else their pixel count; equal values, equal numbers of image tokens."""
    import os

    from tools.data.images import PATCH_FACTOR, model_size

    max_pixels = os.environ.get("MAX_PIXELS", "").strip()
    total = 0
    for width, height in sizes:
        if not (max_pixels and width and height):
            total += width * height
            continue
        try:
            h, w = model_size(height, width, int(max_pixels))
        except ValueError:  # an aspect ratio swift refuses: the encoder will report it
            h, w = height, width
        total += h * w // PATCH_FACTOR ** 2
    return total


def shape_keys(rows: list[dict], sizes: list[list[tuple[int, int]]], batches: list[list[int]]) -> list[tuple]:
    """One key per batch for the shape of its language-model input: the batch's largest visual size, its longest
    prompt (rows are padded to the longest), and whether any row is padded. Equal keys, the same compiled graph of
    the decoder layers: the sequence length, and an attention mask or none (transformers passes none when no row
    is padded; a padded batch, where bucketing puts two sizes together, compiled a graph of its own on the H200)."""
    keys = []
    for chunk in batches:
        shapes = {(visual_size(sizes[i]), _prompt_length(rows[i])) for i in chunk}
        keys.append((max(v for v, _ in shapes), max(n for _, n in shapes), len(shapes) > 1))
    return keys


def graph_batches(keys: list[tuple], batch_size: int, min_images: int, known: set) -> list[bool]:
    """Which batches run through the compiled decoder layers: those whose shape has a graph already (`known`) or
    at least `min_images` images among these batches to pay for compiling one. The others run eagerly: on an H200
    a graph takes ~3 s to compile with inductor's cache cold (bench/README.md, runs X and Y) and saves 2.2-2.7 ms
    per image ("Scoring levers"), so a shape that only a few images have costs more than it saves, and many such
    shapes would exhaust torch's limit on graphs per layer code."""
    from collections import Counter

    counts = Counter(keys)
    return [(batch_size, key) in known or counts[key] * batch_size >= min_images for key in keys]


TTA_MODES = ("0", "flip")


def tta_mode() -> str:
    """SCORE_TTA: 0 (default) scores each image as it is; flip also scores its mirror image (left-right) and
    averages the two probability vectors (twice the scoring time)."""
    import os

    value = os.environ.get("SCORE_TTA", "0").strip() or "0"
    if value not in TTA_MODES:
        from tools.fileio import DataError

        raise DataError(f"SCORE_TTA={value!r}: expected one of {', '.join(TTA_MODES)}")
    return value


def _mirrored(path: str):
    """The image as swift loads it (RGB, no EXIF rotation: the rows name prepared, upright copies), mirrored."""
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        return ImageOps.mirror(img.convert("RGB"))


class _Encoded:
    """Rows as a torch dataset of encoded model inputs (runs in DataLoader workers when there are any).
    With `pixel_dtype` the pixel values travel in the model's dtype: half the bytes, the same values (the
    vision tower casts them to its dtype first thing). With `mirror`, index len(rows) + i is row i with its
    images mirrored left-right (test-time augmentation)."""

    def __init__(self, template, rows: list[dict], pixel_dtype=None, prompt: str | None = None, mirror: bool = False):
        self.template, self.rows, self.pixel_dtype, self.prompt = template, rows, pixel_dtype, prompt
        self.mirror = mirror

    def __len__(self) -> int:
        return len(self.rows) * (2 if self.mirror else 1)

    def __getitem__(self, i: int):
        from swift.infer_engine import InferRequest

        row = self.rows[i % len(self.rows)]
        images = row.get("images", [])
        if i >= len(self.rows):
            images = [_mirrored(path) for path in images]
        # the question the model was trained with (a binary specialist has its own), else the row's
        messages = ([user_message(self.prompt)] if self.prompt is not None
                    else [m for m in row["messages"] if m["role"] != "assistant"])
        encoded = self.template.encode(InferRequest(messages=messages, images=images))
        if self.pixel_dtype is not None:
            for key in ("pixel_values", "pixel_values_videos"):
                if key in encoded and encoded[key].is_floating_point():
                    encoded[key] = encoded[key].to(self.pixel_dtype)
        return encoded


def use_autocast(model) -> bool:
    """bf16/fp16 models on CUDA score under autocast (SCORE_AUTOCAST=0 turns it off): the base weights are
    already half precision, and the fp32 LoRA adapters then run their products in half precision, as in
    training, instead of copying every adapter input to fp32."""
    import os

    from tools.model.speedups import half_precision_on_cuda

    if os.environ.get("SCORE_AUTOCAST", "1").strip() == "0":
        return False
    return half_precision_on_cuda(model)


@contextmanager
def inference_context(model, autocast: bool | None = None):
    """inference_mode, plus autocast (and no PEFT input casts, which autocast would undo) when use_autocast."""
    import torch

    with ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        if use_autocast(model) if autocast is None else autocast:
            stack.enter_context(torch.autocast(model.device.type, dtype=model.dtype))
            try:
                from peft.helpers import disable_input_dtype_casting
            except ImportError:  # older peft: the casts stay, the result is the same
                pass
            else:
                stack.enter_context(disable_input_dtype_casting(model))
        yield


def forward_probs(model, template, batch: dict, label_ids):
    """[batch, K] label probabilities of one collated batch (call inside inference_context): the first answer
    token's distribution over the K labels' first tokens, or with label_ids None a classification head's softmax."""
    import torch
    from swift.utils import to_device

    inputs = to_device(batch, model.device)
    _, inputs = template.pre_forward_hook(model, None, inputs)
    inputs.pop("labels", None)
    if label_ids is None:  # seq_cls: one logit per class, pooled at the last token
        return torch.softmax(model(**inputs, use_cache=False).logits.float(), -1)
    logits = model(**inputs, logits_to_keep=1, use_cache=False).logits[:, -1].float()
    index = torch.as_tensor(label_ids, device=logits.device)
    return torch.softmax(logits[:, index], -1)


def score_rows(model, template, label_ids: list[int], rows: list[dict], batch_size: int = 8,
               progress: bool = True, workers: int | None = None, bucket: bool = True,
               done: dict[int, np.ndarray] | None = None, on_batch=None, prompt: str | None = None,
               n_labels: int = len(LABELS), tta: str | None = None, fill: bool | None = None) -> np.ndarray:
    """[len(rows), n_labels] probabilities, in the order of `rows`; rows are swift JSONL rows (an assistant turn,
    if any, is ignored; with `prompt` the question is that prompt instead of the row's). `workers` encode batches
    ahead of the forward pass (default: default_workers); `bucket` batches rows of equal image size together.
    `done` holds rows already scored (row index -> probabilities), which are not scored again;
    on_batch(indices, probabilities) sees each new batch. `tta` (default: SCORE_TTA): "flip" averages each row's
    probabilities with its mirror image's (each batch is followed by its mirrored twin).

    With compiled decoder layers (tools.model.speedups.has_compiled_layers), which compile a graph per input shape,
    a batch runs through them when its shape pays for a graph (graph_batches, with
    tools.model.speedups.graph_min_images) and eagerly otherwise; and `fill` (default: when the last batch runs
    compiled) fills a smaller last batch up to batch_size with copies of its last row, scored and dropped, so the
    full batches' graph serves it (bench/README.md, run Y: 11 s off a cold test.sh on 2,000 photos)."""
    import torch
    from torch.utils.data import DataLoader

    from tools.model.speedups import eager_layers, graph_min_images, graph_shapes, has_compiled_layers

    out = np.zeros((len(rows), n_labels), dtype=np.float64)
    for i, p in (done or {}).items():
        out[i] = p
    todo = [i for i in range(len(rows)) if i not in (done or {})]
    if not todo:
        return out
    workers = default_workers(model) if workers is None else workers
    if workers:
        use_files_if_shm_is_small()
    layers_compiled = has_compiled_layers(model)
    sizes = image_sizes(rows) if bucket or layers_compiled else None  # the headers, read only when used
    order = [i for i in (bucket_order(rows, sizes) if bucket else range(len(rows))) if i not in (done or {})]
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    keys = shape_keys(rows, sizes, batches) if layers_compiled else [None] * len(batches)
    known = graph_shapes(model)
    compiled = (graph_batches(keys, batch_size, graph_min_images(), known) if layers_compiled
                else [False] * len(batches))
    full = batch_size if (compiled[-1] if fill is None else fill) else 0
    encoded_batches = [chunk + [chunk[-1]] * (full - len(chunk)) for chunk in batches]  # as is when full = 0
    mirror = (tta or tta_mode()) == "flip"
    views = 2 if mirror else 1
    sampler = [view for chunk in encoded_batches
               for view in ([chunk, [len(rows) + i for i in chunk]] if mirror else [chunk])]
    pixel_dtype = model.dtype if use_autocast(model) else None
    loader = DataLoader(_Encoded(template, rows, pixel_dtype, prompt, mirror), batch_sampler=sampler,
                        collate_fn=template.data_collator, num_workers=min(workers, len(sampler)),
                        prefetch_factor=4 if workers else None, pin_memory=workers > 0 and torch.cuda.is_available())
    encoded = iter(loader)
    with inference_context(model):
        for chunk, key, graph in tqdm(zip(batches, keys, compiled), total=len(batches), desc="scoring",
                                      disable=not progress):
            with ExitStack() as stack:
                if graph:
                    known.add((batch_size, key))
                elif layers_compiled:  # a shape too rare to pay for a graph
                    stack.enter_context(eager_layers(model))
                probs = sum(forward_probs(model, template, next(encoded), label_ids).cpu().numpy()
                            for _ in range(views))
            out[chunk] = probs[:len(chunk)] / views  # the filled-in copies, at the end, dropped
            if on_batch is not None:
                on_batch(chunk, out[chunk])
    return out


def choose_compile(n_images: int) -> str:
    """Whether swift_plugins/patches/vision_attention.py compiles its fused kernels in this process: SCORE_COMPILE=on|off,
    or auto: only for at least SCORE_COMPILE_MIN_IMAGES images (default 800). Measured on an H200 with the 7B:
    compiling delays the first batch by ~9 s and then saves ~14 ms per image (18.0 vs 14.4 images/s), so it pays
    from ~650 images on (bench/README.md). Set before the model, and with it the plugin, is loaded; the language
    model's layers follow it (tools.model.speedups.compile_wanted)."""
    import os

    from tools.model.speedups import compile_min_images

    policy = os.environ.get("SCORE_COMPILE", "auto").strip().lower()
    if policy == "auto":
        policy = "on" if n_images >= compile_min_images() else "off"
    if policy == "off":
        os.environ["FIRESAFE_COMPILE"] = "off"
    return policy


def model_of(checkpoint: Path) -> dict:
    """What the checkpoint's run recorded of its model (tools.model.checkpoint start): labels, prompt, task and
    class shares; a checkpoint without the record is a five-label text-answer model with the task prompt."""
    record = model_record(Path(checkpoint).parent / TRAINED_ON)
    return {"labels": list(record.get("labels", LABELS)), "prompt": record.get("prompt", PROMPT),
            "task": record.get("task", "causal_lm"), "class_shares": record.get("class_shares")}


def job_record(checkpoint: Path, dataset: Path, swift_argv: list[str], model: dict | None = None) -> dict:
    """What a probability CSV depends on: the checkpoint's files (names, sizes, times), the rows, the arguments,
    the model's labels and prompt, the merge and float8 knobs, test-time augmentation, and whether its prior is
    corrected."""
    from tools.model import speedups

    files = sorted(p for p in Path(checkpoint).rglob("*") if p.is_file())
    model = model if model is not None else model_of(checkpoint)
    return {"checkpoint": str(checkpoint),
            "checkpoint_files": images_digest(files),  # a stat per file: a retrained checkpoint differs
            "rows": file_digest(dataset), "swift_argv": list(swift_argv), **model,
            "speedups": speedups.policy(),  # merged or float8 weights round differently
            "tta": tta_mode(),
            "prior_corrected": bool(model["class_shares"]) and prior.wanted()}


def read_partial(path: Path, record: dict, n_rows: int, n_labels: int = len(LABELS)) -> dict[int, np.ndarray]:
    """Rows an interrupted run scored with the same record, or nothing."""
    if not path.exists():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    if not lines or lines[0] != "# " + json.dumps(record, sort_keys=True):
        return {}
    done = {}
    for line in lines[1:]:
        fields = line.split(",")
        try:
            index, values = int(fields[0]), np.array([float(v) for v in fields[1:]])
        except ValueError:  # a line cut by the interruption
            continue
        if 0 <= index < n_rows and values.shape == (n_labels,):
            done[index] = values
    return done


def n_labels_of(record: dict) -> int:
    """How many probabilities a row of a CSV with this record holds (five without a model record: the filter)."""
    return len(record.get("labels", LABELS))


def write_scored(output: Path, rows: list[dict], probs: np.ndarray, record: dict) -> None:
    """The finished CSV, prior-corrected when the record says so (from the raw scores the partial files hold),
    and its record."""
    if record["prior_corrected"]:
        shares = record["class_shares"]
        probs = prior.correct(probs, shares["trained"], shares["real"])
    write_probs(output, [Path(r["images"][0]).name for r in rows], probs)
    write_json(probs_record_of(output), record)


def score_jobs(jobs: list[tuple[Path, list[tuple[Path, Path]]]], swift_argv: list[str], batch_size: int,
               workers: int | None = None, bucket: bool = True) -> None:
    """Load each checkpoint once, score its datasets, write their CSVs (rows named by image file name), over the
    model's own labels (five, or 高风险/非高风险), asked with its own prompt, prior-corrected to the data's class
    shares when its run recorded them (tools.model.prior).

    Resumable: a CSV whose record (checkpoint files, rows, arguments, model) matches is kept as it is, and the rows
    an interrupted run scored (the partial file, appended batch by batch, before correction) are not scored
    again."""
    import gc

    datasets = {path: read_jsonl(path) for _, parts in jobs for path, _ in parts}
    # One choice per process (the plugin reads it at import): by the largest number of images one model scores.
    choose_compile(max((sum(len(datasets[path]) for path, _ in parts) for _, parts in jobs), default=0))
    pending = []  # (checkpoint, model_info, records, todo) of each model with something left to score
    for checkpoint, parts in jobs:
        model_info = model_of(checkpoint)
        records = {output: job_record(checkpoint, dataset, swift_argv, model_info) for dataset, output in parts}
        kept = [output for _, output in parts if output.exists() and probs_record_of(output).exists()
                and read_json(probs_record_of(output)) == records[output]]
        for output in kept:
            print(f"kept {output} (scored before with the same checkpoint, rows and arguments)")
        todo = [(dataset, output) for dataset, output in parts if output not in kept]
        if todo:
            pending.append((checkpoint, model_info, records, todo))
    for index, (checkpoint, model_info, records, todo) in enumerate(pending):
        labels = tuple(model_info["labels"])
        print(f"scoring with {checkpoint}")
        start = time.time()
        reset_gpu_peak()
        model, template, label_ids, _ = load(["--adapters", str(checkpoint), *swift_argv], labels=labels)
        print(f"loaded in {time.time() - start:.1f} s{gpu_peak()}")
        if index + 1 < len(pending):  # SCORE_PREFETCH: the next model's weights are read while this one scores
            prefetch.start(["--adapters", str(pending[index + 1][0]), *swift_argv])
        for dataset, output in todo:
            reset_gpu_peak()
            rows, start, record = datasets[dataset], time.time(), records[output]
            partial = probs_partial_of(output)
            done = read_partial(partial, record, len(rows), len(labels))
            if done:
                print(f"continuing {output}: {len(done)} of {len(rows)} images scored before")
            else:
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text("# " + json.dumps(record, sort_keys=True) + "\n", encoding="utf-8")
            with open(partial, "a", encoding="utf-8") as f:
                def keep(indices, probs, f=f):
                    f.write("".join(f"{i}," + ",".join(repr(float(v)) for v in p) + "\n"
                                    for i, p in zip(indices, probs)))
                    f.flush()

                probs = score_rows(model, template, label_ids, rows, batch_size, workers=workers, bucket=bucket,
                                   done=done, on_batch=keep, prompt=model_info["prompt"], n_labels=len(labels))
            write_scored(output, rows, probs, record)
            partial.unlink(missing_ok=True)
            seconds = time.time() - start
            n = len(rows) - len(done)
            print(f"scored {n} images in {seconds:.1f} s ({n / max(seconds, 1e-9):.1f} images/s{gpu_peak()}) "
                  f"-> {output}")
        del model, template
        gc.collect()
        _empty_cache()


class ScoringOutOfMemory(RuntimeError):
    """The GPU ran out of memory while a model loaded or scored (one line from the scoring CLIs: what to lower)."""


@contextmanager
def out_of_memory_hint(batch_size: int):
    """Turns CUDA's out-of-memory error into a ScoringOutOfMemory that says what to lower. The rows scored before it
    stay in the partial files, so the next run continues from them."""
    import torch

    try:
        yield
    except torch.OutOfMemoryError as e:
        # CUDA's first three sentences (what it tried, the card's total and free memory); the rest is allocator advice
        cuda_says = ". ".join((str(e).strip() or "out of memory").splitlines()[0].split(". ")[:3])
        lower = (f"lower SCORE_BATCH_SIZE (test.sh; --batch-size), now {batch_size}, e.g. to {max(1, batch_size // 2)}"
                 if batch_size > 1 else "lower MAX_PIXELS (the recipe), or use a GPU with more memory")
        raise ScoringOutOfMemory(
            f"the GPU ran out of memory ({cuda_says.rstrip('.')}). Scoring holds the model's weights (7B: ~16 GiB, "
            f"3B: ~7) and a batch's activations (~0.2 GiB an image; bench/README.md, Memory configurations): "
            f"{lower}. The rows scored so far are kept: the next run continues from them") from e


def reset_gpu_peak() -> None:
    """Start gpu_peak's count afresh (a no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def gpu_peak_gib() -> tuple[float, float] | None:
    """(allocated, reserved) peak GiB since reset_gpu_peak, or None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    gib = 1024 ** 3
    return torch.cuda.max_memory_allocated() / gib, torch.cuda.max_memory_reserved() / gib


def gpu_peak() -> str:
    """", peak GPU A GiB allocated, R GiB reserved" since reset_gpu_peak, or "" without CUDA: which step of a
    scoring process needs the memory (what fits a 24 GB card is the allocated peak; the reserved one is what
    nvidia-smi shows, the caching allocator's blocks included)."""
    peak = gpu_peak_gib()
    return "" if peak is None else f", peak GPU {peak[0]:.1f} GiB allocated, {peak[1]:.1f} GiB reserved"


def _empty_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
