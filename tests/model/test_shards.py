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


# --------------------------------------------------------------------------- both stages at once on one GPU
def fake_model(folder: Path, gib: float) -> Path:
    """A model folder whose weight file has the size of a real one (sparse: nothing is written)."""
    folder.mkdir(parents=True)
    with open(folder / "model-00001-of-00001.safetensors", "wb") as f:
        f.truncate(int(gib * H.GIB))
    return folder


def fake_checkpoint(folder: Path, model: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "args.json").write_text(json.dumps({"model": str(model)}), encoding="utf-8")
    return folder


def test_stages_together_when_the_free_memory_holds_both_models(tmp_path, monkeypatch, capsys):
    big, small = fake_model(tmp_path / "7b", 15.4), fake_model(tmp_path / "3b", 7.0)
    s1, s2 = fake_checkpoint(tmp_path / "s1", big), fake_checkpoint(tmp_path / "s2", small)
    s1_fold = fake_checkpoint(tmp_path / "s1f", big)  # a fold's stage 1: the same model, the same process
    assert H.lanes_of([s1, s2, s1_fold]) == {str(big): [0, 2], str(small): [1]}
    need = H.together_need([str(big), str(small)], batch_size=8)
    assert abs(need - (15.4 + 7.0 + 2 * (8 * H.IMAGE_GIB + H.PROCESS_GIB)) * H.GIB) < 4  # the files' sizes, rounded
    assert H.together_need([str(big), str(tmp_path / "no-such-model")], 8) is None

    free = {"bytes": 139 * H.GIB}
    monkeypatch.setattr(H, "free_gpu_bytes", lambda device: free["bytes"])
    assert H.stages_together([s1, s2], "0", 8, "auto")
    assert f"2 models need ~{need / H.GIB:.1f} GiB at once, GPU 0 has 139.0 GiB free: scoring them at the same" \
        in capsys.readouterr().out
    free["bytes"] = 22 * H.GIB  # a 24 GB card
    assert not H.stages_together([s1, s2], "0", 8, "auto")
    assert "one after the other" in capsys.readouterr().out
    assert H.stages_together([s1, s2], "0", 8, "1")  # the user's call
    free["bytes"] = None  # no reading from nvidia-smi
    assert not H.stages_together([s1, s2], "0", 8, "auto")
    assert "no free-memory reading" in capsys.readouterr().out
    free["bytes"] = 139 * H.GIB
    assert not H.stages_together([s1, s2], "0", 8, "0")
    assert not H.stages_together([s1, s1_fold], "0", 8, "1")  # one base model: one process anyway
    assert not H.stages_together([s2], "0", 8, "auto")  # stage 1's files were kept: nothing to overlap
    by_id = tmp_path / "by_id"  # trained from a model id: swift records the folder it resolved as model_dir
    by_id.mkdir()
    (by_id / "args.json").write_text(json.dumps({"model": "Qwen/Qwen2.5-VL-3B-Instruct", "model_dir": str(small)}))
    assert H.base_model(by_id) == str(small) and H.stages_together([s1, by_id], "0", 8, "auto")
    bare = fake_checkpoint(tmp_path / "bare", tmp_path / "not-here")
    assert not H.stages_together([s1, bare], "0", 8, "auto")
    assert "a model folder has no weight files here" in capsys.readouterr().out
    monkeypatch.setenv(H.ENV_TOGETHER, "yes")
    with pytest.raises(DataError, match="SCORE_STAGES_TOGETHER='yes': expected auto, 0 or 1"):
        H.stages_together([s1, s2], "0", 8)


def test_free_gpu_bytes_reads_nvidia_smi(monkeypatch):
    import subprocess

    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, answer["rc"], stdout=answer["out"], stderr="")

    answer = {"rc": 0, "out": "81559\n"}
    monkeypatch.setattr(H.subprocess, "run", fake_run)
    assert H.free_gpu_bytes("GPU-aa") == 81559 * 1024 ** 2
    assert calls[-1][-2:] == ["-i", "GPU-aa"]
    answer.update(rc=6, out="No devices were found\n")
    assert H.free_gpu_bytes("0") is None
    answer.update(rc=0, out="[N/A]\n")
    assert H.free_gpu_bytes("0") is None

    def missing(cmd, **kwargs):
        raise FileNotFoundError("nvidia-smi")

    monkeypatch.setattr(H.subprocess, "run", missing)
    assert H.free_gpu_bytes("0") is None


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


@pytest.fixture(scope="module")
def second_checkpoint(tmp_path_factory) -> Path:
    """Another tiny random Qwen2.5-VL (another seed, its own folder: another base model) with its LoRA adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2_5_VLForConditionalGeneration

    root = tmp_path_factory.mktemp("shards2")
    model_dir = build_tiny_model(root / "tiny2", TINY, seed=1)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    ckpt = root / "run" / "checkpoint-2"
    peft.save_pretrained(ckpt)
    (ckpt / "args.json").write_text(json.dumps({"model": str(model_dir), "template": "qwen2_5_vl",
                                                "torch_dtype": "float32", "tuner_type": "lora"}), encoding="utf-8")
    return ckpt


def test_two_models_at_once_write_the_csvs_of_one_process(checkpoint, second_checkpoint, datasets, one_process,
                                                          tmp_path, capfd):
    """SCORE_STAGES_TOGETHER: one process per base model on the same device (two CPU processes here), each scoring
    all rows of its own checkpoint; the CSVs are those of one process scoring the models in turn."""
    from tools.probs import read_probs

    a, b = datasets
    second_one = tmp_path / "second_one"
    second_one.mkdir()
    S.score_jobs([(second_checkpoint, [(b, second_one / "test_probs.csv")])], ARGV, batch_size=1, workers=0)
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    jobs = [*jobs_in(stage1, checkpoint, datasets), (second_checkpoint, [(b, stage2 / "test_probs.csv")])]
    stage1.mkdir(), stage2.mkdir()
    capfd.readouterr()
    H.score_jobs_on_gpus(jobs, ARGV, batch_size=1, workers=0, devices=[None], together=True)
    out = capfd.readouterr().out
    assert "scoring 2 models at the same time on CPU, one process each (SCORE_STAGES_TOGETHER)" in out
    assert "[tiny, CPU] loaded " in out and "[tiny2, CPU] loaded " in out  # a process per model, named by it
    assert "[tiny2, CPU] scored 4 images" in out and "[tiny, CPU] scored 9 images" in out
    for got, want in ((stage1 / "val_probs.csv", one_process / "val_probs.csv"),
                      (stage1 / "test_probs.csv", one_process / "test_probs.csv"),
                      (stage2 / "test_probs.csv", second_one / "test_probs.csv")):
        names, probs = read_probs(got)
        want_names, want_probs = read_probs(want)
        assert names == want_names
        np.testing.assert_allclose(probs, want_probs, rtol=0, atol=1.5e-6)
        assert read_json(probs_record_of(got)) == read_json(probs_record_of(want))
    _, first = read_probs(stage1 / "test_probs.csv")
    _, second = read_probs(stage2 / "test_probs.csv")
    assert np.abs(first - second).max() > 1e-3  # two different models did score
