"""Data-parallel training under ``torchrun`` (torch.distributed).

``edgebuild build --nproc N`` re-runs the build as ``python -m torch.distributed.run
--nproc-per-node N --standalone -m edgebuild build ...``; ``torchrun ... -m edgebuild build``
by hand (several machines included) works the same, detected from WORLD_SIZE/RANK/LOCAL_RANK.

What runs where:

- every rank loads the data and plans the build; rank 0's cache decisions are broadcast, so all
  ranks agree which shared training stages (transfer, prune recovery) run;
- those stages train with DistributedDataParallel: every epoch's seeded permutation is the same
  on all ranks, each rank takes a disjoint shard of it (like DistributedSampler: padded to a
  multiple of the world size, rank r takes every world-th index) in local batches of
  ceil(batch_size / world), so one global step sees about ``batch_size`` samples, as in a
  single-process build;
- BatchNorm is not converted to SyncBatchNorm (it needs CUDA): during training each rank
  normalises with its local batch's statistics, and the running statistics kept in the model are
  rank 0's, broadcast with the weights after every epoch, so every rank holds the same model;
- only rank 0 reads or writes the cache, exports, quantizes, validates and bundles; the other
  ranks write their stage outputs to private temporary folders, then wait for rank 0's exit
  status and exit with it;
- gloo on CPU, NCCL for CUDA tensors (``cpu:gloo,cuda:nccl`` where CUDA is present); every
  collective times out after EDGEBUILD_DIST_TIMEOUT seconds (default 300); the final wait for
  rank 0's status after EDGEBUILD_DIST_WAIT_TIMEOUT (default 6 h, rank 0 may validate for long).

The launcher side (``--nproc``'s parent process, the status file and exit codes) is in
``edgebuild.launcher``; its names stay importable from here.

A rank that fails exits non-zero at once; its peers see the closed connection (or the timeout)
and torchrun's agent stops the remaining workers, so a failure never hangs the group.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from .lazy import torch
from .launcher import STATUS_FILE_ENV, exit_code_of, relaunch, write_status_file  # noqa: F401 - the launcher side, importable from here too

TIMEOUT_ENV = "EDGEBUILD_DIST_TIMEOUT"
WAIT_TIMEOUT_ENV = "EDGEBUILD_DIST_WAIT_TIMEOUT"
FAIL_RANK_ENV = "EDGEBUILD_TEST_FAIL_RANK"


class _State:
    status_group = None
    released = False  # rank 0 has let the workers go (they wait for its exit status)
    private_dirs: list[Path] = []


_state = _State()


# ------------------------------------------------------------------------------ who am I
def launched() -> bool:
    """Started by torchrun (or an equivalent launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def active() -> bool:
    if "torch.distributed" not in sys.modules:  # never imported: no process group (and no 1 s import)
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def training() -> bool:
    """In the shared training stages of a multi-process build (all ranks take part)."""
    return active() and not _state.released


def rank() -> int:
    if not active():
        return 0
    import torch.distributed as dist

    return dist.get_rank()


def world_size() -> int:
    if not active():
        return 1
    import torch.distributed as dist

    return dist.get_world_size()


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if launched() else 0


def is_main() -> bool:
    return rank() == 0


def backend_for(device: torch.device) -> str | None:
    """The backend the collectives of training on ``device`` use (None: single process)."""
    if not active():
        return None
    return "nccl" if device.type == "cuda" else "gloo"


def _seconds(env: str, default: float) -> float:
    raw = os.environ.get(env)
    if not raw:
        return default
    try:
        v = float(raw)
        if v <= 0:
            raise ValueError
        return v
    except ValueError:
        from .errors import ConfigError

        raise ConfigError(f"{env}={raw!r} is not a positive number of seconds", hint=f"e.g. {env}=300") from None


# ------------------------------------------------------------------------------ lifecycle
def init() -> None:
    """Join the process group torchrun set up (env://), with explicit timeouts."""
    import torch.distributed as dist

    if not launched() or dist.is_initialized():
        return
    timeout = timedelta(seconds=_seconds(TIMEOUT_ENV, 300.0))
    if torch.cuda.is_available():
        lr = local_rank()
        if lr >= torch.cuda.device_count():
            from .errors import ConfigError

            raise ConfigError(f"LOCAL_RANK {lr} but only {torch.cuda.device_count()} CUDA device(s) here",
                              hint="start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(lr)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, timeout=timeout)
    if dist.get_rank() != 0:  # the workers would repeat rank 0's warnings word for word
        import warnings

        warnings.simplefilter("ignore")
    # rank 0 may export, quantize and validate for long after training: the final wait for its
    # exit status gets its own group and a long timeout (a dead rank 0 still ends it at once)
    _state.status_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=_seconds(WAIT_TIMEOUT_ENV, 6 * 3600.0)))
    _state.released = False


