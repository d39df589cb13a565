"""tools.model.infer: the label tokens, the batching order, the probabilities of a tiny random Qwen2.5-VL against a
plain transformers forward pass, and the resumable scoring jobs (score_jobs)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.helpers import write_image
from tests.model.support import TINY, noise_rows
from tools.demo.models import build_tiny_model, write_tokenizer
from tools.fileio import read_json, read_jsonl, write_jsonl
from tools.model import infer as S
from tools.probs import read_probs
from tools.task import LABELS, PROMPT, label_token_ids, probs_partial_of, probs_record_of, sft_row


# --------------------------------------------------------------------------- label tokens
def test_label_token_ids_with_the_real_qwen_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    write_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = label_token_ids(tok)
    assert len(ids) == len(set(ids)) == len(LABELS)
    for label, token_id in zip(LABELS, ids):
        piece = tok.decode([token_id])
        assert piece and label.startswith(piece), (label, piece)  # the first token is the start of the label


def test_labels_sharing_a_first_token_are_refused():
    by_second_character = SimpleNamespace(encode=lambda text, add_special_tokens=False: [ord(c) for c in text[1:]])
    with pytest.raises(ValueError, match="labels share a first token"):
        label_token_ids(by_second_character)  # 高风险, 中风险, ... all start with 风 here
    by_character = SimpleNamespace(encode=lambda text, add_special_tokens=False: [ord(c) for c in text])
    assert label_token_ids(by_character) == [ord(label[0]) for label in LABELS]


# --------------------------------------------------------------------------- batching order
def test_bucket_order_groups_equal_image_sizes(tmp_path, monkeypatch):
    monkeypatch.delenv("MAX_PIXELS", raising=False)  # token count stood for by the pixel count
    sizes = [(56, 56), (112, 28), (56, 56), (28, 112), (112, 28), (56, 56)]
    rows = [sft_row(write_image(tmp_path / f"{i}.jpg", size=s), None) for i, s in enumerate(sizes)]
    assert S.bucket_order(rows) == [3, 0, 2, 5, 1, 4]  # one token count: by size, ties in input order
    rows[2]["messages"][0]["content"] = "<image>短"  # a shorter sequence goes first among its token count
    rows[1]["messages"].append({"role": "assistant", "content": "高风险" * 50})  # answers do not count
    assert S.bucket_order(rows) == [2, 3, 0, 5, 1, 4]
    rows.append(sft_row(tmp_path / "missing.jpg", None))  # unreadable: first (the encoder will report it)
    assert S.bucket_order(rows)[0] == 6
    assert S.bucket_order([]) == []


def test_bucket_order_puts_photos_of_one_token_count_together(tmp_path, monkeypatch):
    """At MAX_PIXELS a 4:3 and a 3:4 photo have the same visual tokens, a 16:9 one fewer: sorting by width and
    height alone would put the square and 16:9 photos between the two orientations and pad more batches."""
    monkeypatch.setenv("MAX_PIXELS", str(1280 * 28 * 28))
    sizes = [(4032, 3024), (1920, 1080), (3024, 4032), (3024, 3024), (4032, 3024), (3024, 4032)]
    rows = [sft_row(tmp_path / f"{i}.jpg", None) for i in range(len(sizes))]
    order = S.bucket_order(rows, [[s] for s in sizes])
    assert order == [1, 3, 2, 5, 0, 4]  # 1,222 tokens, 1,225, then the 1,271 of both orientations together


def test_visual_size_is_the_image_token_count_at_max_pixels(monkeypatch):
    monkeypatch.setenv("MAX_PIXELS", str(1280 * 28 * 28))
    photo = S.visual_size([(4032, 3024)])
    assert photo == 868 * 1148 // 784  # tools.data.images.model_size: swift's size for a 12 MP phone photo
    assert S.visual_size([(4000, 3000)]) == S.visual_size([(3024, 4032)]) == photo  # same tokens, same shape
    assert S.visual_size([(1920, 1080)]) != photo
    assert S.visual_size([(4032, 3024), (4032, 3024)]) == 2 * photo
    assert S.visual_size([(0, 0)]) == 0  # unreadable: the encoder reports it
    monkeypatch.delenv("MAX_PIXELS")
    assert S.visual_size([(4032, 3024)]) == 4032 * 3024  # no MAX_PIXELS: the pixel count stands for it


def test_shape_keys_and_which_batches_pay_for_a_graph(tmp_path, monkeypatch):
    monkeypatch.delenv("MAX_PIXELS", raising=False)
    rows = [sft_row(write_image(tmp_path / f"{i}.jpg", size=s), None)
            for i, s in enumerate([(56, 56), (56, 56), (56, 56), (56, 56), (112, 56)])]
    rows[3]["messages"][0]["content"] += "，请仔细看"  # a longer prompt: another sequence length
    prompt = len(rows[0]["messages"][0]["content"])
    keys = S.shape_keys(rows, S.image_sizes(rows), [[0, 1], [2], [3], [4], [0, 3, 4]])
    assert keys[:4] == [(3136, prompt, False), (3136, prompt, False), (3136, prompt + 5, False), (6272, prompt, False)]
    assert keys[4] == (6272, prompt + 5, True)  # a mixed batch is padded to its largest image and longest prompt
    a, b = ("a", 1), ("b", 2)
    assert S.graph_batches([a, a, a, b], 2, 6, set()) == [True, True, True, False]  # 6 images of a, 2 of b
    assert S.graph_batches([a, a, a, b], 2, 6, {(2, b)}) == [True] * 4  # b has its graph already
    assert S.graph_batches([a, a, a, b], 4, 6, {(2, b)}) == [True, True, True, False]  # not at this batch size
    assert S.graph_batches([a, b], 2, 0, set()) == [True, True]  # SCORE_COMPILE_LLM=1: every shape


# --------------------------------------------------------------------------- probabilities of a tiny model
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny", TINY, seed=0)


@pytest.fixture(scope="module")
def loaded(tiny_model):
    """(model, template, label ids) as tools.model.infer loads them."""
    model, template, label_ids, _ = S.load(["--model", str(tiny_model), "--template", "qwen2_5_vl", "--torch_dtype",
                                            "float32", "--max_pixels", "3136"])
    return model, template, label_ids


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    """Seven rows of noise images of three sizes, interleaved; one with a shorter prompt, one with an answer."""
    out = noise_rows(tmp_path_factory.mktemp("images"), 7, seed=0, prefix="r")
    out[4] = sft_row(Path(out[4]["images"][0]), LABELS[4])  # the one with an answer
    return out


@pytest.fixture(scope="module")
def reference(tiny_model, rows, loaded) -> np.ndarray:
    """Softmax over the five label tokens' logits at the last prompt position of a plain transformers forward pass
    (its own processor and chat template, the model loaded by transformers), one row at a time."""
    import torch
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(tiny_model)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model, dtype=torch.float32).eval()
    label_ids = loaded[2]
    out = []
    for row in rows:
        text = row["messages"][0]["content"].removeprefix("<image>")
        chat = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text",
                                                                                              "text": text}]}],
                                             add_generation_prompt=True, tokenize=False)
        with Image.open(row["images"][0]) as img:
            inputs = processor(text=[chat], images=[img.convert("RGB")], return_tensors="pt")
        with torch.no_grad():
            logits = model(**inputs).logits[0, -1].double()
        out.append(torch.softmax(logits[label_ids], -1).numpy())
    return np.array(out)


def test_score_rows_is_the_label_softmax_at_the_answer_position(loaded, rows, reference):
    model, template, label_ids = loaded
    got = S.score_rows(model, template, label_ids, rows, batch_size=1, progress=False)
    assert got.shape == (len(rows), len(LABELS))
    np.testing.assert_allclose(got, reference, rtol=0, atol=2e-6)
    np.testing.assert_allclose(got.sum(1), 1, atol=1e-9)
    # not vacuous: the rows differ from each other by far more than the tolerance
    diffs = [np.abs(reference[i] - reference[j]).max() for i in range(len(rows)) for j in range(i)]
    assert min(diffs) > 1e-4


@pytest.mark.parametrize("bucket", [True, False])
def test_batching_and_bucketing_keep_row_order_and_values(loaded, rows, reference, bucket):
    model, template, label_ids = loaded
    got = S.score_rows(model, template, label_ids, rows, batch_size=3, progress=False, bucket=bucket)
    np.testing.assert_allclose(got, reference, rtol=0, atol=2e-5)  # left padding in mixed batches included
    assert (got.argmax(1) == reference.argmax(1)).all()
    reversed_rows = rows[::-1]
    np.testing.assert_allclose(S.score_rows(model, template, label_ids, reversed_rows, batch_size=3, progress=False,
                                            bucket=bucket), reference[::-1], rtol=0, atol=2e-5)


@pytest.mark.parametrize("tta", ["0", "flip"])
def test_a_filled_last_batch_keeps_every_batch_one_shape_and_the_scores(loaded, rows, reference, monkeypatch, tta):
    """With compiled layers (fill), the last, smaller batch is filled up with copies of its last row: every forward
    pass sees batch_size rows, and the scores, the row order and the batches on_batch sees are those of the rows."""
    from tools.model import speedups

    model, template, label_ids = loaded
    sizes, seen = [], []
    forward = S.forward_probs

    def spy(model, template, batch, label_ids):
        sizes.append(int(batch["input_ids"].shape[0]))
        return forward(model, template, batch, label_ids)

    monkeypatch.setattr(S, "forward_probs", spy)
    plain = S.score_rows(model, template, label_ids, rows, batch_size=3, progress=False, tta=tta, fill=False)
    assert sizes == ([3, 3, 1] if tta == "0" else [3, 3, 3, 3, 1, 1])  # each batch, then its mirror image
    sizes.clear()
    monkeypatch.setattr(speedups, "has_compiled_layers", lambda model: True)  # the default follows the model
    monkeypatch.setenv("SCORE_COMPILE_LLM", "1")  # a graph for every shape, however few images it has
    filled = S.score_rows(model, template, label_ids, rows, batch_size=3, progress=False, tta=tta,
                          on_batch=lambda indices, probs: seen.append((list(indices), probs.copy())))
    assert sizes == [3] * (3 if tta == "0" else 6)
    np.testing.assert_allclose(filled, plain, rtol=0, atol=2e-5)
    if tta == "0":
        np.testing.assert_allclose(filled, reference, rtol=0, atol=2e-5)
    assert sorted(i for indices, _ in seen for i in indices) == list(range(len(rows)))  # each row once
    for indices, probs in seen:
        np.testing.assert_array_equal(probs, filled[indices])


def test_an_answer_turn_is_ignored_and_no_rows_is_no_scores(loaded, rows):
    model, template, label_ids = loaded
    with_answer = rows[4]
    assert len(with_answer["messages"]) == 2
    plain = {**with_answer, "messages": with_answer["messages"][:1]}
    np.testing.assert_allclose(S.score_rows(model, template, label_ids, [with_answer], progress=False),
                               S.score_rows(model, template, label_ids, [plain], progress=False), rtol=0, atol=0)
    assert S.score_rows(model, template, label_ids, [], progress=False).shape == (0, len(LABELS))


def test_flip_tta_averages_each_image_with_its_mirror_image(loaded, rows, reference, tmp_path, workers=0):
    """SCORE_TTA=flip: each row's probabilities are the mean of its own and of its mirror image's, the mirror image
    scored exactly as a file holding it would be; in the rows' order, in batches of mixed sizes."""
    from PIL import ImageOps

    model, template, label_ids = loaded
    mirrored_rows = []
    for i, row in enumerate(rows):
        with Image.open(row["images"][0]) as img:
            path = tmp_path / f"m{i}.png"  # lossless: the same pixels the scorer mirrors in memory
            ImageOps.mirror(img.convert("RGB")).save(path)
        mirrored_rows.append({**row, "images": [str(path)]})
    mirrored = S.score_rows(model, template, label_ids, mirrored_rows, batch_size=1, progress=False, tta="0")
    assert np.abs(mirrored - reference).max() > 1e-4  # the mirror image scores differently
    got = S.score_rows(model, template, label_ids, rows, batch_size=3, progress=False, tta="flip", workers=workers)
    np.testing.assert_allclose(got, (reference + mirrored) / 2, rtol=0, atol=2e-5)


