"""Scoring on several GPUs: one process per GPU, each scoring its share of every dataset, merged in list order.

    SCORE_GPUS=all bash test.sh       # default: every visible GPU (CUDA_VISIBLE_DEVICES, if set, says which)
    SCORE_GPUS=2 bash test.sh         # at most the first two of them
    python -m tools.model.shards worker SPEC.json     # one shard's process (started by score_jobs_on_gpus)

tools.model.score's --output-dir and --checkpoint forms call score_jobs_on_gpus, and data-pre.sh's consistency
filter (tools.augment.filter.model_vectors_fn) calls vectors_on_gpus. With one GPU, or none, nothing changes:
tools.model.infer.score_jobs scores in the calling process, as before. With several, each checkpoint's rows still to
score are dealt out in turn (row i to process i mod N, so every process gets the same mix of image sizes), one
process per GPU (its CUDA_VISIBLE_DEVICES set to that GPU) loads the checkpoint once and scores its rows of every
dataset with tools.model.infer's own load and score_rows (the same batching, bucketing and encoding workers;
SCORE_WORKERS defaults to an equal share of the CPUs), and the probabilities are written back in the rows' order into
the same CSVs, with the same records. One GPU among several (SCORE_GPUS=1) is one such process, so no model is spread
over several GPUs by swift's device_map.

Resumable as before: a finished CSV whose record matches is kept; each process appends the rows it scored, by their
index in the dataset, to `<part>_probs.partial.shard<k>.csv` (the format of `<part>_probs.partial.csv`, same record
line), and the next run, with any number of GPUs or none, first folds every matching shard file into
`<part>_probs.partial.csv` and scores only the rows none of them holds.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from tools import cli
from tools.fileio import DataError, atomic_open, read_json, read_jsonl, write_jsonl
from tools.model import infer, prefetch
from tools.task import LABELS, probs_partial_of, probs_record_of

ROOT = Path(__file__).resolve().parents[2]
ENV_GPUS = "SCORE_GPUS"
Jobs = list  # [(checkpoint, [(dataset, output CSV), ...]), ...] as tools.model.score.jobs_for returns them


# --------------------------------------------------------------------------- which GPUs
def visible_gpus(env: dict | None = None) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES entries for one child each: the entries of
    CUDA_VISIBLE_DEVICES when it is set (indices or UUIDs), else 0 .. count-1; none without CUDA. Asks torch's
    NVML-based count, which does not initialise CUDA."""
    env = os.environ if env is None else env
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch, no driver: no GPU
        return []
    if count <= 0:
        return []
    listed = env.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    entries = []
    for entry in (e.strip() for e in listed.split(",")):
        if not entry or entry.startswith("-"):  # CUDA stops at the first invalid entry
            break
        entries.append(entry)
    return entries[:count]


def scoring_devices(policy: str | None, visible: list[str]) -> list[str]:
    """The GPUs to score on: SCORE_GPUS=all (default) every visible one, N at most the first N."""
    policy = (policy or "all").strip().lower()
    if policy == "all":
        return list(visible)
    if not policy.isdigit() or int(policy) < 1:
        raise DataError(f"{ENV_GPUS}={policy!r}: expected all, or a whole number >= 1")
    return list(visible[:int(policy)])


# --------------------------------------------------------------------------- shard files
def shard_partial(partial: Path, k: int) -> Path:
    """Shard k's rows of a partial file: test_probs.partial.csv -> test_probs.partial.shard<k>.csv."""
    return partial.with_name(f"{partial.stem}.shard{k}{partial.suffix}")


def shard_partials(partial: Path) -> list[Path]:
    return sorted(partial.parent.glob(f"{partial.stem}.shard*{partial.suffix}"))


def _header(record: dict) -> str:
    return "# " + json.dumps(record, sort_keys=True) + "\n"  # tools.model.infer.read_partial's first line


def _lines(indices, probs) -> str:
    return "".join(f"{i}," + ",".join(repr(float(v)) for v in p) + "\n" for i, p in zip(indices, probs))