def end_of_training() -> bool:
    """Called by every rank where the shared training stages are over. True on the workers:
    they leave the build there and wait for rank 0's status; rank 0 goes on alone."""
    if not active():
        return False
    _state.released = True
    return not is_main()


def finish(code: int) -> int:
    """Leave the group at the end of the command. Rank 0 publishes its exit status (when the
    workers are waiting for it) and returns ``code``; a worker returns rank 0's status."""
    import torch.distributed as dist

    try:
        if not active():
            return code
        if is_main() or code:
            write_status_file(code)
            if _state.released:
                dist.broadcast_object_list([code], src=0, group=_state.status_group)
            else:
                return code  # failed during training: exit now, the peers see the broken group
        else:
            if not _state.released:
                return code
            box = [None]
            try:
                dist.broadcast_object_list(box, src=0, group=_state.status_group)
            except Exception as e:  # noqa: BLE001 - rank 0 died while the workers waited
                print(f"error: rank {rank()}: lost rank 0 while waiting for its exit status ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                      file=sys.stderr, flush=True)
                return 1
            code = int(box[0])
        dist.destroy_process_group()
        return code
    finally:
        for d in _state.private_dirs:
            shutil.rmtree(d, ignore_errors=True)
        _state.private_dirs.clear()


def lost_peers(exc: BaseException) -> bool:
    """A collective failed because another rank died or did not answer in time."""
    import torch.distributed as dist

    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in ("gloo", "Gloo", "NCCL", "Connection closed by peer",
                                                                      "Connection reset by peer", "Timed out"))


def lost_peers_message(exc: BaseException) -> str:
    first = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    return (f"error: rank {rank()}: a collective operation failed ({first[:200]})\n"
            f"hint: another rank has probably failed (its error is above) or did not answer within "
            f"{TIMEOUT_ENV}={os.environ.get(TIMEOUT_ENV, '300')} seconds")


# ------------------------------------------------------------------------------ collectives
def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank."""
    import torch.distributed as dist

    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    import torch.distributed as dist

    if active():
        dist.barrier()


def sum_all(*values: float) -> list[float]:
    """Element-wise sums of ``values`` over all ranks (float64, on the CPU)."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64)
    if active():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def broadcast_module(model: torch.nn.Module, buffers_only: bool = False) -> None:
    """Rank 0's parameters (unless ``buffers_only``) and buffers on every rank, in place."""
    import torch.distributed as dist

    if not active():
        return
    tensors = list(model.buffers()) if buffers_only else [*model.parameters(), *model.buffers()]
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t.data, src=0)


def shard_bounds(n: int, r: int | None = None, w: int | None = None) -> tuple[int, int]:
    """Rank r's (default: this rank's) contiguous slice [lo, hi) of n items among w ranks
    (sizes differ by at most one)."""
    w = world_size() if w is None else w
    r = rank() if r is None else r
    per, extra = divmod(n, w)
    lo = r * per + min(r, extra)
    return lo, lo + per + (1 if r < extra else 0)


