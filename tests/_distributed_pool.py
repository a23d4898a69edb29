"""Two gloo processes on localhost that run test cases, one pool per test module.

Starting processes and a process group costs seconds, so a module starts one
:class:`Pool` (a fixture) and sends it cases: module-level functions
``case(rank, world, **kwargs)`` whose results (NumPy arrays, numbers, strings)
come back in rank order.  An exception in a case comes back as
``CaseFailed`` with the failing ranks and the first one's message, so ``pytest.raises(match=...)``
works on it.
"""
import multiprocessing as mp
import os
import queue
import socket
import traceback


class CaseFailed(Exception):
    """A case raised in a worker; the message is ``"<Type>: <message>"``."""


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, tasks, results, group_timeout):
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=group_timeout),
    )
    while True:
        task = tasks.get()
        if task is None:
            break
        function, kwargs = task
        try:
            results.put((rank, "ok", function(rank, world, **kwargs)))
        except BaseException as error:  # report every failure to the test
            results.put((rank, "error", f"{type(error).__name__}: {error}", traceback.format_exc()))
    dist.destroy_process_group()


class Pool:
    def __init__(self, world=2, group_timeout=60):
        context = mp.get_context("spawn")
        self.world = world
        port = free_port()
        self.tasks = [context.Queue() for _ in range(world)]
        self.results = context.Queue()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self.processes = [
            context.Process(target=_worker, args=(r, world, port, self.tasks[r], self.results, group_timeout),
                            daemon=True)
            for r in range(world)
        ]
        for p in self.processes:
            p.start()

    def run(self, function, timeout=120, **kwargs):
        """``function(rank, world, **kwargs)`` on every worker; the results in rank order."""
        for q in self.tasks:
            q.put((function, kwargs))
        return self.collect(timeout)

    def collect(self, timeout=120, ranks=None):
        ranks = list(range(self.world)) if ranks is None else ranks
        answers = {}
        while len(answers) < len(ranks):
            try:
                item = self.results.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"workers did not answer within {timeout} s") from None
            answers[item[0]] = item
        errors = sorted((a for a in answers.values() if a[1] == "error"), key=lambda a: a[0])
        if errors:
            failing = sorted(a[0] for a in errors)
            raise CaseFailed(f"ranks {failing} failed; {errors[0][2]}\n{errors[0][3]}")
        return [answers[r][2] for r in ranks]

    def close(self, grace=10):
        for q in self.tasks:
            try:
                q.put(None)
            except Exception:
                pass
        for p in self.processes:
            p.join(timeout=grace)
            if p.is_alive():
                p.kill()
                p.join()