def rows_done(partial: Path, record: dict, n_rows: int) -> dict[int, np.ndarray]:
    """Rows already scored with `record`: the partial file's and every shard file's (read_partial's rules)."""
    done = {}
    for path in [partial, *shard_partials(partial)]:
        done.update(infer.read_partial(path, record, n_rows, infer.n_labels_of(record)))
    return done


def fold_shards(partial: Path, record: dict, n_rows: int) -> dict[int, np.ndarray]:
    """Fold the shard files into the partial file (rows with the same record; others are dropped) and delete them;
    returns the rows done. Without shard files the partial file is left as it is."""
    shards = shard_partials(partial)
    if not shards:
        return infer.read_partial(partial, record, n_rows, infer.n_labels_of(record))
    done = rows_done(partial, record, n_rows)
    with atomic_open(partial) as f:
        f.write(_header(record))
        f.write(_lines(sorted(done), [done[i] for i in sorted(done)]))
    for path in shards:
        path.unlink(missing_ok=True)
    return done


def fold_all(jobs: Jobs, swift_argv: list[str]) -> None:
    """Before scoring: every shard file an interrupted multi-GPU run left, folded into its partial file (so the
    one-process scorer, which reads only that one, continues from them too)."""
    for checkpoint, parts in jobs:
        for dataset, output in parts:
            partial = probs_partial_of(output)
            if not shard_partials(partial):
                continue
            record = infer.job_record(checkpoint, dataset, swift_argv)
            if output.exists() and probs_record_of(output).exists() and read_json(probs_record_of(output)) == record:
                for path in shard_partials(partial):  # finished meanwhile: nothing to continue
                    path.unlink(missing_ok=True)
                continue
            fold_shards(partial, record, len(read_jsonl(dataset)))


def write_output(output: Path, rows: list[dict], probs: np.ndarray, record: dict) -> None:
    """The finished CSV and its record (tools.model.infer.write_scored, as score_jobs writes them); then no
    partial files."""
    infer.write_scored(output, rows, probs, record)
    partial = probs_partial_of(output)
    for path in [partial, *shard_partials(partial)]:
        path.unlink(missing_ok=True)


# --------------------------------------------------------------------------- the processes
class ShardsFailed(DataError):
    """A scoring process failed (its model did not load, it ran out of memory, it was killed)."""


