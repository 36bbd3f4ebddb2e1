"""Stress the differentiable row gather on 2 gloo processes: does it ever crash?

Each step does what `pairwise_infonce` does per modality pair: gather three
[16, 32] embeddings with gradient, gather a mask, all-reduce two small
tensors, backward through the gathers, all-reduce the weight gradient.

    python benchmarks/gather_stress.py [--impl calmrl|functional] [--steps 3000] [--runs 2]

`calmrl` is `pretrain.distributed.gather_rows` (synchronous all_gather_single
forward, reduce_scatter_single backward); `functional` is torch's
`_functional_collectives.all_gather_tensor_autograd`, which it replaced
because this script crashes it on gloo (heap corruption: "malloc(): unaligned
tcache chunk detected", exit code -6 or -11; the other rank then fails with
"Connection reset by peer"). Prints one line per run and a summary.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

from pretrain.runtime import free_port


def worker(rank: int, impl: str, steps: int, port: int) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    if impl == "functional":
        from torch.distributed._functional_collectives import all_gather_tensor_autograd

        def gather(x):
            return all_gather_tensor_autograd(x.contiguous(), 0, dist.distributed_c10d._get_default_group())
    else:
        from pretrain.distributed import gather_rows as gather
    from pretrain.distributed import all_reduce_sum, gather_rows_nograd

    torch.manual_seed(rank)
    weight = torch.randn(32, 32, requires_grad=True)
    for _ in range(steps):
        emb = [torch.randn(16, 32) @ weight for _ in range(3)]
        gathered = [gather(e) for e in emb]
        gather_rows_nograd(torch.ones(16, 3, dtype=torch.uint8))
        all_reduce_sum(torch.ones(3, dtype=torch.float64))
        loss = sum((emb[a] @ gathered[b].T).logsumexp(1).mean() for a in range(3) for b in range(3) if a != b)
        all_reduce_sum(torch.zeros(3, dtype=torch.float64))
        loss.backward()
        dist.all_reduce(weight.grad)
        weight.grad = None
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["calmrl", "functional"], default="calmrl")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    crashed = 0
    for run in range(args.runs):
        start = time.perf_counter()
        port = free_port()
        procs = [ctx.Process(target=worker, args=(r, args.impl, args.steps, port)) for r in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        codes = [p.exitcode for p in procs]
        ok = codes == [0, 0]
        crashed += not ok
        print(
            f"run {run}: {'ok' if ok else 'CRASHED'}  exit codes {codes}  {time.perf_counter() - start:.0f}s",
            flush=True,
        )
    print(f"gather_stress impl={args.impl}: {crashed}/{args.runs} runs of {args.steps} steps crashed")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