def test_flip_tta_in_encoding_workers(loaded, rows, reference, tmp_path):
    test_flip_tta_averages_each_image_with_its_mirror_image(loaded, rows, reference, tmp_path, workers=2)


def test_tta_knob(monkeypatch):
    from tools.fileio import DataError

    monkeypatch.delenv("SCORE_TTA", raising=False)
    assert S.tta_mode() == "0"
    monkeypatch.setenv("SCORE_TTA", "flip")
    assert S.tta_mode() == "flip" and S.job_record.__doc__ and "test-time" in S.job_record.__doc__
    monkeypatch.setenv("SCORE_TTA", "rotate")
    with pytest.raises(DataError, match="SCORE_TTA='rotate'"):
        S.tta_mode()


# --------------------------------------------------------------------------- scoring jobs
def test_score_jobs_loads_each_checkpoint_once_and_writes_csvs(loaded, rows, tmp_path, monkeypatch):
    model, template, label_ids = loaded
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, rows[:4])
    write_jsonl(b, rows[4:])
    calls = []
    monkeypatch.setattr(S, "load",
                        lambda argv, labels: calls.append((argv, labels)) or (model, template, label_ids, None))
    monkeypatch.setenv("FIRESAFE_COMPILE", "on")  # choose_compile sets it: restored after the test
    monkeypatch.setenv("SCORE_COMPILE", "auto")
    jobs = [(Path("/ck/one"), [(a, tmp_path / "s1" / "a.csv"), (b, tmp_path / "s1" / "b.csv")]),
            (Path("/ck/two"), [(a, tmp_path / "s2" / "a.csv")])]
    S.score_jobs(jobs, ["--max_pixels", "3136"], batch_size=2, workers=0)
    assert calls == [(["--adapters", "/ck/one", "--max_pixels", "3136"], LABELS),  # no record: the five labels
                     (["--adapters", "/ck/two", "--max_pixels", "3136"], LABELS)]
    names, probs = read_probs(tmp_path / "s1" / "a.csv")
    assert names == [Path(r["images"][0]).name for r in rows[:4]]  # rows named by image file name
    np.testing.assert_allclose(probs, S.score_rows(model, template, label_ids, rows[:4], progress=False), atol=2e-6)
    assert read_probs(tmp_path / "s1" / "b.csv")[0] == [Path(r["images"][0]).name for r in rows[4:]]
    assert read_probs(tmp_path / "s2" / "a.csv")[0] == names
    import os

    assert os.environ["FIRESAFE_COMPILE"] == "off"  # 4 images: compiling would not pay


