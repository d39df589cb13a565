"""Loss plugin (`--loss_type weighted_ce`): class-weighted cross-entropy with an optional focal term.

Each answer's tokens are weighted by its gold label's weight (default: the competition weights in
tools.task, 高风险 highest), so a mistake on a high-risk image costs more. Optional focal term:
loss = (1 - p)^γ · CE per token (or per sample for seq_cls), p = exp(-CE). With all weights 1 and γ = 0 it is
exactly swift's standard cross-entropy.

Knobs (environment, or swift's `--model_kwargs '{"FIRESAFE_CLASS_WEIGHTS": "3,1.5,1,1,1"}'`):
  FIRESAFE_CLASS_WEIGHTS   five numbers in LABELS order, or label=value pairs (default: tools.task weights)
  FIRESAFE_FOCAL_GAMMA     γ of the focal term (default 0 = plain weighted CE)

Generative answers (`--task_type causal_lm`): the class of an answer is read from its first supervised token
(the labels start with distinct tokens); tokens of an answer that is not a label keep weight 1. Works with
padding, packing and padding_free (answers are split at the end of each assistant turn). Normalised like
swift's cross_entropy: Σ weight · CE over supervised tokens / number of supervised tokens.
`--task_type seq_cls --num_labels 5`: weight per class index, Σ weight · CE / number of samples.
"""
from __future__ import annotations


import torch
import torch.nn.functional as F
from swift.loss import BaseLoss, loss_map
from swift.utils import get_logger

from swift_plugins._common import (AnswerTokens, class_weights_from_env, focal_gamma_from_env)
from tools.task import HIGH_RISK_INDEX, LABELS

logger = get_logger()


def focal(ce: torch.Tensor, gamma: float) -> torch.Tensor:
    """(1 - p)^γ · CE with p = exp(-CE): the focal loss of Lin et al.; γ = 0 returns CE unchanged."""
    if gamma == 0:
        return ce
    return (1 - torch.exp(-ce)).clamp(min=0).pow(gamma) * ce


class WeightedCrossEntropy(BaseLoss):

    def __init__(self, args, trainer):
        super().__init__(args, trainer)
        # Read here, not at import: swift applies --model_kwargs to the environment after importing plugins.
        self.class_weights = torch.tensor(class_weights_from_env(), dtype=torch.float32)
        self._weights_on: dict[torch.device, torch.Tensor] = {}
        self.gamma = focal_gamma_from_env()
        self.tokens = AnswerTokens(trainer.template.tokenizer)
        logger.info(f"weighted_ce: class weights {dict(zip(LABELS, self.class_weights.tolist()))}, "
                    f"focal gamma {self.gamma}")

    def class_weights_on(self, device: torch.device) -> torch.Tensor:
        """The class weights on `device`, copied once (a copy from the CPU each step makes the CPU wait)."""
        if device not in self._weights_on:
            self._weights_on[device] = self.class_weights.to(device)
        return self._weights_on[device]

    def __call__(self, outputs, labels, *, num_items_in_batch=None, loss_scale=None, **kwargs):
        if getattr(self.trainer.template, "sequence_parallel_size", 1) > 1:
            raise NotImplementedError("weighted_ce does not support sequence parallelism")
        if labels.dim() == 1:
            return self.classification_loss(outputs.logits, labels, num_items_in_batch)
        return self.generative_loss(outputs, labels, num_items_in_batch, loss_scale)

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """seq_cls: logits [B, C], labels [B] class indices (-100 = ignore); C = 5 (the five labels) or 2 (a binary
        specialist: 高风险 and 非高风险, weighted 高风险's weight and 1)."""
        if torch.is_floating_point(labels) or logits.shape[-1] not in (len(self.class_weights), 2):
            raise ValueError(f"weighted_ce with seq_cls needs single-label classification over {len(LABELS)} "
                             f"classes (--num_labels {len(LABELS)}) or 2; got logits {tuple(logits.shape)}")
        class_weights = self.class_weights
        if logits.shape[-1] == 2:
            class_weights = torch.stack([class_weights[HIGH_RISK_INDEX], torch.ones((), dtype=class_weights.dtype)])
        labels = labels.to(logits.device)
        valid = labels != -100
        ce = F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")
        weights = class_weights.to(logits.device)[labels.clamp(min=0)] * valid
        loss = (focal(ce, self.gamma) * weights).sum() / valid.sum().clamp(min=1)  # per-batch mean, as HF's
        # The trainer divides a custom loss by the accumulation steps only when the model takes loss kwargs;
        # otherwise do it here, as HF does for the model's own loss (num_items_in_batch would count 1-D seq_cls
        # labels as shifted tokens, so it is not used as the denominator).
        trainer = self.trainer
        if trainer.model.training and not (num_items_in_batch is not None and trainer.model_accepts_loss_kwargs):
            steps = getattr(trainer, "current_gradient_accumulation_steps", trainer.args.gradient_accumulation_steps)
            loss = loss / steps
        return loss

    def generative_loss(self, outputs, labels, num_items_in_batch, loss_scale) -> torch.Tensor:
        from swift.trainers import per_token_loss_func

        token_loss = focal(per_token_loss_func(outputs, labels), self.gamma)  # [B*T], predicts labels rolled by -1
        classes = self.tokens.position_classes(labels)
        # each position's class weight, 1 outside answers (element-wise: no boolean indexing, no CPU-GPU wait)
        weights = torch.where(classes >= 0, self.class_weights_on(classes.device)[classes.clamp(min=0)],
                              torch.ones((), dtype=torch.float32, device=classes.device))
        token_loss = token_loss * torch.roll(weights, shifts=-1, dims=-1).view(-1).to(token_loss.device)
        if loss_scale is not None:  # swift passes it rolled and flattened, like the per-token loss
            token_loss = token_loss * loss_scale
        if num_items_in_batch is None:
            num_items_in_batch = (labels[:, 1:] != -100).sum()
        return token_loss.sum() / num_items_in_batch


loss_map["weighted_ce"] = WeightedCrossEntropy
