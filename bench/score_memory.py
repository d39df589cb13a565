"""Where scoring's GPU memory peaks, batch by batch: one stage of test.sh's scoring on a rehearsal's test split,
as tools.model.infer.score_jobs runs it, with each forward pass's peak recorded.

    python bench/score_memory.py --work /tmp/rh --stage stage1 [--part test] [--batch-size 8] [--cap-gib 22] [--out DIR]

Run after bench/rehearsal.py has prepared and trained (its --work). For every batch: the language model's input
shape (rows x tokens), whether a row is padded, whether it ran through the compiled decoder layers or eagerly,
and torch's peak allocated and reserved GiB during that forward pass (reset before each). Prints one row per
kind of batch (tokens, padded, compiled) with its largest peaks, then the five batches with the largest
allocated peak (with --cap-gib, within that much memory, as on a smaller card, or it stops out of memory); writes
score_memory.<stage>.json under --out. What fits a card is the allocated peak; the reserved one (what nvidia-smi
shows) adds the caching allocator's free blocks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a bench script, run by path: the project's own modules

from tools.fileio import read_jsonl  # noqa: E402
from tools.model.checkpoint import read_pointer  # noqa: E402
from tools.task import FINAL, STAGES, Layout  # noqa: E402

GIB = 1024 ** 3


def summary(batches: list[dict]) -> list[dict]:
    """One row per kind of batch (tokens, padded, compiled): how many, and their largest peaks."""
    kinds = defaultdict(list)
    for b in batches:
        kinds[(b["tokens"], b["padded"], b["compiled"])].append(b)
    return [{"tokens": t, "padded": p, "compiled": c, "batches": len(bs),
             "max_allocated_gib": max(b["allocated_gib"] for b in bs),
             "max_reserved_gib": max(b["reserved_gib"] for b in bs)}
            for (t, p, c), bs in sorted(kinds.items())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="bench/rehearsal.py's --work (prepared and trained)")
    ap.add_argument("--stage", choices=STAGES, default=STAGES[0])
    ap.add_argument("--part", choices=("test", "val"), default="test")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-pixels", default="1003520")
    ap.add_argument("--cap-gib", type=float, help="limit the caching allocator to this many GiB, as a smaller card "
                    "would (torch.cuda.set_per_process_memory_fraction); a 24 GB card leaves ~22 GiB after CUDA's "
                    "context")
    ap.add_argument("--out", type=Path, default=Path("."))
    a = ap.parse_args(argv)

    os.environ["MAX_PIXELS"] = a.max_pixels  # as test.sh exports it: bucketing and the encoder see one size
    import torch

    from tools.model import infer
    from tools.model.speedups import has_compiled_layers

    if a.cap_gib:
        torch.cuda.set_per_process_memory_fraction(a.cap_gib * GIB / torch.cuda.get_device_properties(0).total_memory)
    layout = Layout(a.work / "outputs")
    checkpoint = read_pointer(layout.run_dir(a.stage, FINAL))
    rows = read_jsonl(layout.test_jsonl if a.part == "test" else layout.val_jsonl(a.stage))
    info = infer.model_of(checkpoint)
    infer.choose_compile(len(rows))
    start = time.time()
    model, template, label_ids, _ = infer.load(["--adapters", str(checkpoint), "--max_pixels", a.max_pixels],
                                               labels=tuple(info["labels"]))
    allocated, reserved = infer.gpu_peak_gib() or (0.0, 0.0)  # without CUDA (a logic check on the CPU) they read 0
    loaded = {"seconds": round(time.time() - start, 1), "allocated_gib": allocated, "reserved_gib": reserved}
    batches = []
    forward = infer.forward_probs
    cuda = torch.cuda.is_available()

    def recorded(model, template, batch, label_ids):
        if cuda:
            torch.cuda.synchronize()  # the previous batch's work counted in its own peak
        infer.reset_gpu_peak()
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        compiled = has_compiled_layers(model)  # eager_layers sets the compiled calls aside
        out = forward(model, template, batch, label_ids)
        if cuda:
            torch.cuda.synchronize()
        allocated, reserved = infer.gpu_peak_gib() or (0.0, 0.0)
        batches.append({"rows": int(ids.shape[0]), "tokens": int(ids.shape[1]),
                        "padded": bool(mask is not None and not bool(mask.bool().all())), "compiled": compiled,
                        "allocated_gib": round(allocated, 2), "reserved_gib": round(reserved, 2)})
        return out

    infer.forward_probs = recorded
    start = time.time()
    infer.score_rows(model, template, label_ids, rows, a.batch_size, prompt=info["prompt"],
                     n_labels=len(info["labels"]))
    seconds = time.time() - start
    kinds = summary(batches)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / f"score_memory.{a.stage}.json").write_text(json.dumps(
        {"stage": a.stage, "part": a.part, "images": len(rows), "cap_gib": a.cap_gib, "load": loaded,
         "seconds": round(seconds, 1), "kinds": kinds, "batches": batches}, indent=1))
    cap = f" within a {a.cap_gib:g} GiB cap" if a.cap_gib else ""
    print(f"{a.stage} {a.part}: {len(rows)} images in {seconds:.1f} s{cap}; after load: peak "
          f"{loaded['allocated_gib']:.2f} GiB allocated, {loaded['reserved_gib']:.2f} reserved")
    print("| tokens | padded | compiled | batches | max allocated GiB | max reserved GiB |\n"
          "|---:|---|---|---:|---:|---:|")
    for k in kinds:
        print(f"| {k['tokens']} | {k['padded']} | {k['compiled']} | {k['batches']} | {k['max_allocated_gib']:.2f} "
              f"| {k['max_reserved_gib']:.2f} |")
    for i, b in sorted(enumerate(batches), key=lambda ib: -ib[1]["allocated_gib"])[:5]:
        print(f"batch {i}: {b}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
