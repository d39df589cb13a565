"""tools.model.shards: scoring on several GPUs, one process per GPU (issue 16). Which GPUs (SCORE_GPUS,
CUDA_VISIBLE_DEVICES), the shard files and how an interrupted run continues from them with any number of processes,
and, with two CPU processes standing for two GPUs and a tiny Qwen2.5-VL with a LoRA adapter, the CSVs (and the
consistency filter's vectors) are those of one process, rows in list order."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.model.support import TINY, noise_rows
from tools.demo.models import build_tiny_model
from tools.fileio import DataError, read_json, write_jsonl
from tools.model import infer as S
from tools.model import shards as H
from tools.task import LABELS, probs_partial_of, probs_record_of

ARGV = ["--max_pixels", "3136"]


# --------------------------------------------------------------------------- which GPUs
def test_visible_gpus(monkeypatch):
    import torch

    count = {"n": 4}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count["n"])
    assert H.visible_gpus({}) == ["0", "1", "2", "3"]
    count["n"] = 2
    assert H.visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3"}) == ["2", "3"]
    assert H.visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-aa, GPU-bb"}) == ["GPU-aa", "GPU-bb"]
    count["n"] = 1
    assert H.visible_gpus({"CUDA_VISIBLE_DEVICES": "0,-1,2"}) == ["0"]  # CUDA stops at an invalid entry
    count["n"] = 0
    assert H.visible_gpus({}) == [] == H.visible_gpus({"CUDA_VISIBLE_DEVICES": ""})


def test_scoring_devices():
    four = ["0", "1", "2", "3"]
    assert H.scoring_devices(None, four) == four == H.scoring_devices("all", four)
    assert H.scoring_devices("2", four) == ["0", "1"]
    assert H.scoring_devices("8", four) == four
    assert H.scoring_devices("all", []) == []
    for bad in ("0", "x", "-1"):
        with pytest.raises(DataError, match="SCORE_GPUS="):
            H.scoring_devices(bad, four)


# --------------------------------------------------------------------------- shard files
def partial_lines(path: Path, record: dict, rows: dict[int, list[float]], cut: str = "") -> None:
    path.write_text("# " + json.dumps(record, sort_keys=True) + "\n"
                    + "".join(f"{i}," + ",".join(repr(float(v)) for v in p) + "\n" for i, p in rows.items()) + cut,
                    encoding="utf-8")


def test_fold_shards_merges_the_rows_of_every_shard_file(tmp_path):
    partial = probs_partial_of(tmp_path / "val_probs.csv")
    assert partial.name == "val_probs.partial.csv"
    assert H.shard_partial(partial, 1).name == "val_probs.partial.shard1.csv"
    record, other = {"checkpoint": "c", "rows": "r"}, {"checkpoint": "old", "rows": "r"}
    p = [0.1, 0.2, 0.3, 0.2, 0.2]
    partial_lines(partial, record, {0: p, 1: p})
    partial_lines(H.shard_partial(partial, 0), record, {2: p, 4: p})
    partial_lines(H.shard_partial(partial, 1), record, {3: p}, cut="5,0.2,0.")  # a line cut by an interruption
    partial_lines(H.shard_partial(partial, 2), other, {5: p, 6: p})  # another checkpoint's: not trusted
    done = H.fold_shards(partial, record, 7)
    assert sorted(done) == [0, 1, 2, 3, 4]
    assert H.shard_partials(partial) == []
    assert sorted(S.read_partial(partial, record, 7)) == [0, 1, 2, 3, 4]  # what score_jobs continues from
    assert H.fold_shards(partial, record, 7).keys() == done.keys()  # no shard files: the partial file as it is


# --------------------------------------------------------------------------- a tiny model on two CPU processes
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random Qwen2.5-VL and a LoRA adapter on it (random, non-zero) with the args.json swift reads."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    root = tmp_path_factory.mktemp("shards")
    model_dir = build_tiny_model(root / "tiny", TINY, seed=0)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    ckpt = root / "run" / "checkpoint-3"
    peft.save_pretrained(ckpt)
    (ckpt / "args.json").write_text(json.dumps({"model": str(model_dir), "template": "qwen2_5_vl",
                                                "torch_dtype": "float32", "tuner_type": "lora"}), encoding="utf-8")
    return ckpt


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[Path, Path]:
    """Nine rows of noise images of three sizes (one with another prompt), and the first four of them."""
    folder = tmp_path_factory.mktemp("rows")
    rows = noise_rows(folder, 9, seed=1, prefix="img")
    write_jsonl(folder / "a.jsonl", rows)
    write_jsonl(folder / "b.jsonl", rows[:4])
    return folder / "a.jsonl", folder / "b.jsonl"


def jobs_in(folder: Path, checkpoint: Path, datasets) -> list:
    a, b = datasets
    return [(checkpoint, [(a, folder / "val_probs.csv"), (b, folder / "test_probs.csv")])]


@pytest.fixture(scope="module")
def one_process(checkpoint, datasets, tmp_path_factory) -> Path:
    """tools.model.infer.score_jobs in this process (what test.sh did before, and still does on one GPU)."""
    folder = tmp_path_factory.mktemp("one")
    S.score_jobs(jobs_in(folder, checkpoint, datasets), ARGV, batch_size=1, workers=0)
    return folder


def test_two_processes_write_the_csvs_of_one(checkpoint, datasets, one_process, tmp_path, capsys):
    H.score_jobs_on_gpus(jobs_in(tmp_path, checkpoint, datasets), ARGV, batch_size=1, workers=0,
                         devices=[None, None])
    out = capsys.readouterr().out
    assert "scoring on 2 CPU processes (cpu, cpu), one process each" in out
    from tools.probs import read_probs

    for name in ("val_probs.csv", "test_probs.csv"):
        names, probs = read_probs(tmp_path / name)
        one_names, one_probs = read_probs(one_process / name)
        assert names == one_names  # the same rows, in list order
        # the same numbers up to float32 reductions done with another thread count (last bit: 3e-8; the CSV keeps 6
        # decimals, so the files are usually byte-identical)
        np.testing.assert_allclose(probs, one_probs, rtol=0, atol=1.5e-6)
        assert read_json(probs_record_of(tmp_path / name)) == read_json(probs_record_of(one_process / name))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test_probs.csv", "test_probs.json", "val_probs.csv",
                                                          "val_probs.json"]  # no partial file left

    # the records match: a later run, on any number of GPUs, keeps both files without loading the model
    H.score_jobs_on_gpus(jobs_in(tmp_path, checkpoint, datasets), ARGV, batch_size=1, workers=0, devices=[None, None])
    assert "kept " in capsys.readouterr().out


def test_an_interrupted_sharded_run_continues_in_one_process(checkpoint, datasets, one_process, tmp_path,
                                                             monkeypatch):
    """Two shard files of an interrupted two-GPU run (rows 0, 2 and 1); the next run on one GPU (or a CPU) folds
    them into <part>_probs.partial.csv and scores only the six other rows."""
    from tools.probs import read_probs

    jobs = jobs_in(tmp_path, checkpoint, datasets)
    a = datasets[0]
    output = tmp_path / "val_probs.csv"
    record = S.job_record(checkpoint, a, ARGV)
    _, reference = read_probs(one_process / "val_probs.csv")
    partial = probs_partial_of(output)
    partial_lines(H.shard_partial(partial, 0), record, {0: list(reference[0]), 2: list(reference[2])})
    partial_lines(H.shard_partial(partial, 1), record, {1: list(reference[1])})
    scored = []
    real = S.forward_probs
    monkeypatch.setattr(S, "forward_probs", lambda *args: (lambda p: scored.append(len(p)) or p)(real(*args)))
    monkeypatch.delenv(H.ENV_GPUS, raising=False)
    monkeypatch.setattr(H, "visible_gpus", lambda env=None: [])  # this machine: no GPU, one process
    H.score_jobs_on_gpus(jobs, ARGV, batch_size=1, workers=0)
    assert sum(scored) == 6 + 4  # six rows of a.jsonl, all four of b.jsonl
    names, probs = read_probs(output)
    assert names == read_probs(one_process / "val_probs.csv")[0]
    np.testing.assert_allclose(probs, reference, rtol=0, atol=1.5e-6)
    assert not partial.exists() and H.shard_partials(partial) == []


def test_a_failed_process_is_reported_and_its_rows_kept(checkpoint, datasets, tmp_path):
    broken = tmp_path / "run" / "checkpoint-1"
    broken.mkdir(parents=True)  # no args.json, no adapter: swift cannot load it
    with pytest.raises(H.ShardsFailed, match=r"shard 1 \(CPU\) exit status 1.*run it again to continue"):
        H.score_jobs_on_gpus([(broken, [(datasets[1], tmp_path / "test_probs.csv")])], ARGV, batch_size=2,
                             workers=0, devices=[None, None])
    assert not (tmp_path / "test_probs.csv").exists()
    assert probs_partial_of(tmp_path / "test_probs.csv").exists()  # the record line: the next run continues


def test_the_consistency_filter_on_two_processes(checkpoint, datasets, tmp_path):
    """tools.augment.filter.model_vectors_fn with two devices: the vectors of one process, in the paths' order."""
    from tools.augment.filter import model_vectors_fn
    from tools.fileio import read_jsonl

    paths = [r["images"][0] for r in read_jsonl(datasets[0])][::-1]
    argv = ["--adapters", str(checkpoint), *ARGV]
    one = model_vectors_fn(argv, batch_size=1, progress=False, devices=[])(paths)
    two = model_vectors_fn(argv, batch_size=1, progress=False, devices=[None, None])(paths)
    assert two.shape == (len(paths), len(LABELS))
    np.testing.assert_allclose(two, one, rtol=0, atol=1e-6)  # float32 reductions with another thread count


