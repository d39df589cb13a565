"""The task, in one place: labels, their order, competition weights, the prompt, and every file's path.

Scripts, plugins and tests ask this module instead of spelling a label or a path. Scripts ask for paths with

    python -m tools.task --output-dir outputs run_dir stage1 final      # prints <outputs>/stage1
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Order matters: it is the column order of every probability vector, CSV and confusion matrix.
LABELS: tuple[str, ...] = ("高风险", "中风险", "低风险", "无风险", "非楼道")
HIGH_RISK = "高风险"
MEDIUM_RISK = "中风险"
LABEL_TO_INDEX = {label: i for i, label in enumerate(LABELS)}
HIGH_RISK_INDEX = LABEL_TO_INDEX[HIGH_RISK]

# Competition score = sum over classes of weight * F1 (max 6.5).
CLASS_WEIGHTS: dict[str, float] = {"高风险": 2.0, "中风险": 1.5, "低风险": 1.0, "无风险": 1.0, "非楼道": 1.0}
MAX_SCORE = sum(CLASS_WEIGHTS.values())

# What each label means; the prompt is built from it so definitions and labels cannot drift apart.
LABEL_DEFINITIONS: dict[str, str] = {
    "高风险": "有电动车、电池或飞线充电",
    "中风险": "大量杂物或可燃物堆积、堵塞通道",
    "低风险": "少量物品整齐摆放在一侧",
    "无风险": "楼道干净无杂物",
    "非楼道": "图片不是楼道",
}
PROMPT = (
    "请判断图中楼道的消防隐患等级，只回答以下五个标签之一："
    + "；".join(f"{label}（{LABEL_DEFINITIONS[label]}）" for label in LABELS)
    + "。"
)
IMAGE_TAG = "<image>"  # swift's placeholder: one per image in the user turn.
# The specialist's other target (STAGE2_TARGET=binary): 高风险 or not. Its first tokens (高, 非) differ as well.
NOT_HIGH_RISK = "非高风险"
BINARY_LABELS: tuple[str, ...] = (HIGH_RISK, NOT_HIGH_RISK)
BINARY_PROMPT = (f"请判断图中楼道是否有高风险消防隐患（{LABEL_DEFINITIONS[HIGH_RISK]}），只回答以下两个标签之一："
                 f"{HIGH_RISK}；{NOT_HIGH_RISK}。")
TARGETS = {"five": (LABELS, PROMPT), "binary": (BINARY_LABELS, BINARY_PROMPT)}  # a stage's answers and prompt


def answer_for(label: str, target: str) -> str:
    """What a stage with `target` answers for an image of `label` (binary: 高风险 or 非高风险)."""
    if target == "five":
        return label
    return HIGH_RISK if label == HIGH_RISK else NOT_HIGH_RISK
# The answer is the bare label. The five labels start with distinct characters, so the first answer token
# alone identifies the label (checked against the tokenizer by label_token_ids).

# Official layout inside DATA_DIR (each path can be overridden on the command line).
TRAIN_LIST = "train.txt"
TRAIN_IMAGES = "train"
TEST_LIST = "B.txt"
TEST_IMAGES = "B"
SUBMISSION = "b-submit.txt"

STAGES = ("stage1", "stage2")
FINAL = "final"  # the run whose models test.sh submits; the other runs are folds 0..k-1 (FOLDS > 1)
POINTER = "final_checkpoint.txt"  # in a run folder: the checkpoint train.sh chose, the one test.sh uses
TRAINED_ON = "trained_on.json"  # in a run folder: the data fingerprint the run trained on


def label_token_ids(tokenizer, labels: tuple[str, ...] = LABELS) -> list[int]:
    """The first token of each label; they must differ, or one forward pass could not tell them apart."""
    ids = [tokenizer.encode(label, add_special_tokens=False)[0] for label in labels]
    if len(set(ids)) != len(ids):
        raise ValueError(f"labels share a first token under this tokenizer: {dict(zip(labels, ids))}")
    return ids


TASKS = ("causal_lm", "seq_cls")  # swift's --task_type: the answer's first token, or a classification head


def _task_suffix(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    return "" if task == "causal_lm" else f".{task}"


def probs_record_of(csv: str | Path) -> Path:
    """What produced a probability CSV (checkpoint, rows, arguments): a finished CSV whose record matches is kept."""
    return Path(csv).with_suffix(".json")


def probs_partial_of(csv: str | Path) -> Path:
    """The rows of a probability CSV scored so far: an interrupted test.sh continues from them."""
    return Path(csv).with_suffix(".partial.csv")


class Layout:
    """Every file the pipeline writes, relative to one output directory, grouped by the step that writes it.

    `run` is FINAL (the models test.sh submits) or a fold number (FOLDS > 1: a model pair trained without
    that fold of the training split, which predicts it for tuning fusion)."""

    def __init__(self, output_dir: str | Path):
        self.root = Path(output_dir).resolve()

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    # ------------------------------------------------------------------ prepare (tools.data.prepare)
    @property
    def split_dir(self) -> Path:
        return self.data_dir / "split"

    @property
    def split_record(self) -> Path:  # inputs, seed, ratios and counts of the split
        return self.split_dir / "split.json"

    @property
    def train_split(self) -> Path:  # the training part of the split, <image>\t<label>: augmentation's input
        return self.split_dir / "train.txt"

    @property
    def val_list(self) -> Path:  # the held-out part, <image>\t<label>: checkpoint choice and fusion tuning
        return self.split_dir / "val.txt"

    @property
    def test_list(self) -> Path:  # the checked test list, in its order (<image> or <image>\t<label>)
        return self.split_dir / "test.txt"

    def fold_list(self, fold: int) -> Path:  # fold i's images, <image>\t<label> (FOLDS > 1)
        return self.split_dir / "folds" / f"{int(fold)}.txt"

    def prepared_images(self, part: str) -> Path:  # upright RGB copies at the model's size: train (and val), test
        if part not in ("train", "test"):
            raise ValueError(f"part must be train or test, got {part!r}")
        return self.data_dir / "images" / part

    # ------------------------------------------------------------------ augment (tools.augment.run)
    @property
    def augmented_dir(self) -> Path:
        return self.data_dir / "augmented"

    @property
    def augmented_images(self) -> Path:  # the kept copies
        return self.augmented_dir / "images"

    @property
    def augmented_dropped(self) -> Path:  # copies the consistency filter dropped, for inspection
        return self.augmented_dir / "dropped"

    @property
    def augmented_list(self) -> Path:  # the kept copies, <image>\t<label>
        return self.augmented_dir / "augmented.txt"

    @property
    def augmented_index(self) -> Path:  # every copy with its source image and transforms
        return self.augmented_dir / "index.tsv"

    @property
    def augment_report(self) -> Path:
        return self.augmented_dir / "report.json"

    @property
    def contact_sheet(self) -> Path:
        return self.augmented_dir / "contact_sheet.png"

    # ------------------------------------------------------------------ compose (tools.compose.stage_sets)
    def train_jsonl(self, stage: str, run: str | int = FINAL, task: str = "causal_lm") -> Path:
        """The stage's training rows: answers as text (causal_lm) or class indices for a head (seq_cls)."""
        return self._data_run(run) / f"{stage}_train{_task_suffix(task)}.jsonl"

    def val_jsonl(self, stage: str, task: str = "causal_lm") -> Path:
        return self.data_dir / f"{stage}_val{_task_suffix(task)}.jsonl"

    @property
    def test_jsonl(self) -> Path:
        return self.data_dir / "test.jsonl"

    def heldout_jsonl(self, fold: int) -> Path:  # fold i's images as labelled rows, scored by fold i's models
        return self._data_run(fold) / "heldout.jsonl"

    @property
    def manifest(self) -> Path:  # what data-pre.sh prepared, its settings, fingerprint and file digests; last written
        return self.data_dir / "manifest.json"


    def _data_run(self, run: str | int) -> Path:
        return self.data_dir if str(run) == FINAL else self.data_dir / "folds" / str(int(run))

    # ------------------------------------------------------------------ train (train.sh, tools.model.checkpoint)
    def run_dir(self, stage: str, run: str | int = FINAL) -> Path:  # the finished run: checkpoint, pointer
        return self.root / stage if str(run) == FINAL else self.folds_dir / str(int(run)) / stage

    def run_work_dir(self, stage: str, run: str | int = FINAL) -> Path:
        """swift --output_dir while a run trains (RESUME=1 continues it); it replaces run_dir only when it holds
        a checkpoint, so a failed or interrupted run never costs the previous model."""
        run_dir = self.run_dir(stage, run)
        return run_dir.with_name(run_dir.name + ".training")

    # ------------------------------------------------------------------ hard negatives (tools.model.hard_negatives)
    def hard_negatives_dir(self, run: str | int = FINAL) -> Path:  # stage 1's confusions, mined for stage 2's set
        return (self.root if str(run) == FINAL else self.folds_dir / str(int(run))) / "hard_negatives"

    def hard_negative_candidates(self, run: str | int = FINAL) -> Path:  # the run's non-高风险 training images
        return self.hard_negatives_dir(run) / "candidates.jsonl"

    def hard_negative_probs(self, run: str | int = FINAL) -> Path:  # stage 1's probabilities for them
        return self.hard_negatives_dir(run) / "candidates_probs.csv"

    def hard_negative_record(self, run: str | int = FINAL) -> Path:  # settings, the picked images, their p(高风险)
        return self.hard_negatives_dir(run) / "hard_negatives.json"

    def hard_negative_train_jsonl(self, run: str | int = FINAL, task: str = "causal_lm") -> Path:
        """Stage 2's training rows with the hard negatives added: what train.sh gives swift when HARD_NEGATIVES > 0."""
        return self.hard_negatives_dir(run) / f"stage2_train{_task_suffix(task)}.jsonl"

    def trained_on(self, stage: str, run: str | int = FINAL) -> Path:  # the data fingerprint the run trained on
        return self.run_dir(stage, run) / TRAINED_ON

    def checkpoint_pointer(self, stage: str, run: str | int = FINAL) -> Path:
        return self.run_dir(stage, run) / POINTER

    # ------------------------------------------------------------------ score (tools.model.score)
    def probs(self, stage: str, part: str, run: str | int = FINAL) -> Path:
        """A stage's five-label probabilities of one part: test, val (final run) or heldout (a fold's run)."""
        if part not in ("test", "val", "heldout"):
            raise ValueError(f"part must be test, val or heldout, got {part!r}")
        return self.run_dir(stage, run) / f"{part}_probs.csv"

    def probs_record(self, stage: str, part: str, run: str | int = FINAL) -> Path:
        return probs_record_of(self.probs(stage, part, run))

    def probs_partial(self, stage: str, part: str, run: str | int = FINAL) -> Path:
        return probs_partial_of(self.probs(stage, part, run))

    # ------------------------------------------------------------------ decide (tools.decide.*)
    @property
    def folds_dir(self) -> Path:  # the fold runs and their pooled predictions
        return self.root / "folds"

    def oof_probs(self, stage: str) -> Path:  # every fold's held-out rows, then the validation split's
        return self.folds_dir / f"oof_{stage}.csv"

    @property
    def oof_gold(self) -> Path:  # <image>\t<label> for the rows of oof_probs
        return self.folds_dir / "oof_gold.txt"

    @property
    def fusion_params(self) -> Path:
        return self.root / "fusion.json"

    @property
    def submission(self) -> Path:
        return self.root / SUBMISSION

    @property
    def probabilities(self) -> Path:  # both stages' vectors, the fused one and the label, per test image
        return self.root / "probabilities.csv"

    # ------------------------------------------------------------------ the scripts (tools/common.sh)
    @property
    def lock_file(self) -> Path:  # held (flock) by the script using this output folder
        return self.root / ".lock"

    @property
    def lock_owner(self) -> Path:  # which script holds the lock, for the message
        return self.root / ".lock.owner"

    # ------------------------------------------------------------------ report (tools.report.report)
    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def confusion_png(self) -> Path:
        return self.root / "confusion.png"

    @property
    def reliability_png(self) -> Path:
        return self.root / "reliability.png"


