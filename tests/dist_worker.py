"""Run several `ebft run` jobs in one torch.distributed process group (started by torchrun), so the
distributed tests pay the processes' start once. Not a test module: tests/test_distributed.py runs it.

    torchrun --nproc-per-node 2 tests/dist_worker.py jobs.json

``jobs.json``: a list of ``{"args": [ebft run arguments], "fail_at": [point, index] | null}``; a job
with ``fail_at`` raises there on every rank (an in-process stand-in for a kill: the checkpoint stays).
"""
import json
import sys

import torch
import torch.distributed as dist


class Killed(BaseException):
    """An injected stop at a kill point, handled by nothing of ebft's (like SIGKILL)."""


def main(path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    from ebft import checkpoint
    from ebft.cli import build_parser, config_from_args
    from ebft.pipeline import run

    for job in json.loads(open(path).read()):
        config = config_from_args(build_parser().parse_args(["run", *job["args"]]))
        fail = job.get("fail_at")

        def hook(point, index=None, fail=fail):
            if fail and point == fail[0] and index == fail[1]:
                raise Killed("injected")
        checkpoint.kill_hook = hook
        try:
            run(config)
        except Killed as exc:
            if "injected" not in str(exc):
                raise
        finally:
            checkpoint.kill_hook = None
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