def test_choose_compile(monkeypatch):
    monkeypatch.setenv("FIRESAFE_COMPILE", "on")
    monkeypatch.delenv("SCORE_COMPILE", raising=False)
    monkeypatch.delenv("SCORE_COMPILE_MIN_IMAGES", raising=False)
    assert S.choose_compile(800) == "on"
    import os

    assert os.environ["FIRESAFE_COMPILE"] == "on"
    assert S.choose_compile(799) == "off" and os.environ["FIRESAFE_COMPILE"] == "off"
    monkeypatch.setenv("SCORE_COMPILE_MIN_IMAGES", "10")
    assert S.choose_compile(10) == "on"
    monkeypatch.setenv("SCORE_COMPILE", "off")
    assert S.choose_compile(10 ** 6) == "off"


# --------------------------------------------------------------------------- resumable scoring (issue 13)
REAL_FORWARD = S.forward_probs


def count_forward(monkeypatch, stop_at: int | None = None, error: BaseException | None = None) -> list[int]:
    """Patch tools.model.infer.forward_probs to record the rows of each batch it scores; the call numbered stop_at
    (0-based) raises `error` instead (default KeyboardInterrupt: Ctrl-C in the middle of a scoring)."""
    scored: list[int] = []

    def forward(model, template, batch, label_ids):
        if stop_at is not None and len(scored) == stop_at:
            raise error if error is not None else KeyboardInterrupt
        probs = REAL_FORWARD(model, template, batch, label_ids)
        scored.append(len(probs))
        return probs

    monkeypatch.setattr(S, "forward_probs", forward)
    return scored