def epoch_shard(perm: torch.Tensor, r: int | None = None, w: int | None = None) -> torch.Tensor:
    """Rank r's (default: this rank's) disjoint share of an epoch's permutation, as
    DistributedSampler does it: padded to a multiple of the world size with its first
    indices, then every w-th index from r. All ranks get the same length (same step count)."""
    w = world_size() if w is None else w
    r = rank() if r is None else r
    if w == 1:
        return perm
    total = math.ceil(len(perm) / w) * w
    if total > len(perm):
        perm = torch.cat([perm, perm[: total - len(perm)]])
    return perm[r:total:w]


def gather_rows(local: np.ndarray, n_total: int) -> np.ndarray:
    """Concatenate every rank's rows (rank order) from contiguous shards of n_total items."""
    import torch.distributed as dist

    if not active():
        return local
    w = world_size()
    per = math.ceil(n_total / w)
    src = torch.as_tensor(np.ascontiguousarray(local))
    t = torch.zeros((per, *src.shape[1:]), dtype=src.dtype)
    t[: len(src)] = src
    out = [torch.empty_like(t) for _ in range(w)]
    dist.all_gather(out, t)
    parts = []
    for r in range(w):
        lo, hi = shard_bounds(n_total, r, w)
        parts.append(out[r][: hi - lo])
    return torch.cat(parts).numpy()


# ------------------------------------------------------------------------------ shared stages
def run_shared(cached: bool, get_hit: Callable[[], Optional[Path]], build_main: Callable[[], Path],
               build_private: Callable[[Path], Any]) -> Path:
    """One shared training stage on every rank. ``cached`` is rank 0's decision (already the
    same on all ranks). Rank 0 reads or fills the cache; workers train along into a private
    folder, or receive a copy of rank 0's cache entry, and never touch the cache."""
    if cached:
        hit = get_hit() if is_main() else None
        files = None
        if is_main() and hit is not None:
            files = {p.relative_to(hit).as_posix(): p.read_bytes() for p in sorted(hit.rglob("*")) if p.is_file() and p.name != "entry.json"}
        files = broadcast_object(files if is_main() else None)
        if files is None:
            from .errors import EdgebuildError

            raise EdgebuildError("a cache entry vanished during the build (another process cleared the cache?)", hint="run the build again")
        if is_main():
            return hit
        d = private_dir()
        for rel, data in files.items():
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(data)
        return d
    if is_main():
        path = build_main()
    else:
        path = private_dir()
        build_private(path)
    barrier()  # rank 0 has written its cache entry (and measured alone) before anyone goes on
    return path


def private_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix=f"edgebuild-rank{rank()}-"))
    _state.private_dirs.append(d)
    return d


def sync_cached(steps: list) -> None:
    """Rank 0's cache decisions (``step.cached``, ``step.reason``) on every rank."""
    if not active():
        return
    decided = broadcast_object([(s.key, s.cached, s.reason) for s in steps] if is_main() else None)
    if [k for k, _, _ in decided] != [s.key for s in steps]:
        from .errors import EdgebuildError

        raise EdgebuildError("the ranks planned different builds (different data, config or package versions on some node?)",
                             hint="every node needs the same project files, data and package versions")
    for s, (_, cached, reason) in zip(steps, decided):
        s.cached, s.reason = cached, reason


# ------------------------------------------------------------------------------ testing
def maybe_fail(where: str) -> None:
    """Fault injection for the tests: EDGEBUILD_TEST_FAIL_RANK=R makes rank R raise here."""
    target = os.environ.get(FAIL_RANK_ENV)
    if target is not None and target.strip() == str(rank()):
        from .errors import EdgebuildError

        raise EdgebuildError(f"injected failure on rank {rank()} during {where} ({FAIL_RANK_ENV}={target})",
                             hint=f"unset {FAIL_RANK_ENV}; it exists to test failure handling")
