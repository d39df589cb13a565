"""Score images with a trained stage: a probability vector over the five labels for every row.

    python -m tools.score --checkpoint outputs/stage1/.../checkpoint-N --dataset outputs/data/test.jsonl \
        --output outputs/stage1/test_probs.csv [-- extra swift infer flags]

The model and template are prepared by swift itself (the checkpoint's args.json supplies model, template,
dtype and external plugins, exactly as `swift infer --adapters` does), so anything swift can load scores
the same way. Each batch costs one forward pass: the distribution of the first answer token, restricted to
the five labels' first tokens (distinct, checked) and renormalised. Rows are padded on the left, so the last
position is where the answer starts. Matches `swift infer --max_new_tokens 1 --logprobs` but never drops a
label outside the top-N.

Speed (bench/README.md): rows are grouped by image size (--no-bucket: file order), worker processes encode
images ahead of the GPU (--workers, $SCORE_WORKERS; none on CPU), and a bf16 model on CUDA runs under
autocast ($SCORE_AUTOCAST=0: off). The probabilities come back in the order of the input rows.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from tools.fileio import atomic_open, read_jsonl
from tools.task import LABELS


def label_token_ids(tokenizer) -> list[int]:
    """The first token of each label; they must differ, or one forward pass could not tell them apart."""
    ids = [tokenizer.encode(label, add_special_tokens=False)[0] for label in LABELS]
    if len(set(ids)) != len(ids):
        raise ValueError(f"labels share a first token under this tokenizer: {dict(zip(LABELS, ids))}")
    return ids


def load(swift_argv: list[str]):
    """(model, template, label ids) prepared by swift from `swift infer`-style arguments."""
    from swift.arguments import InferArguments
    from swift.pipelines.utils import prepare_model_template
    from swift.utils import parse_args

    args, remaining = parse_args(InferArguments, swift_argv)
    if remaining:
        raise SystemExit(f"error: swift does not know these arguments: {' '.join(remaining)}")
    model, template = prepare_model_template(args)
    model.eval()
    template.set_mode("transformers")  # inference encoding: no answer, left padding
    return model, template, label_token_ids(template.tokenizer), args


def default_workers(model) -> int:
    """Encoding processes beside a GPU forward: SCORE_WORKERS, else up to 8 on CUDA, none on CPU (the CPU is
    busy with the forward there, and forking would only add start-up time)."""
    import os

    if os.environ.get("SCORE_WORKERS", "").strip():
        return max(0, int(os.environ["SCORE_WORKERS"]))
    device = getattr(model, "device", None)
    if device is None or getattr(device, "type", "cpu") != "cuda":
        return 0
    return max(0, min(8, (os.cpu_count() or 1) - 2))


def bucket_order(rows: list[dict]) -> list[int]:
    """Row indices grouped by image size (then prompt length), so a batch holds images of one token count and
    little padding; ties keep the input order."""
    from PIL import Image

    def key(i: int):
        sizes = []
        for path in rows[i].get("images", []):
            try:
                with Image.open(path) as img:  # reads the header only
                    sizes.append(img.size)
            except OSError:
                sizes.append((0, 0))  # the encoder will report it
        text = "".join(str(m.get("content", "")) for m in rows[i]["messages"] if m["role"] != "assistant")
        return sizes, len(text)

    return sorted(range(len(rows)), key=key)


class _Encoded:
    """Rows as a torch dataset of encoded model inputs (runs in DataLoader workers when there are any).
    With `pixel_dtype` the pixel values travel in the model's dtype: half the bytes, the same values (the
    vision tower casts them to its dtype first thing)."""

    def __init__(self, template, rows: list[dict], pixel_dtype=None):
        self.template, self.rows, self.pixel_dtype = template, rows, pixel_dtype

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        from swift.infer_engine import InferRequest

        row = self.rows[i]
        encoded = self.template.encode(InferRequest(messages=[m for m in row["messages"] if m["role"] != "assistant"],
                                                    images=row.get("images", [])))
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

    import torch

    if os.environ.get("SCORE_AUTOCAST", "1").strip() == "0":
        return False
    device = getattr(model, "device", None)
    return getattr(device, "type", "cpu") == "cuda" and getattr(model, "dtype", None) in (torch.bfloat16,
                                                                                          torch.float16)


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
    """[batch, 5] label probabilities of one collated batch (call inside inference_context)."""
    import torch
    from swift.utils import to_device

    inputs = to_device(batch, model.device)
    _, inputs = template.pre_forward_hook(model, None, inputs)
    inputs.pop("labels", None)
    logits = model(**inputs, logits_to_keep=1).logits[:, -1].float()
    index = torch.as_tensor(label_ids, device=logits.device)
    return torch.softmax(logits[:, index], -1)


def score_rows(model, template, label_ids: list[int], rows: list[dict], batch_size: int = 8,
               progress: bool = True, workers: int | None = None, bucket: bool = True) -> np.ndarray:
    """[len(rows), 5] probabilities, in the order of `rows`; rows are swift JSONL rows (an assistant turn, if
    any, is ignored). `workers` encode batches ahead of the forward pass (default: default_workers);
    `bucket` batches rows of equal image size together."""
    import torch
    from torch.utils.data import DataLoader

    out = np.zeros((len(rows), len(LABELS)), dtype=np.float64)
    if not rows:
        return out
    workers = default_workers(model) if workers is None else workers
    order = bucket_order(rows) if bucket else list(range(len(rows)))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    pixel_dtype = model.dtype if use_autocast(model) else None
    loader = DataLoader(_Encoded(template, rows, pixel_dtype), batch_sampler=batches, collate_fn=template.data_collator,
                        num_workers=min(workers, len(batches)), prefetch_factor=4 if workers else None,
                        pin_memory=workers > 0 and torch.cuda.is_available())
    with inference_context(model):
        for chunk, batch in tqdm(zip(batches, loader), total=len(batches), desc="scoring", disable=not progress):
            out[chunk] = forward_probs(model, template, batch, label_ids).cpu().numpy()
    return out


def write_probs(path: str | Path, names: list[str], probs: np.ndarray) -> None:
    with atomic_open(path) as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["image", *LABELS])
        for name, p in zip(names, probs):
            w.writerow([name, *(f"{v:.6f}" for v in p)])


def read_probs(path: str | Path) -> tuple[list[str], np.ndarray]:
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    if not rows or rows[0] != ["image", *LABELS]:
        raise ValueError(f"{path}:1: expected header image,{','.join(LABELS)}")
    return [r[0] for r in rows[1:]], np.array([[float(v) for v in r[1:]] for r in rows[1:]])


def choose_compile(n_images: int) -> str:
    """Whether swift_plugins/vision_attention.py compiles its fused kernels in this process: SCORE_COMPILE=on|off,
    or auto: only for at least SCORE_COMPILE_MIN_IMAGES images (default 800). Measured on an H200 with the 7B:
    compiling delays the first batch by ~9 s and then saves ~14 ms per image (18.0 vs 14.4 images/s), so it pays
    from ~650 images on (bench/README.md). Set before the model, and with it the plugin, is loaded."""
    import os

    policy = os.environ.get("SCORE_COMPILE", "auto").strip().lower()
    if policy == "auto":
        policy = "on" if n_images >= int(os.environ.get("SCORE_COMPILE_MIN_IMAGES", "800")) else "off"
    if policy == "off":
        os.environ["FIRESAFE_COMPILE"] = "off"
    return policy


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, swift_argv = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    ap = argparse.ArgumentParser(prog="python -m tools.score", description=__doc__.split("\n\n")[0],
                                 epilog="Arguments after -- go to swift's InferArguments (e.g. --max_pixels).")
    ap.add_argument("--checkpoint", required=True, help="a swift training checkpoint (adapter) directory")
    ap.add_argument("--dataset", required=True, action="append", help="swift JSONL rows to score (repeatable)")
    ap.add_argument("--output", required=True, action="append",
                    help="CSV: image, then one probability column per label (one per --dataset)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None,
                    help="processes encoding images ahead of the GPU (default: $SCORE_WORKERS, else up to 8 on "
                         "CUDA, 0 on CPU)")
    ap.add_argument("--no-bucket", dest="bucket", action="store_false",
                    help="batch rows in file order instead of grouping equal image sizes")
    args = ap.parse_args(ours)
    if len(args.dataset) != len(args.output):
        ap.error("give one --output per --dataset")
    datasets = [read_jsonl(d) for d in args.dataset]
    choose_compile(sum(len(rows) for rows in datasets))
    model, template, label_ids, _ = load(["--adapters", args.checkpoint, *swift_argv])  # loaded once for all
    for rows, output in zip(datasets, args.output):
        start = time.time()
        probs = score_rows(model, template, label_ids, rows, args.batch_size, workers=args.workers,
                           bucket=args.bucket)
        write_probs(output, [Path(r["images"][0]).name for r in rows], probs)
        seconds = time.time() - start
        print(f"scored {len(rows)} images in {seconds:.1f} s ({len(rows) / seconds:.1f} images/s) -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