@pytest.fixture
def scoring(loaded, rows, tmp_path, monkeypatch):
    """One checkpoint folder (a file standing for its weights), two datasets (rows, and rows[:3]), their CSVs, and
    tools.model.infer.load patched to hand out the tiny model (its calls recorded)."""
    model, template, label_ids = loaded
    ckpt = tmp_path / "run" / "checkpoint-2"
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"weights")
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, rows)
    write_jsonl(b, rows[:3])
    loads = []
    monkeypatch.setattr(S, "load", lambda argv, labels: loads.append(argv) or (model, template, label_ids, None))
    monkeypatch.setenv("FIRESAFE_COMPILE", "on")  # choose_compile sets it: restored after the test
    monkeypatch.setenv("SCORE_COMPILE", "auto")
    jobs = [(ckpt, [(a, tmp_path / "run" / "val_probs.csv"), (b, tmp_path / "run" / "test_probs.csv")])]
    return SimpleNamespace(ckpt=ckpt, a=a, b=b, jobs=jobs, loads=loads, val=jobs[0][1][0][1], test=jobs[0][1][1][1],
                           argv=["--max_pixels", "3136"])


def test_an_interrupted_scoring_continues_with_only_the_missing_rows(scoring, loaded, rows, monkeypatch, capsys):
    model, template, label_ids = loaded
    scored = count_forward(monkeypatch, stop_at=2)
    with pytest.raises(KeyboardInterrupt):
        S.score_jobs(scoring.jobs, scoring.argv, batch_size=2, workers=0, bucket=False)
    assert scored == [2, 2] and not scoring.val.exists()
    partial = probs_partial_of(scoring.val)
    lines = partial.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# " + json.dumps(S.job_record(scoring.ckpt, scoring.a, scoring.argv), sort_keys=True)
    assert [int(line.split(",")[0]) for line in lines[1:]] == [0, 1, 2, 3]  # appended batch by batch
    with open(partial, "a", encoding="utf-8") as f:
        f.write("4,0.25,0.25")  # a line cut by the interruption: not trusted
    first = {int(line.split(",")[0]): [float(v) for v in line.split(",")[1:]] for line in lines[1:]}
    capsys.readouterr()

    scored = count_forward(monkeypatch)
    S.score_jobs(scoring.jobs, scoring.argv, batch_size=2, workers=0, bucket=False)
    assert scored == [2, 1] + [2, 1]  # rows 4, 5, 6 of the interrupted part, then all 3 rows of the other part
    out = capsys.readouterr().out
    assert f"continuing {scoring.val}: 4 of 7 images scored before" in out
    assert re.search(r"^loaded in \d+\.\d s$", out, re.M)  # the load's share of test.sh's time, in its log
    names, probs = read_probs(scoring.val)
    assert names == [Path(r["images"][0]).name for r in rows]
    np.testing.assert_allclose(probs[:4], [first[i] for i in range(4)], rtol=0, atol=1e-6)  # kept as scored
    # every row asked with the model's own question (no record: the task's prompt; row 5 has another)
    assert S.model_of(scoring.ckpt)["prompt"] == PROMPT
    full = S.score_rows(model, template, label_ids, rows, batch_size=2, progress=False, workers=0, bucket=False,
                        prompt=PROMPT)
    np.testing.assert_allclose(probs, full, rtol=0, atol=2e-5)
    assert not partial.exists() and not probs_partial_of(scoring.test).exists()
    assert read_json(probs_record_of(scoring.val)) == S.job_record(scoring.ckpt, scoring.a, scoring.argv)
    assert len(scoring.loads) == 2  # once per process


