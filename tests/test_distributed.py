"""Two CPU processes on the gloo backend: data-parallel unlearning and sharded statistics.

Data parallel: two ranks, each with half of the global batch (halves of different token counts),
take exactly the step one process takes with the whole batch, and rank 0 records the same
statistics.

Sharded, at two levels: (1) every tensor split by hand in two contiguous shards, one per rank,
where with ``shard_sum`` the strategies (per-tensor PCGrad's dot product included) and the
statistics equal their unsharded values; (2) the engine on a model wrapped with FSDP2
``fully_shard`` (gloo, CPU), whose step and record equal one process's.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from geomkit import statistics as gstats
from geomkit.strategies import build, names

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _gradients(seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(6, 10), (33,), (4096 + 7,), (5, 5)]
    forget = [torch.randn(s, generator=g) for s in shapes]
    retain = [torch.randn(s, generator=g) - 0.3 * f for s, f in zip(shapes, forget, strict=True)]
    forget[3] = -2.0 * retain[3]  # a tensor whose projection certainly fires
    return forget, retain


def _shard(t: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    return t.reshape(-1).tensor_split(world)[rank].clone()


def _sharded_worker(rank: int, world: int, port: int, out: str) -> None:
    from geomkit.distributed import shard_sum

    _init(rank, world, port)
    forget, retain = _gradients()
    fs = [_shard(f, rank, world) for f in forget]
    rs = [_shard(r, rank, world) for r in retain]
    reduce = shard_sum()
    results = {}
    every = [build(n, alpha=0.7, gamma=1.3) for n in names()]
    for strategy in every:
        results[f"update_{strategy.name}"] = [d.numpy() for d in strategy(fs, rs, shard_sum=reduce)]
    applied = build("pcgrad")
    d = applied(fs, rs, shard_sum=reduce)
    results["sufficient"] = gstats.to_numpy(
        gstats.sufficient(fs, rs, d, strategy=applied, shard_sum=reduce)
    )
    results["shadow"] = gstats.to_numpy(gstats.shadow(fs, rs, every, shard_sum=reduce))
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_sharded_strategies_and_statistics_equal_unsharded(tmp_path: Path) -> None:
    world = 2
    mp.spawn(_sharded_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    forget, retain = _gradients()
    every = [build(n, alpha=0.7, gamma=1.3) for n in names()]
    for strategy in every:
        expected = strategy(forget, retain)
        for j, e in enumerate(expected):
            got = np.concatenate([ranks[r][f"update_{strategy.name}"][j] for r in range(world)])
            np.testing.assert_allclose(
                got, e.reshape(-1).numpy(), rtol=1e-6, atol=1e-6, err_msg=strategy.name
            )
    applied = build("pcgrad")
    d = applied(forget, retain)
    want_sufficient = gstats.to_numpy(gstats.sufficient(forget, retain, d, strategy=applied))
    want_shadow = gstats.to_numpy(gstats.shadow(forget, retain, every))
    for r in range(world):  # every rank holds the whole-tensor statistics
        np.testing.assert_allclose(ranks[r]["sufficient"], want_sufficient, rtol=1e-9, atol=1e-6)
        np.testing.assert_allclose(ranks[r]["shadow"], want_shadow, rtol=1e-9, atol=1e-6)


def test_shard_local_pcgrad_differs_from_whole_tensor_pcgrad() -> None:
    """The released code's ZeRO-3 behaviour (shard-local dot products) is not PCGrad: the check
    above would catch it. Here one shard conflicts and the whole tensor does not."""
    f = torch.tensor([-3.0, 1.0, 1.0, 1.0])
    r = torch.tensor([1.0, 1.0, 1.0, 1.0])
    pcgrad = build("pcgrad")
    whole = pcgrad([f], [r])[0]
    shard_local = torch.cat([pcgrad([f[:2]], [r[:2]])[0], pcgrad([f[2:]], [r[2:]])[0]])
    assert torch.equal(whole, f + r)  # <f, r> = 0: no projection
    assert not torch.allclose(shard_local, whole)


# ----------------------------------------------------------------------------------------------
# data-parallel unlearning
# ----------------------------------------------------------------------------------------------


def _tiny_model():
    from tiny import tiny_llama

    return tiny_llama(0)


def _batches(seed: int, rows: slice, n: int = 4) -> list[dict[str, torch.Tensor]]:
    """Rows 0-1 short, rows 2-3 long (right padding, -100 labels on padding and on a prompt
    token): the two ranks' halves hold different token counts, so only the global token mean
    makes two ranks equal one process."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randint(0, 64, (4, 12), generator=g)
        lengths = torch.tensor([3, 6, 12, 10])
        mask = (torch.arange(12) < lengths[:, None]).long()
        labels = x.masked_fill(mask == 0, -100)
        labels[:, 1] = -100
        batch = {"input_ids": x, "attention_mask": mask, "labels": labels}
        out.append({k: v[rows] for k, v in batch.items()})
    return out


