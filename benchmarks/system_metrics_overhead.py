"""What MLflow's system-metrics monitor costs a training step.

    python benchmarks/system_metrics_overhead.py [--interval 1] [--blocks 8] [--block-seconds 6]

Training stages sample CPU, memory, disk and network use on a background thread
(`tracking.system_metrics_interval`, 10 s by default) and log them to the run. This runs
`tiny` pretraining steps (batch 16 x 128 tokens, forward, loss, backward, AdamW) in blocks of
`--block-seconds`, alternating blocks with the monitor on (sampling every `--interval` seconds,
logging to a real sqlite store) and off, so load from other processes hits both alike. Prints
the median step time of each and their ratio, and the CPU time the monitor's thread used per
sample (read from /proc, so it does not depend on load).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.kernels import cpu_capability  # noqa: E402
from pipeline.model import GPT, GPTConfig  # noqa: E402
from pipeline.train.losses import lm_loss  # noqa: E402


def thread_cpu_seconds(native_id: int) -> float:
    """User + system CPU time of one of this process's threads."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between samples")
    parser.add_argument("--blocks", type=int, default=8, help="blocks per contender")
    parser.add_argument("--block-seconds", type=float, default=6.0)
    args = parser.parse_args()

    import mlflow
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny")).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(0, 50257, (16, 129))

    def step() -> float:
        start = time.perf_counter()
        loss = lm_loss(model, (batch[:, :-1], batch[:, 1:]))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        client = mlflow.MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("overhead")).info.run_id
        times: dict[str, list[float]] = {"on": [], "off": []}
        monitor_cpu, samples = 0.0, 0
        for _ in range(3):
            step()  # warm-up
        for block in range(2 * args.blocks):
            contender = "on" if block % 2 == 0 else "off"
            monitor = None
            if contender == "on":
                monitor = SystemMetricsMonitor(
                    run_id, sampling_interval=args.interval, tracking_uri=uri,
                    resume_logging=block > 0,
                )  # fmt: skip
                before = set(threading.enumerate())
                monitor.start()
                thread = next(t for t in threading.enumerate() if t not in before)
            end = time.perf_counter() + args.block_seconds
            while time.perf_counter() < end:
                times[contender].append(step())
            if monitor is not None:
                cpu = thread_cpu_seconds(thread.native_id)
                monitor.finish()
                monitor_cpu += cpu
        history = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
        samples = len(history)

    on, off = statistics.median(times["on"]), statistics.median(times["off"])
    print(f"CPU capability: {cpu_capability()}, torch threads: {torch.get_num_threads()}, "
          f"load: {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(f"steps: {len(times['on'])} with the monitor, {len(times['off'])} without")
    print(f"median step: {on * 1e3:.1f} ms with the monitor every {args.interval:g} s, "
          f"{off * 1e3:.1f} ms without; ratio {on / off:.3f}")  # fmt: skip
    per_sample = monitor_cpu / max(samples, 1)
    print(f"monitor thread: {monitor_cpu * 1e3:.0f} ms CPU for {samples} samples logged "
          f"= {per_sample * 1e3:.1f} ms per sample "
          f"({per_sample / args.interval * 100:.2f}% of one core at this interval)")  # fmt: skip


if __name__ == "__main__":
    main()