def test_a_finished_csv_is_kept_until_what_made_it_changes(scoring, monkeypatch, capsys):
    S.score_jobs(scoring.jobs, scoring.argv, batch_size=4, workers=0)
    csv = scoring.val.read_bytes()
    capsys.readouterr()
    scored = count_forward(monkeypatch)
    S.score_jobs(scoring.jobs, scoring.argv, batch_size=4, workers=0)
    assert scored == [] and len(scoring.loads) == 1  # nothing to score: the model is not even loaded
    out = capsys.readouterr().out
    assert f"kept {scoring.val} (scored before with the same checkpoint, rows and arguments)" in out
    assert scoring.val.read_bytes() == csv

    scoring.test.unlink()  # one part gone: only it is scored, with one load
    S.score_jobs(scoring.jobs, scoring.argv, batch_size=4, workers=0)
    assert sum(scored) == 3 and len(scoring.loads) == 2

    argv = scoring.argv
    for change in ("checkpoint", "arguments", "SCORE_MERGE", "SCORE_FP8", "SCORE_TTA", "rows"):
        if change == "checkpoint":  # retrained: a checkpoint file with new bytes (size and time)
            (scoring.ckpt / "adapter_model.safetensors").write_bytes(b"retrained weights")
        elif change == "arguments":
            argv = [*scoring.argv, "--max_batch_size", "2"]
        elif change.startswith("SCORE_"):  # merged or float8 weights round differently: scored again
            monkeypatch.setenv(change, "flip" if change == "SCORE_TTA" else "1")  # (the tiny model stays as it is)
        else:
            write_jsonl(scoring.a, read_jsonl(scoring.a)[:5])
        scored.clear()
        S.score_jobs(scoring.jobs, argv, batch_size=4, workers=0)
        n_a = 5 if change == "rows" else 7
        views = 2 if change in ("SCORE_TTA", "rows") else 1  # with SCORE_TTA=flip (set from then on) each image twice
        assert sum(scored) == views * (n_a + (0 if change == "rows" else 3)), change  # both parts, or the changed rows
        assert read_json(probs_record_of(scoring.val)) == S.job_record(scoring.ckpt, scoring.a, argv)