def _child_env(device: str | None, n: int, k: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cpus = os.cpu_count() or 1
    if device is None:  # CPU shards (tests): share the cores
        env.setdefault("OMP_NUM_THREADS", str(max(1, cpus // n)))
        env.setdefault("SCORE_WORKERS", "0")
    else:
        env["CUDA_VISIBLE_DEVICES"] = device
        env.setdefault("SCORE_WORKERS", str(max(0, min(8, (cpus - 2 * n) // n))))  # default_workers' cap, shared
    env["FIRESAFE_SCORE_SHARD"] = f"{k + 1}/{n}"
    return env


def run_shards(specs: list[dict], devices: list[str | None]) -> None:
    """One `python -m tools.model.shards worker` per spec (a shard with no rows gets none), on its device; waits
    for all of them. A failed one is reported after the others finished (their rows stay in their shard files)."""
    tmp = Path(tempfile.mkdtemp(prefix="firesafe-shards-"))
    procs: list[tuple[int, str | None, subprocess.Popen]] = []
    try:
        for k, (spec, device) in enumerate(zip(specs, devices)):
            if not any(part["indices"] for job in spec["jobs"] for part in job["parts"]):
                continue
            path = tmp / f"shard{k}.json"
            path.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
            procs.append((k, device, subprocess.Popen([sys.executable, "-m", "tools.model.shards", "worker", str(path)],
                                                      env=_child_env(device, len(specs), k), cwd=ROOT)))
        failed = [(k, device, proc.wait()) for k, device, proc in procs]
        failed = [(k, device, rc) for k, device, rc in failed if rc != 0]
        if failed:
            what = ", ".join(f"shard {k + 1} ({'GPU ' + device if device is not None else 'CPU'}) exit status {rc}"
                             for k, device, rc in failed)
            raise ShardsFailed(f"scoring failed: {what}; the rows scored so far are kept: run it again to continue")
    finally:
        for _, _, proc in procs:  # interrupted (Ctrl-C, a kill): no child keeps a GPU busy
            if proc.poll() is None:
                proc.terminate()
        for _, _, proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def _specs(n: int, batch_size: int, workers: int | None, bucket: bool) -> list[dict]:
    return [{"shard": k, "shards": n, "batch_size": batch_size, "workers": workers, "bucket": bucket,
             "progress": k == 0, "jobs": []} for k in range(n)]


def _deal(specs: list[dict], argv: list[str], parts: list[tuple[Path, Path, dict, list[int]]]) -> None:
    """Add one model's parts to every shard's spec: (dataset, partial file, record, row indices to score), the
    indices dealt out in turn."""
    n = len(specs)
    for k, spec in enumerate(specs):
        spec["jobs"].append({"argv": list(argv), "parts": [
            {"dataset": str(dataset), "partial": str(shard_partial(partial, k)), "record": record,
             "indices": todo[k::n]} for dataset, partial, record, todo in parts]})


# --------------------------------------------------------------------------- test.sh's scoring
def score_jobs_on_gpus(jobs: Jobs, swift_argv: list[str], batch_size: int, workers: int | None = None,
                       bucket: bool = True, devices: list[str | None] | None = None) -> None:
    """tools.model.infer.score_jobs, one process per GPU (SCORE_GPUS) when several are visible; in this process
    otherwise. `devices` overrides the choice (None entries: CPU processes, for tests)."""
    fold_all(jobs, swift_argv)
    if devices is None:
        visible = visible_gpus()
        devices = scoring_devices(os.environ.get(ENV_GPUS), visible)
        if len(visible) <= 1:
            return infer.score_jobs(jobs, swift_argv, batch_size, workers, bucket)
    if not devices:
        raise DataError("no device to score on")
    many = len(devices) > 1
    kind = ("GPUs" if many else "GPU") if devices[0] is not None else ("CPU processes" if many else "CPU process")
    print(f"scoring on {len(devices)} {kind} ({', '.join(d or 'cpu' for d in devices)}), one process each; "
          "finished files are kept")
    specs = _specs(len(devices), batch_size, workers, bucket)
    merges = []
    datasets = {path: read_jsonl(path) for _, parts in jobs for path, _ in parts}
    for checkpoint, parts in jobs:
        records = {output: infer.job_record(checkpoint, dataset, swift_argv) for dataset, output in parts}
        todo = []
        for dataset, output in parts:
            record = records[output]
            if output.exists() and probs_record_of(output).exists() and read_json(probs_record_of(output)) == record:
                print(f"kept {output} (scored before with the same checkpoint, rows and arguments)")
                continue
            rows, partial = datasets[dataset], probs_partial_of(output)
            done = infer.read_partial(partial, record, len(rows), infer.n_labels_of(record))  # fold_all left every earlier row there
            if done:
                print(f"continuing {output}: {len(done)} of {len(rows)} images scored before")
            else:
                partial.parent.mkdir(parents=True, exist_ok=True)
                partial.write_text(_header(record), encoding="utf-8")
            todo.append((dataset, partial, record, [i for i in range(len(rows)) if i not in done]))
            merges.append((dataset, output, record))
        if todo:
            _deal(specs, ["--adapters", str(checkpoint), *swift_argv], todo)
    start = time.time()
    n_new = sum(len(part["indices"]) for spec in specs for job in spec["jobs"] for part in job["parts"])
    run_shards(specs, devices)
    seconds = time.time() - start
    for dataset, output, record in merges:
        rows = datasets[dataset]
        done = rows_done(probs_partial_of(output), record, len(rows))
        missing = [i for i in range(len(rows)) if i not in done]
        if missing:
            raise DataError(f"{output}: {len(missing)} of {len(rows)} rows were not scored (first: row {missing[0]}); "
                            "run it again to continue")
        write_output(output, rows, np.array([done[i] for i in range(len(rows))]), record)
        print(f"wrote {output} ({len(rows)} images, in list order)")
    if n_new:
        print(f"scored {n_new} images in {seconds:.1f} s ({n_new / max(seconds, 1e-9):.1f} images/s, model loading "
              f"included) on {len(devices)} processes")


# --------------------------------------------------------------------------- data-pre.sh's consistency filter
def vectors_on_gpus(swift_argv: list[str], paths: list[str], devices: list[str | None], batch_size: int = 8,
                    progress: bool = True) -> np.ndarray:
    """[len(paths), 5] probabilities of images (the prompt of tools.task.sft_row) from the model swift_argv names,
    one process per device; nothing is kept on disk."""
    from tools.task import sft_row

    tmp = Path(tempfile.mkdtemp(prefix="firesafe-filter-"))
    try:
        dataset = tmp / "rows.jsonl"
        write_jsonl(dataset, [sft_row(p, None) for p in paths])
        record = {"filter": list(swift_argv), "rows": len(paths)}
        partial = tmp / "probs.partial.csv"
        specs = _specs(len(devices), batch_size, None, True)
        for spec in specs:
            spec["progress"] = progress and spec["progress"]
        _deal(specs, swift_argv, [(dataset, partial, record, list(range(len(paths))))])
        run_shards(specs, devices)
        done = {}
        for k in range(len(devices)):
            done.update(infer.read_partial(shard_partial(partial, k), record, len(paths)))
        if len(done) != len(paths):
            raise DataError(f"the consistency filter's scoring returned {len(done)} of {len(paths)} images")
        return np.array([done[i] for i in range(len(paths))], dtype=np.float64).reshape(len(paths), len(LABELS))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- one shard's process
def worker(spec: dict) -> None:
    """Load each model once, score this shard's rows of its datasets, append them to the shard files."""
    import torch

    n, k = spec["shards"], spec["shard"]
    device = os.environ.get("CUDA_VISIBLE_DEVICES") if torch.cuda.is_available() else "cpu"
    tag = f"[shard {k + 1}/{n}, {'GPU ' + device if device != 'cpu' else 'CPU'}]"
    infer.choose_compile(max((sum(len(p["indices"]) for p in job["parts"]) for job in spec["jobs"]), default=0))
    jobs = [job for job in spec["jobs"] if any(p["indices"] for p in job["parts"])]
    for index, job in enumerate(jobs):
        parts = [p for p in job["parts"] if p["indices"]]
        model_info = parts[0]["record"]  # the checkpoint's labels and prompt (infer.job_record); none for the filter
        labels = tuple(model_info.get("labels", LABELS))
        start = time.time()
        infer.reset_gpu_peak()
        model, template, label_ids, _ = infer.load(job["argv"], labels=labels)
        print(f"{tag} loaded the model in {time.time() - start:.1f} s{infer.gpu_peak()}", flush=True)
        if index + 1 < len(jobs):  # SCORE_PREFETCH: the next model's weights are read while this one scores
            prefetch.start(jobs[index + 1]["argv"])
        for part in parts:
            infer.reset_gpu_peak()
            rows = read_jsonl(part["dataset"])
            indices = part["indices"]
            partial = Path(part["partial"])
            partial.write_text(_header(part["record"]), encoding="utf-8")
            start = time.time()
            with open(partial, "a", encoding="utf-8") as f:
                def keep(local, probs, f=f, indices=indices):
                    f.write(_lines([indices[j] for j in local], probs))
                    f.flush()

                infer.score_rows(model, template, label_ids, [rows[i] for i in indices], spec["batch_size"],
                             progress=spec["progress"], workers=spec["workers"], bucket=spec["bucket"], on_batch=keep,
                             prompt=model_info.get("prompt"), n_labels=len(labels))
            seconds = time.time() - start
            print(f"{tag} scored {len(indices)} images in {seconds:.1f} s ({len(indices) / max(seconds, 1e-9):.1f} "
                  f"images/s{infer.gpu_peak()}) of {part['dataset']}", flush=True)
        del model, template
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = cli.parser("tools.model.shards", __doc__)
    ap.add_argument("action", choices=["worker"])
    ap.add_argument("spec", help="the shard's job file (written by run_shards)")
    args = ap.parse_args(argv)

    def step() -> None:
        spec = json.loads(Path(args.spec).read_text(encoding="utf-8"))
        with infer.out_of_memory_hint(spec["batch_size"]):
            worker(spec)

    return cli.run(step, errors=(DataError, FileNotFoundError, infer.ScoringOutOfMemory))


if __name__ == "__main__":
    sys.exit(main())
