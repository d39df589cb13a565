"""Score images with a trained stage: a probability vector over the five labels for every row.

    python -m tools.score --checkpoint outputs/stage1/.../checkpoint-N --dataset outputs/data/test.jsonl \
        --output outputs/stage1/test_probs.csv [-- extra swift infer flags]

The model and template are prepared by swift itself (the checkpoint's args.json supplies model, template,
dtype and external plugins, exactly as `swift infer --adapters` does), so anything swift can load scores
the same way. Each batch costs one forward pass: the distribution of the first answer token, restricted to
the five labels' first tokens (distinct, checked) and renormalised. Rows are padded on the left, so the last
position is where the answer starts. Matches `swift infer --max_new_tokens 1 --logprobs` but never drops a
label outside the top-N.
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
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


def score_rows(model, template, label_ids: list[int], rows: list[dict], batch_size: int = 8,
               progress: bool = True) -> np.ndarray:
    """[len(rows), 5] probabilities; rows are swift JSONL rows (an assistant turn, if any, is ignored)."""
    import torch
    from swift.infer_engine import InferRequest
    from swift.utils import to_device

    out = np.zeros((len(rows), len(LABELS)), dtype=np.float64)
    index = torch.tensor(label_ids)
    with torch.inference_mode():
        for start in tqdm(range(0, len(rows), batch_size), desc="scoring", disable=not progress):
            chunk = rows[start:start + batch_size]
            encoded = [template.encode(InferRequest(messages=[m for m in r["messages"] if m["role"] != "assistant"],
                                                    images=r.get("images", []))) for r in chunk]
            inputs = to_device(template.data_collator(encoded), model.device)
            _, inputs = template.pre_forward_hook(model, None, inputs)
            inputs.pop("labels", None)
            logits = model(**inputs, logits_to_keep=1).logits[:, -1].float()
            label_logits = logits[:, index.to(logits.device)]
            out[start:start + len(chunk)] = torch.softmax(label_logits, -1).cpu().numpy()
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
    args = ap.parse_args(ours)
    if len(args.dataset) != len(args.output):
        ap.error("give one --output per --dataset")
    model, template, label_ids, _ = load(["--adapters", args.checkpoint, *swift_argv])  # loaded once for all
    for dataset, output in zip(args.dataset, args.output):
        start = time.time()
        rows = read_jsonl(dataset)
        probs = score_rows(model, template, label_ids, rows, args.batch_size)
        write_probs(output, [Path(r["images"][0]).name for r in rows], probs)
        print(f"scored {len(rows)} images in {time.time() - start:.1f} s ({len(rows) / (time.time() - start):.1f}"
              f" images/s) -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