def test_two_processes_score_a_binary_specialist_as_one(checkpoint, datasets, tmp_path, monkeypatch):
    """A run that recorded a binary target (its labels, prompt and class shares: tools.model.checkpoint start):
    each shard asks with the model's prompt over its two labels, and the merged CSV is prior-corrected, as in one
    process."""
    import shutil

    from tools.fileio import write_json
    from tools.model import prior
    from tools.probs import read_probs
    from tools.task import BINARY_LABELS, BINARY_PROMPT, TRAINED_ON

    run = tmp_path / "run"
    shutil.copytree(checkpoint, run / checkpoint.name)
    shares = {"labels": list(BINARY_LABELS), "trained": [0.3, 0.7], "real": [0.03, 0.97]}
    write_json(run / TRAINED_ON, {"fingerprint": {"digest": "x", "parts": {}}, "task": "causal_lm",
                                  "labels": list(BINARY_LABELS), "prompt": BINARY_PROMPT, "class_shares": shares})
    monkeypatch.delenv("PRIOR_CORRECTION", raising=False)
    ckpt = run / checkpoint.name
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    S.score_jobs(jobs_in(tmp_path / "one", ckpt, datasets), ARGV, batch_size=1, workers=0)
    H.score_jobs_on_gpus(jobs_in(tmp_path / "two", ckpt, datasets), ARGV, batch_size=1, workers=0,
                         devices=[None, None])
    names, one = read_probs(tmp_path / "one" / "val_probs.csv")
    assert one.shape == (9, 2)
    two_names, two = read_probs(tmp_path / "two" / "val_probs.csv")
    assert two_names == names
    np.testing.assert_allclose(two, one, rtol=0, atol=1.5e-6)
    record = read_json(probs_record_of(tmp_path / "two" / "val_probs.csv"))
    assert record["labels"] == list(BINARY_LABELS) and record["prompt"] == BINARY_PROMPT
    assert record["prior_corrected"]
    # corrected: undoing the correction gives probabilities of the raw model, not these
    raw = prior.correct(two, shares["real"], shares["trained"])
    assert np.abs(raw - two).max() > 0.01