def _run(
    rows: slice, out: Path | None, shard: bool = False, strategy: str = "sago"
) -> dict[str, torch.Tensor]:
    from geomkit.engine import EngineConfig, Unlearner
    from geomkit.objectives import build_objective

    model = _tiny_model()
    if shard:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    config = EngineConfig(
        strategy=strategy, lr=1e-3, steps=2, accumulation=2, record_every=1, flush_every=1
    )
    unlearner = Unlearner(
        model,
        build_objective("graddiff"),
        _batches(1, rows),
        _batches(2, rows),
        config,
        out=out,
    )
    unlearner.run()
    return {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def _engine_worker(rank: int, world: int, port: int, out: str, mode: str, strategy: str) -> None:
    _init(rank, world, port)
    half = slice(2 * rank, 2 * rank + 2)
    state = _run(half, Path(out) / mode, shard=mode == "fsdp", strategy=strategy)
    torch.save(state, Path(out) / f"{mode}_rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.parametrize(
    ("mode", "strategy"), [("ddp", "sago"), ("fsdp", "pcgrad")], ids=["ddp-sago", "fsdp2-pcgrad"]
)
def test_two_processes_equal_one_process(tmp_path: Path, mode: str, strategy: str) -> None:
    """Data parallel (whole gradients summed per window) and FSDP2 (gradient shards,
    statistics and per-tensor PCGrad dot products summed over ranks) both equal one process
    with the whole global batch, on halves of different token counts."""
    import geomkit

    world = 2
    mp.spawn(
        _engine_worker, args=(world, _free_port(), str(tmp_path), mode, strategy), nprocs=world
    )
    single = _run(slice(0, 4), tmp_path / "single", strategy=strategy)
    states = [torch.load(tmp_path / f"{mode}_rank{r}.pt") for r in range(world)]
    for name, value in single.items():
        for r in range(world):  # every rank took the same step as the single process
            # AdamW turns float noise in a near-zero gradient coordinate into ~lr-sized steps
            torch.testing.assert_close(states[r][name], value, rtol=1e-5, atol=1e-5)
    ddp, one = geomkit.open_run(tmp_path / mode), geomkit.open_run(tmp_path / "single")
    assert ddp.attrs["world_size"] == 2 and one.attrs["world_size"] == 1
    assert (ddp.numel.values == one.numel.values).all()
    for var in ("ff", "rr", "fr", "dd", "df", "dr", "forget_loss", "retain_loss", "grad_norm"):
        want = one[var].values  # float32 gradients summed in another order: relative to scale
        atol = 1e-5 * np.nanmax(np.abs(want))
        np.testing.assert_allclose(ddp[var].values, want, rtol=1e-4, atol=atol, err_msg=var)
    # the step statistics: u modelled on every rank (shards summed under FSDP2); AdamW turns
    # float noise in near-zero gradient coordinates into lr-sized steps, hence 1e-3
    assert np.isfinite(ddp["uu"].values).all()
    for var in ("uu", "uf", "ur", "ud", "dd_step"):
        want = one[var].values
        atol = 1e-3 * np.nanmax(np.abs(want))
        np.testing.assert_allclose(ddp[var].values, want, rtol=1e-3, atol=atol, err_msg=var)
    np.testing.assert_array_equal(ddp.n_projected.values, one.n_projected.values)
    for var in ("n_conflict", "n_opposed"):
        # counts may differ only at coordinates whose sign is decided by float noise
        assert np.abs(ddp[var].values - one[var].values).max() <= 2, var


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
