"""The criterion's training forward goes through the model's own ``forward``, so fairseq's default
``--ddp-backend pytorch_ddp`` (torch's DistributedDataParallel, wrapped in fairseq's
``ModuleProxyWrapper`` exactly as ``models/distributed_fairseq_model.py`` wraps it) all-reduces the
gradients. Two gloo ranks on CPU, each on its own batch, must end one SGD update with the parameters of
one process that averages the gradients of both batches. A criterion that called ``model.encoder`` /
``model.decoder`` directly would bypass the wrapper's forward: no all-reduce, each rank keeps its own
gradient, and this test fails (checked by hand when it was written).
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import random_batch, tiny_model

LR = 0.5  # a large SGD step: a missing all-reduce moves the parameters far apart


def build(stage):
    extra = ("--depth-estimator", "token-geometric") if stage == "estimator" else ()
    model, task, _ = tiny_model(extra=extra, seed=3)
    model.train()
    from fairseq_dat.criterions.adaptive_label_smoothed_cross_entropy import (
        AdaptiveLabelSmoothedCrossEntropyCriterion as Criterion)
    kwargs = {"exit_training": "mixed", "mixed_samples": 2} if stage == "mixed" else {}
    if stage == "estimator":
        kwargs["exit_loss_alpha"] = 1.0
    crit = Criterion(task, sentence_avg=False, label_smoothing=0.1, **kwargs)
    return model, task, crit


def batch(task, rank):
    d = task.target_dictionary
    net_input, target = random_batch(d, bsz=3, tgt_len=5, seed=100 + rank)
    return {"net_input": net_input, "target": target, "ntokens": int(target.ne(d.pad()).sum()),
            "id": torch.arange(3)}


def sgd_step(model, loss):
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= LR * p.grad


def rank_main(rank, world, init_file, out_dir, stages):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from fairseq.distributed import ModuleProxyWrapper
    from torch.nn.parallel import DistributedDataParallel

    for stage in stages:  # one spawn for all stages: starting processes is the slow part
        model, task, crit = build(stage)
        wrapped = ModuleProxyWrapper(DistributedDataParallel(model, device_ids=None, broadcast_buffers=False,
                                                             find_unused_parameters=stage == "mixed"))
        torch.manual_seed(7)  # mixed: both ranks and the single process draw the same exits
        loss, _, _ = crit(wrapped, batch(task, rank))
        sgd_step(wrapped, loss)  # DDP averages the gradients over the ranks
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
                   os.path.join(out_dir, f"{stage}-rank{rank}.pt"))
    dist.destroy_process_group()


def single_process(stage):
    """One process, both batches: the mean of the two batches' gradients, as DDP averages them."""
    model, task, crit = build(stage)
    total = 0.0
    for rank in (0, 1):
        torch.manual_seed(7)
        loss, _, _ = crit(model, batch(task, rank))
        total = total + loss / 2
    sgd_step(model, total)
    return model.state_dict()


STAGES = ("aligned", "estimator", "mixed")


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(rank_main, args=(2, str(out / "init"), str(out), STAGES), nprocs=2, join=True)
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_pytorch_ddp_all_reduces_the_criterion_gradients(ddp_results, stage):
    ranks = [torch.load(ddp_results / f"{stage}-rank{r}.pt") for r in (0, 1)]
    expected = single_process(stage)
    initial = build(stage)[0].state_dict()
    moved = [k for k in expected if not torch.equal(expected[k], initial[k])]
    assert len(moved) > 10, "the update changed almost nothing: the test would not see a missing all-reduce"
    for key in expected:
        for r in (0, 1):
            torch.testing.assert_close(ranks[r][key], expected[key], rtol=1e-4, atol=1e-5,
                                       msg=lambda m, key=key, r=r: f"rank {r}, {key}: {m}")
