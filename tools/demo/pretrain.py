"""Pre-training of the demo's tiny base models: generic tasks on images drawn apart from the risk data, and the
training loop.

A LoRA on a *random* tiny model cannot learn the task (README, "The demo"), so each base model is first trained
here with full fine-tuning, vision tower included: describing images (the scene, the objects on the floor, notable
ones first, and how many), answering multiple-choice questions about them, and copying words from the prompt.
No image is ever paired with a risk label.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm import tqdm

from tools.demo import scenes
from tools.demo.data import IMAGE_SIZE, encode_jpeg, image_seed, pool_map
from tools.demo.models import QWEN_SPECIAL_TOKENS, TinySpec
from tools.task import LABELS

# --------------------------------------------------------------------------- pre-training captions
# A generic description of every image, slot by slot (scene; is there an e-bike, a battery, a charging cable;
# how much stands on the floor), so each image supervises every visual attribute at once. Answers are
# balanced: a skewed slot is learned as a prior, not from the image. The risk labels never appear.
PRETRAIN_PROMPT = "描述图中的场景和地面上的物品。"
COUNT_ANSWERS = (("没有", (0, 0)), ("一两件", (1, 2)), ("很多", (5, 9)))
PRESENCE_SLOTS = ("ebike", "battery", "cable")


def pretrain_example(rng: np.random.Generator, size: int = IMAGE_SIZE):
    """An image with random content and its slot caption."""
    r = rng.random()
    present = dict.fromkeys(PRESENCE_SLOTS, False)
    count_word = "没有"
    if r < 0.2:
        kind, scene = "outdoor", scenes.outdoor_scene(rng, size, size)
    elif r < 0.4:
        kind, scene = "room", scenes.room_scene(rng, size, size)
    else:
        kind = "corridor"
        count_word, (lo, hi) = COUNT_ANSWERS[int(rng.integers(len(COUNT_ANSWERS)))]
        n = int(rng.integers(lo, hi + 1))
        hazards = [h for h in scenes.HAZARDS if rng.random() < 0.5][:n]
        pool = list(scenes.CLUTTER + scenes.TIDY)
        objects = [(h, "any") for h in hazards]
        objects += [(str(rng.choice(pool)), "any" if rng.random() < 0.5 else "side") for _ in range(n - len(hazards))]
        scene = scenes.corridor_scene(rng, size, size, objects, cable=bool(hazards) and rng.random() < 0.5)
        for name in scene.objects:
            present[name] = True
    caption = f"场景：{scenes.SCENE_NAMES[kind]}；" + "；".join(
        f"{scenes.OBJECT_NAMES[slot]}：{'有' if present[slot] else '没有'}" for slot in PRESENCE_SLOTS
    ) + f"；物品：{count_word}"
    return scenes.finish(rng, scene.image), PRETRAIN_PROMPT, caption, describe(kind, scene.objects, count_word)


# The same content as one sentence, the notable things first, as a person (or a real VLM) names them: what is
# out of place before the rest. Its first word depends on the whole image, so the answer position learns to
# gather everything the image shows; the slot caption starts with a fixed word and never needs that.
DESCRIBE_PROMPT = "图中有哪些值得注意的东西？"
NON_CORRIDOR_DESCRIPTIONS = {"outdoor": "户外的街道", "room": "家里的房间"}


def describe(kind: str, objects: list[str], count_word: str) -> str:
    if kind != "corridor":
        return NON_CORRIDOR_DESCRIPTIONS[kind]
    notable = [scenes.OBJECT_NAMES[s] for s in PRESENCE_SLOTS if s in objects]
    rest = list(dict.fromkeys(scenes.OBJECT_NAMES[o] for o in objects if o not in PRESENCE_SLOTS))
    items = f"{'很多' if count_word == '很多' else '一两件'}物品：{'、'.join(rest)}" if rest else ""
    if not notable:
        return items or "空的走廊"
    return "、".join(notable) + (f"，还有{items}" if items else "")


# Language, as a real base model has it: pick the k-th word of a list written in the prompt. It keeps the
# output rows of common words alive (a word never produced in pre-training is nearly unreachable for a
# LoRA later) and teaches answering with a word the prompt offers. The image is irrelevant to the answer.
COPY_WORDS = (
    "高风险", "中风险", "低风险", "无风险", "非楼道", "高楼", "中间", "低温", "无线", "非常", "风险", "楼道",
    "安全", "消防", "电梯", "门口", "窗户", "灯光", "地面", "墙壁", "天空", "树木", "汽车", "房间", "桌子",
    "书本", "水杯", "手机", "钥匙", "雨伞", "衣服", "道路", "高速", "中心", "低头", "无人", "非法", "楼梯",
)
COPY_SHARE = 0.2
CHOICE_SHARE = 0.4
DESCRIBE_SHARE = 0.3  # the rest (0.1) is the slot caption
# Half of the copy answers are the label words. A tiny model trains an output row only when that token is
# an answer; untrained, the label words' rows stay short (measured: norm 0.4 against 1.0 for the choice
# answers) and a LoRA cannot lift them over the words pre-training did produce. A real LM has every row
# trained. The copy task never shows the label words with an image they describe.
COPY_LABEL_SHARE = 0.5


def copy_example(rng: np.random.Generator) -> tuple[str, str]:
    words = [COPY_WORDS[i] for i in rng.permutation(len(COPY_WORDS))[:5]]
    if rng.random() < COPY_LABEL_SHARE and not set(words) & set(LABELS):
        words[int(rng.integers(len(words)))] = LABELS[int(rng.integers(len(LABELS)))]
    labelled = [i for i, w in enumerate(words) if w in LABELS]
    k = int(rng.choice(labelled)) if labelled and rng.random() < COPY_LABEL_SHARE else int(rng.integers(len(words)))
    return f"词语：{'、'.join(words)}。请写出第{k + 1}个词语。", words[k]


CHOICE_DEFINITIONS = {  # option (definition), in the style of the task prompt
    "场景": {"走廊": "室内的公共通道", "户外": "室外的街道或空地", "房间": "家里的房间"},
    "物品": {"没有": "地面上什么也没有", "一两件": "只有一两件东西", "很多": "堆了很多东西"},
    "presence": {"有": "图中能看到", "没有": "图中看不到"},
}


def choice_example(rng: np.random.Generator, caption: str) -> tuple[str, str]:
    """A multiple-choice question about one slot of the caption: the options, each with a definition in
    brackets, are listed in the prompt in random order (the format of the task prompt, about other things)."""
    slots = dict(part.split("：", 1) for part in caption.split("；"))
    slot = list(slots)[int(rng.integers(len(slots)))]
    definitions = CHOICE_DEFINITIONS.get(slot, CHOICE_DEFINITIONS["presence"])
    options = [list(definitions)[i] for i in rng.permutation(len(definitions))]
    question = {"场景": "请判断图中的场景", "物品": "请判断地面上的物品数量"}.get(slot, f"请判断图中是否有{slot}")
    listed = "；".join(f"{o}（{definitions[o]}）" for o in options)
    return f"{question}，只回答以下选项之一：{listed}。", slots[slot]


def _render_pretrain(job: tuple[int, int, str]) -> dict:
    seed, index, folder = job
    rng = np.random.default_rng(image_seed(seed, "pretrain", index))
    img, q, a, description = pretrain_example(rng)
    r = rng.random()
    if r < COPY_SHARE:
        q, a = copy_example(rng)
    elif r < COPY_SHARE + CHOICE_SHARE:
        q, a = choice_example(rng, a)
    elif r < COPY_SHARE + CHOICE_SHARE + DESCRIBE_SHARE:
        q, a = DESCRIBE_PROMPT, description
    path = Path(folder) / f"{index:05d}.jpg"
    path.write_bytes(encode_jpeg(img))
    return {"messages": [{"role": "user", "content": "<image>" + q}, {"role": "assistant", "content": a}],
            "images": [str(path.resolve())]}


def _chat_text(processor, question: str, answer: str | None) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    if answer is None:
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    messages.append({"role": "assistant", "content": answer})
    return processor.apply_chat_template(messages, tokenize=False)


def encode_batch(processor, rows: list[dict], max_pixels: int):
    """Tokenise rows of the swift JSONL format; labels supervise the answer, <|im_end|> and the "\\n" after it."""
    import torch
    from PIL import Image

    texts, images = [], []
    for row in rows:
        question = row["messages"][0]["content"].replace("<image>", "")
        texts.append(_chat_text(processor, question, row["messages"][1]["content"]))
        with Image.open(row["images"][0]) as img:
            images.append(img.convert("RGB"))
    processor.tokenizer.padding_side = "right"
    batch = processor(text=texts, images=images, return_tensors="pt", padding=True,
                      images_kwargs={"max_pixels": max_pixels, "min_pixels": 3136})
    ids = batch["input_ids"]
    labels = torch.full_like(ids, -100)
    im_start = QWEN_SPECIAL_TOKENS["<|im_start|>"]
    for i in range(ids.shape[0]):
        starts = (ids[i] == im_start).nonzero().flatten()
        answer_from = int(starts[-1]) + 3  # skip "<|im_start|>", "assistant", "\n"
        n = int(batch["attention_mask"][i].sum())
        labels[i, answer_from:n] = ids[i, answer_from:n]  # answer, <|im_end|> and its "\n", as swift does
    batch["labels"] = labels
    return batch


def supervised_loss(model, batch):
    """Cross-entropy on the supervised tokens only: the 152k-way output layer runs on a few positions."""
    import torch.nn.functional as F

    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.model(**inputs).last_hidden_state
    target = labels[:, 1:]
    keep = target != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), target[keep]), logits.argmax(-1) == target[keep]


# The vision tower learns from scratch at a quarter of the language model's rate (measured on stage 1, 300 steps:
# at 2e-3 its outputs grew to norm ~70 against ~1 for the text embeddings and the answer never depended on the
# objects; at 5e-4 a first answer word names the e-bike, and a LoRA on top reaches weighted F1 3.0 in 400 steps).
PRETRAIN_LR = 2e-3
PRETRAIN_VISION_LR = 5e-4
VISION_PREFIXES = ("model.visual.", "visual.")


def pretrain_model(model_dir: Path, work_dir: Path, spec: TinySpec, seed: int, workers: int) -> dict:
    """Full fine-tuning (vision tower included) of the random model on generated captioned images.

    A plain loop rather than `swift sft`: batches are encoded once and the output layer runs only on the
    answer tokens, which makes this several times faster on CPU. Held-out accuracy is recorded."""
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    images = work_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    n_eval = 200
    rows = pool_map(_render_pretrain, [(seed, i, str(images)) for i in range(spec.pretrain_samples + n_eval)],
                     workers, "pre-training images")
    train_rows, eval_rows = rows[:-n_eval], rows[-n_eval:]
    torch.manual_seed(seed)
    torch.set_num_threads(workers)
    processor = AutoProcessor.from_pretrained(model_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    batch_size, max_pixels = 16, IMAGE_SIZE * IMAGE_SIZE
    batches = [encode_batch(processor, train_rows[i:i + batch_size], max_pixels)
               for i in range(0, len(train_rows), batch_size)]
    steps = len(batches) * spec.pretrain_epochs
    vision, language = [], []
    for name, p in model.named_parameters():
        (vision if name.startswith(VISION_PREFIXES) else language).append(p)
    opt = torch.optim.AdamW([{"params": vision, "lr": PRETRAIN_VISION_LR}, {"params": language, "lr": PRETRAIN_LR}],
                            weight_decay=0.0)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))))
    model.train()
    order = np.random.default_rng(seed)
    bar = tqdm(total=steps, desc="pre-training")
    for _ in range(spec.pretrain_epochs):
        for b in order.permutation(len(batches)):
            loss, _ = supervised_loss(model, batches[b])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for i in range(0, n_eval, batch_size):
            _, hits = supervised_loss(model, encode_batch(processor, eval_rows[i:i + batch_size], max_pixels))
            correct, total = correct + int(hits.sum()), total + hits.numel()
    model.save_pretrained(model_dir, safe_serialization=True)
    stats = {"final_loss": round(loss.item(), 4), "heldout_token_accuracy": round(correct / total, 4)}
    print(f"pre-training: held-out answer-token accuracy {stats['heldout_token_accuracy']:.3f}")
    return stats