def test_the_next_models_weights_are_read_ahead_while_one_scores(scoring, tmp_path, monkeypatch):
    """Three models: the second one's weights are advised once the first has loaded, the third's once the second has;
    a model whose CSVs are all kept is neither loaded nor read."""
    events = []
    monkeypatch.setattr(S.prefetch, "start", lambda argv: events.append(("prefetch", argv)))
    model_load = S.load
    monkeypatch.setattr(S, "load", lambda argv, labels: events.append(("load", argv)) or model_load(argv, labels))
    ckpts = [scoring.ckpt]
    for name in ("stage2", "stage3"):
        ckpts.append(tmp_path / name / "checkpoint-2")
        ckpts[-1].mkdir(parents=True)
    jobs = [(ckpt, [(scoring.b, ckpt.parent / "test_probs.csv")]) for ckpt in ckpts]
    S.score_jobs(jobs[1:2], scoring.argv, batch_size=4, workers=0)  # the second model's CSV is done before
    events.clear()
    S.score_jobs(jobs, scoring.argv, batch_size=4, workers=0)
    argv = [["--adapters", str(ckpt), *scoring.argv] for ckpt in ckpts]
    assert events == [("load", argv[0]), ("prefetch", argv[2]), ("load", argv[2])]


def test_a_partial_file_of_another_checkpoint_is_not_used(scoring, monkeypatch):
    scored = count_forward(monkeypatch, stop_at=1)
    with pytest.raises(KeyboardInterrupt):
        S.score_jobs(scoring.jobs, scoring.argv, batch_size=2, workers=0, bucket=False)
    assert probs_partial_of(scoring.val).exists()
    (scoring.ckpt / "adapter_model.safetensors").write_bytes(b"retrained weights")
    scored = count_forward(monkeypatch)
    S.score_jobs(scoring.jobs, scoring.argv, batch_size=2, workers=0, bucket=False)
    assert sum(scored) == 7 + 3  # every row again: the rows scored before came from the old weights