def user_message(prompt: str = PROMPT) -> dict:
    return {"role": "user", "content": IMAGE_TAG + prompt}


def sft_row(image_path: str | Path, answer: str | None, prompt: str = PROMPT) -> dict:
    """One swift JSONL row; without an answer it is an inference row (no assistant turn). The image path is made
    absolute without following symlinks: the file name stays the one the list gives (rows are named by it)."""
    messages = [user_message(prompt)]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return {"messages": messages, "images": [os.path.abspath(image_path)]}


def cls_row(image_path: str | Path, label_index: int, prompt: str = PROMPT) -> dict:
    """One swift JSONL row for --task_type seq_cls: the question only, and the class index as `label`."""
    return {"messages": [user_message(prompt)], "images": [os.path.abspath(image_path)], "label": int(label_index)}


def labelled_rows(samples, target: str = "five", task: str = "causal_lm") -> list[dict]:
    """swift rows, one per sample (anything with .path and .label): the answer for the stage's target (five labels,
    or 高风险 vs 非高风险) as text (causal_lm) or as the class index for a head (seq_cls), with its prompt."""
    labels, prompt = TARGETS[target]
    if task == "seq_cls":
        return [cls_row(s.path, labels.index(answer_for(s.label, target)), prompt) for s in samples]
    return [sft_row(s.path, answer_for(s.label, target), prompt) for s in samples]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tools.task", description="Print one path of the output layout.",
                                 epilog="NAME is a Layout attribute (run_dir, train_jsonl, probs, ...); ARGS are "
                                        "its arguments, e.g. `run_dir stage1 0` for fold 0's stage-1 run.")
    ap.add_argument("--output-dir", default="outputs", help="pipeline output folder (default: %(default)s)")
    ap.add_argument("name", help="a Layout attribute")
    ap.add_argument("args", nargs="*", help="its arguments")
    args = ap.parse_args(argv)
    layout = Layout(args.output_dir)
    attr = getattr(type(layout), args.name, None) if not args.name.startswith("_") else None
    if attr is None:
        ap.error(f"no path named {args.name!r}")
    value = getattr(layout, args.name)
    try:
        path = value(*args.args) if callable(value) else value
    except (TypeError, ValueError) as e:
        ap.error(f"{args.name}: {e}")
    if args.args and not callable(value):
        ap.error(f"{args.name} takes no arguments")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
