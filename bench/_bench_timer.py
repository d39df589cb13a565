"""Bench-only swift plugin (bench/multi_gpu.py passes it with --external_plugins; not in swift_plugins/, so train.sh
never loads it): `--callbacks bench_timer` times every optimizer step on every training process and writes, after
each step, $BENCH_RESULT.rank<RANK>.json: step times, samples/s over the steps after $BENCH_WARMUP (samples per
step = per-device batch x accumulation x world size, the global batch), peak GPU memory of this process."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch
from swift.callbacks import TrainerCallback, callbacks_map


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class BenchTimer(TrainerCallback):

    def __init__(self, args, trainer):
        super().__init__(args, trainer)
        self.times: list[float] = []

    def on_train_begin(self, args, state, control, **kwargs):
        _sync()
        self.times = [time.perf_counter()]

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        self.times.append(time.perf_counter())
        path = os.environ.get("BENCH_RESULT")
        if not path:
            return
        steps = [b - a for a, b in zip(self.times[:-1], self.times[1:])]
        warm = int(os.environ.get("BENCH_WARMUP", "2"))
        measured = steps[warm:] if len(steps) > warm else steps
        global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        gib = 1024 ** 3
        data = {"rank": int(os.environ.get("RANK", "0")), "world_size": args.world_size,
                "batch_size": args.per_device_train_batch_size, "grad_accum": args.gradient_accumulation_steps,
                "global_batch": global_batch, "step_times": [round(s, 3) for s in steps],
                "measured_steps": len(measured), "s_per_step": round(sum(measured) / len(measured), 3),
                "samples_per_s": round(global_batch * len(measured) / sum(measured), 3),
                "deepspeed": bool(getattr(args, "deepspeed", None)),
                "gradient_checkpointing": args.gradient_checkpointing}
        if torch.cuda.is_available():
            data.update(peak_reserved_gib=round(torch.cuda.max_memory_reserved() / gib, 2),
                        peak_allocated_gib=round(torch.cuda.max_memory_allocated() / gib, 2),
                        device=torch.cuda.get_device_name())
        Path(f"{path}.rank{data['rank']}.json").write_text(json.dumps(data, indent=1))


callbacks_map["bench_timer"] = BenchTimer
