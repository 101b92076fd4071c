"""Collection-phase scaling: `fisher_core.estimate` on 1 and on N processes, same global data.

    python -m benchmarks.speed.scaling --nprocs 1 2 --preset small --batches 8

For each process count this launches `torchrun --nproc_per_node N` (gloo on CPU, nccl on CUDA) on
this file; every process builds the same model, takes its share of the same global batches
(`batches[rank::N]`) and times `estimate` (its forwards/backwards plus the final all-reduce of the
sums) and then `select` (each process solves its share of the layers, then all gather), each between
two barriers. Reported: the slowest process's times, and the speed-ups over 1 process.
On CPU every process gets `--threads` intra-op threads (default 1), so N processes use N cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    from benchmarks.speed.workload import PRESETS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nprocs", nargs="+", type=int, default=[1, 2])
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--batches", type=int, default=8, help="global batches (split over the processes)")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--selector", default="natural", help="decides whether the mean gradient is collected")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process (CPU)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank the selection solves for")
    p.add_argument("--port", type=int, default=29531)
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)  # internal: result file
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """One torchrun process: estimate on this rank's share, write the timing (rank 0)."""
    import torch
    import torch.distributed as dist

    from benchmarks.speed.workload import PRESETS, build_model, make_batches
    from fisher_core import FisherConfig, estimate, select

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(args.threads)
    shape = PRESETS[args.preset]
    model = build_model(shape, device=device)
    batches = make_batches(
        shape.vocab, num_batches=args.batches, batch_size=args.batch_size, seq_len=args.seq_len, device=device
    )
    local = batches[rank::world]
    config = FisherConfig(selector=args.selector, num_batches=len(local), stop_tol=None, progress=False)
    with torch.no_grad():  # warm-up, as in compare.py
        model(**{k: v for k, v in local[0].items() if k != "labels"})
    dist.barrier()
    t = time.perf_counter()
    stats = estimate(model, local, target_modules=list(shape.linears()), config=config)
    if cuda:
        torch.cuda.synchronize()
    dist.barrier()
    collect = time.perf_counter() - t
    t = time.perf_counter()
    select(stats, model, rank=args.rank, config=config)  # each process solves its share of the layers
    dist.barrier()
    seconds = torch.tensor([collect, time.perf_counter() - t], dtype=torch.float64, device=device)
    dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    if rank == 0:
        record = {
            "nprocs": world,
            "seconds": float(seconds[0]),
            "select_seconds": float(seconds[1]),
            "tokens": stats.num_tokens,
            "device": device,
        }
        args.worker.write_text(json.dumps(record))
    dist.barrier()  # tear gloo down together: a rank leaving first aborted its peer once, under load
    dist.destroy_process_group()


def launch(args: argparse.Namespace, nprocs: int) -> dict:
    """Run the workers under torchrun; return rank 0's record."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        forwarded = [
            "--preset",
            args.preset,
            "--batches",
            str(args.batches),
            "--batch-size",
            str(args.batch_size),
            "--seq-len",
            str(args.seq_len),
            "--selector",
            args.selector,
            "--threads",
            str(args.threads),
            "--rank",
            str(args.rank),
        ]
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nprocs),
            "--master_port",
            str(args.port),
            "-m",
            "benchmarks.speed.scaling",
            *forwarded,
            "--worker",
            str(out),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not out.exists():
            raise RuntimeError(f"torchrun with {nprocs} processes failed:\n{done.stderr[-3000:]}")
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker is not None:
        worker(args)
        return
    records = [launch(args, n) for n in args.nprocs]
    one = next((r for r in records if r["nprocs"] == 1), None)
    print("| processes | collection s | speed-up | selection s | speed-up | tokens (global) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in records:
        up = [f"{one[k] / r[k]:.2f}" if one else "–" for k in ("seconds", "select_seconds")]
        print(
            f"| {r['nprocs']} | {r['seconds']:.2f} | {up[0]} | {r['select_seconds']:.2f} | {up[1]} | {r['tokens']} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