def test_gpu_peak_says_allocated_and_reserved_on_cuda_and_nothing_on_cpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert S.gpu_peak() == ""
    S.reset_gpu_peak()  # no CUDA: nothing to reset, no error
    resets = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: resets.append(1))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: int(19.44 * 1024 ** 3))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda: int(23.1 * 1024 ** 3))
    S.reset_gpu_peak()
    assert resets == [1]
    assert S.gpu_peak() == ", peak GPU 19.4 GiB allocated, 23.1 GiB reserved"


def test_running_out_of_gpu_memory_says_what_to_lower_and_keeps_the_rows(scoring, monkeypatch, capsys):
    """CUDA's out-of-memory error in the middle of a file: the scoring CLI ends with one line that says what to lower,
    and the batches scored before it stay in the partial file for the next run."""
    import torch

    from tools.model import score as cli

    count_forward(monkeypatch, stop_at=2, error=torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    argv = ["--checkpoint", str(scoring.ckpt), "--dataset", str(scoring.a), "--output", str(scoring.val),
            "--batch-size", "2", "--workers", "0", "--no-bucket", "--", *scoring.argv]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "\nerror: the GPU ran out of memory (CUDA out of memory. Tried to allocate 2.00 GiB)" in err  # after tqdm's bar
    assert "lower SCORE_BATCH_SIZE (test.sh; --batch-size), now 2, e.g. to 1" in err
    assert "Traceback" not in err and not scoring.val.exists()
    lines = probs_partial_of(scoring.val).read_text(encoding="utf-8").splitlines()
    assert [int(line.split(",")[0]) for line in lines[1:]] == [0, 1, 2, 3]  # the two batches before it

    cuda_says = ("CUDA out of memory. Tried to allocate 400.00 GiB. GPU 0 has a total capacity of 139.80 GiB of which "
                 "139.29 GiB is free. Including non-PyTorch memory, this process has 518.00 MiB memory in use. If "
                 "reserved but unallocated memory is large try setting PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True")
    with pytest.raises(S.ScoringOutOfMemory) as raised:  # CUDA's message as the H200 said it: its first three sentences
        with S.out_of_memory_hint(8):
            raise torch.OutOfMemoryError(cuda_says)
    assert str(raised.value).startswith("the GPU ran out of memory (CUDA out of memory. Tried to allocate 400.00 GiB. "
                                        "GPU 0 has a total capacity of 139.80 GiB of which 139.29 GiB is free). ")
    assert "Including non-PyTorch" not in str(raised.value)
    with pytest.raises(S.ScoringOutOfMemory, match=r"lower MAX_PIXELS \(the recipe\), or use a GPU with more memory"):
        with S.out_of_memory_hint(1):  # a batch of one: nothing left to halve
            raise torch.OutOfMemoryError("CUDA out of memory.")
    with pytest.raises(ValueError):  # anything else passes through as it is
        with S.out_of_memory_hint(8):
            raise ValueError("not memory")
