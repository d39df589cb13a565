"""Shared by the loss and metric plugins: class weights from the environment, label tokens, answer spans."""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from tools.task import CLASS_WEIGHTS, LABEL_TO_INDEX, LABELS, label_token_ids

# Environment knobs (swift's `--model_kwargs '{"FIRESAFE_CLASS_WEIGHTS": "..."}'` sets them from the command
# line too, and records them in args.json).
ENV_CLASS_WEIGHTS = "FIRESAFE_CLASS_WEIGHTS"
ENV_FOCAL_GAMMA = "FIRESAFE_FOCAL_GAMMA"


def parse_class_weights(text: str | None) -> list[float]:
    """Loss weight per label, in LABELS order.

    Empty: the competition weights (tools.task.CLASS_WEIGHTS). Five numbers ("3,1.5,1,1,1"): one per label in
    LABELS order. "label=value" pairs ("高风险=3,非楼道=1.2"): those labels changed, the others kept.
    """
    weights = dict(CLASS_WEIGHTS)
    text = (text or "").strip()
    if text:
        parts = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
        if all("=" in p for p in parts):
            for part in parts:
                label, value = (s.strip() for s in part.split("=", 1))
                if label not in LABEL_TO_INDEX:
                    raise ValueError(f"{ENV_CLASS_WEIGHTS}: unknown label {label!r} (labels: {', '.join(LABELS)})")
                weights[label] = float(value)
        elif len(parts) == len(LABELS) and not any("=" in p for p in parts):
            weights = {label: float(v) for label, v in zip(LABELS, parts)}
        else:
            raise ValueError(f"{ENV_CLASS_WEIGHTS}={text!r}: give {len(LABELS)} numbers in the order "
                             f"{','.join(LABELS)} or label=value pairs")
    values = [weights[label] for label in LABELS]
    if any(v < 0 for v in values):
        raise ValueError(f"{ENV_CLASS_WEIGHTS}: weights must be >= 0, got {values}")
    return values


def class_weights_from_env() -> list[float]:
    return parse_class_weights(os.environ.get(ENV_CLASS_WEIGHTS))


def focal_gamma_from_env() -> float:
    gamma = float(os.environ.get(ENV_FOCAL_GAMMA) or 0.0)
    if gamma < 0:
        raise ValueError(f"{ENV_FOCAL_GAMMA} must be >= 0, got {gamma}")
    return gamma


class AnswerTokens:
    """The tokens that identify an answer: each label's first token, and the end of an assistant turn."""

    def __init__(self, tokenizer):
        self.label_ids = torch.tensor(label_token_ids(tokenizer), dtype=torch.long)
        self.im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.newline = tokenizer.encode("\n", add_special_tokens=False)[0]
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def label_ids_on(self, device: torch.device) -> torch.Tensor:
        """label_ids on `device`, copied once: a copy from the CPU on every call makes the CPU wait for the GPU."""
        if device not in self._on_device:
            self._on_device[device] = self.label_ids.to(device)
        return self._on_device[device]

    def class_of(self, tokens: torch.Tensor) -> torch.Tensor:
        """Label index of each token (its label's first token), -1 for any other token."""
        match = tokens.unsqueeze(-1) == self.label_ids_on(tokens.device)
        return torch.where(match.any(-1), match.long().argmax(-1), torch.full_like(tokens, -1))

    def position_classes(self, labels: torch.Tensor) -> torch.Tensor:
        """[B, T] label index of the answer each supervised position belongs to, -1 elsewhere.

        `labels` are swift's unshifted labels (-100 = not supervised). An answer is a run of supervised tokens:
        it starts after an unsupervised position or right after the end of the previous turn (<|im_end|>, then
        an optional newline), so answers packed into one row (packing, padding_free, or swift compacting a
        batch of one to its supervised tokens) are told apart. Its class is that of its first token.
        """
        sup = labels != -100
        is_end = labels == self.im_end
        next_is_newline = F.pad(labels[:, 1:] == self.newline, (0, 1), value=False)
        after_end = F.pad(is_end[:, :-1], (1, 0), value=False)
        turn_last = (is_end & ~next_is_newline) | (after_end & (labels == self.newline))
        prev_sup = F.pad(sup[:, :-1], (1, 0), value=False)
        prev_turn_last = F.pad(turn_last[:, :-1], (1, 0), value=False)
        start = sup & (~prev_sup | prev_turn_last)

        # Each supervised position takes the class of the latest answer start at or before it (rows never share
        # one: a row's first supervised token starts an answer). Element-wise and a running maximum only, no
        # boolean indexing, so the CPU never waits for the GPU here.
        flat, flat_start, flat_sup = labels.flatten(), start.flatten(), sup.flatten()
        positions = torch.arange(flat.numel(), device=flat.device)
        last_start = torch.where(flat_start, positions, torch.full_like(positions, -1)).cummax(0).values
        out = torch.where(flat_sup & (last_start >= 0), self.class_of(flat)[last_start.clamp(min=0)],
                          torch.full_like(flat, -1))
        return out.view_as(labels)

    def first_answer(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(position of each row's first supervised token, its label index or -1); -1, -1 for a row without one."""
        sup = labels != -100
        has = sup.any(-1)
        first = sup.long().argmax(-1)
        token = labels.gather(-1, first.unsqueeze(-1)).squeeze(-1)
        cls = torch.where(has, self.class_of(token), torch.full_like(token, -1))
        return torch.where(has, first, torch.full_like(first, -1)), cls
