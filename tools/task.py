"""The task, in one place: labels, their order, competition weights, the prompt, file layout.

Scripts, plugins and tests import this module; nothing else spells a label or a path.
"""
from __future__ import annotations

import json
from pathlib import Path

# Order matters: it is the column order of every probability vector, CSV and confusion matrix.
LABELS: tuple[str, ...] = ("高风险", "中风险", "低风险", "无风险", "非楼道")
HIGH_RISK = "高风险"
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
# The answer is the bare label. The five labels start with distinct characters, so the first answer token
# alone identifies the label (checked against the tokenizer in tools.scoring.label_token_ids).

# Official layout inside DATA_DIR (each path can be overridden on the command line).
TRAIN_LIST = "train.txt"
TRAIN_IMAGES = "train"
TEST_LIST = "B.txt"
TEST_IMAGES = "B"
SUBMISSION = "b-submit.txt"

# Layout inside OUTPUT_DIR, shared by data-pre.sh, train.sh and test.sh.
STAGES = ("stage1", "stage2")


class Layout:
    """Every file the pipeline writes, relative to one output directory."""

    def __init__(self, output_dir: str | Path):
        self.root = Path(output_dir).resolve()

    @property
    def data_dir(self) -> Path:  # JSONL written by data-pre.sh
        return self.root / "data"

    def train_jsonl(self, stage: str) -> Path:
        return self.data_dir / f"{stage}_train.jsonl"

    def val_jsonl(self, stage: str) -> Path:
        return self.data_dir / f"{stage}_val.jsonl"

    @property
    def val_list(self) -> Path:  # the held-out split as name<TAB>label, for tuning fusion
        return self.data_dir / "val.txt"

    @property
    def test_jsonl(self) -> Path:
        return self.data_dir / "test.jsonl"

    @property
    def pipeline_env(self) -> Path:  # recipe and model paths chosen by data-pre.sh, sourced by the others
        return self.root / "pipeline.env"

    @property
    def manifest(self) -> Path:  # where data-pre.sh records its inputs, for train.sh/test.sh
        return self.data_dir / "manifest.json"

    def run_dir(self, stage: str) -> Path:  # swift --output_dir
        return self.root / stage

    def checkpoint_pointer(self, stage: str) -> Path:  # written by train.sh, read by test.sh
        return self.root / stage / "final_checkpoint.txt"

    @property
    def submission(self) -> Path:
        return self.root / SUBMISSION

    @property
    def probabilities(self) -> Path:
        return self.root / "probabilities.csv"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def fusion_params(self) -> Path:
        return self.root / "fusion.json"

    # k-fold out-of-fold predictions (FOLDS > 1): fold i trains on the other folds of the training split and
    # predicts its own held-out images; the final models above still train on the whole training split.
    @property
    def folds_data_dir(self) -> Path:  # the fold sets written by data-pre.sh
        return self.data_dir / "folds"

    def fold_train_jsonl(self, fold: int, stage: str) -> Path:
        return self.folds_data_dir / str(fold) / f"{stage}_train.jsonl"

    def fold_heldout_jsonl(self, fold: int) -> Path:  # fold i's images, labelled rows, scored by test.sh
        return self.folds_data_dir / str(fold) / "heldout.jsonl"

    def fold_heldout_list(self, fold: int) -> Path:  # the same images as name<TAB>label
        return self.folds_data_dir / str(fold) / "heldout.txt"

    @property
    def folds_dir(self) -> Path:  # the fold runs (train.sh) and their predictions (test.sh)
        return self.root / "folds"

    def fold_run_dir(self, fold: int, stage: str) -> Path:  # swift --output_dir of fold i's stage
        return self.folds_dir / str(fold) / stage

    def fold_heldout_probs(self, fold: int, stage: str) -> Path:  # fold i's stage on fold i's held-out images
        return self.fold_run_dir(fold, stage) / "heldout_probs.csv"

    def oof_probs(self, stage: str) -> Path:  # every fold's held-out rows, then the validation split's
        return self.folds_dir / f"oof_{stage}.csv"

    @property
    def oof_gold(self) -> Path:  # name<TAB>label for the rows of oof_probs
        return self.folds_dir / "oof_gold.txt"


def user_message() -> dict:
    return {"role": "user", "content": IMAGE_TAG + PROMPT}


def sft_row(image_path: str | Path, label: str | None) -> dict:
    """One swift JSONL row; without a label it is an inference row (no assistant turn)."""
    messages = [user_message()]
    if label is not None:
        messages.append({"role": "assistant", "content": label})
    return {"messages": messages, "images": [str(Path(image_path).resolve())]}


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