def test_a_shard_reads_the_next_models_weights_ahead_while_one_scores(tmp_path, monkeypatch):
    """The shard process's loop over models: the next model with rows in this shard is read ahead once the current
    one has loaded; a model without rows here is skipped (neither loaded nor read)."""
    events = []
    monkeypatch.setattr(H.prefetch, "start", lambda argv: events.append(("prefetch", argv)))
    monkeypatch.setattr(H.infer, "load", lambda argv, labels: events.append(("load", argv)) or (None, None, [], None))
    monkeypatch.setattr(H.infer, "score_rows", lambda model, template, label_ids, rows, *a, on_batch, **k: on_batch(
        list(range(len(rows))), np.full((len(rows), len(LABELS)), 0.2)))
    write_jsonl(tmp_path / "rows.jsonl", [{"images": ["a.jpg"]}, {"images": ["b.jpg"]}])

    def job(name, indices):
        return {"argv": ["--adapters", name], "parts": [{"indices": indices, "record": {}, "dataset":
                str(tmp_path / "rows.jsonl"), "partial": str(tmp_path / f"{name}.partial.csv")}]}

    H.worker({"shards": 2, "shard": 0, "batch_size": 2, "progress": False, "workers": 0, "bucket": True,
              "jobs": [job("s1", [0, 1]), job("s2", []), job("s3", [1])]})
    assert events == [("load", ["--adapters", "s1"]), ("prefetch", ["--adapters", "s3"]),
                      ("load", ["--adapters", "s3"])]
    assert (tmp_path / "s3.partial.csv").read_text(encoding="utf-8").count("\n") == 2  # its header and its one row
