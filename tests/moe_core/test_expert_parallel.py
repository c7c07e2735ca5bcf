"""Expert parallelism over 2 gloo processes on CPU equals the ep_size=1 block and model with the
same seed: outputs, input grads, replicated grads (summed over ranks) and each rank's expert
shard grads; counters stay per rank; a size that does not divide the experts is refused.

The two ranks run every case in one spawn (module fixture) and report per case; each test
below reads its case. The reference is the ep_size=1 block run on each rank's slice of the
batch (capacity and drops are per rank), or on the concatenated batch where that is the same
function (no capacity, no aux loss).

Shape legend:
    B  sequences per rank
    L  sequence length
    D  model width
    V  vocabulary
"""

from __future__ import annotations

import json
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_core import ModelConfig, build_model
from moe_core.config import check_ep_size
from moe_core.expert_parallel import (
    EP_GROUPED,
    EP_LOOP,
    ExpertParallelDispatcher,
    sharded_parameter_names,
)
from moe_core.experts import RoutedExperts
from moe_core.grouped_mm import grouped_mm_unavailable_reason
from moe_core.moe import MoEBlock

WORLD = 2
ROWS = WORLD * 3  # sequences in the full batch: B = 3 per rank
BLOCK_CFG = ModelConfig(
    pattern="E", d_model=16, n_heads=2, ffn_hidden=16, expert_hidden=8, num_experts=4, top_k=2,
    seq_len=8,
)  # fmt: skip
CLOSE = {"rtol": 1e-4, "atol": 1e-5}


def _cfg(base: ModelConfig = BLOCK_CFG, **changes) -> ModelConfig:
    return ModelConfig(**{**vars(base), **changes})


def _blocks(cfg, backend, seed=0):
    """(EP block over the world, ep_size=1 block), both built and initialized from ``seed``."""
    pair = []
    for group in (dist.group.WORLD, None):
        torch.manual_seed(seed)
        block = MoEBlock(cfg, dispatch_backend=backend, ep_group=group)
        block.init_weights(0.3, 0.3)  # larger than nanoGPT init so differences are not tiny
        torch.nn.init.normal_(block.router.weight)  # decisive, uneven routing
        pair.append(block)
    return pair


def _batch(seed=1, length=5, width=16):
    """Input and upstream gradient, identical on every rank; rank r owns rows r*B to (r+1)*B."""
    gen = torch.Generator().manual_seed(seed)
    shape = (ROWS, length, width)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def _own(rank, rows):
    per_rank = rows // WORLD
    return slice(rank * per_rank, (rank + 1) * per_rank)


def _run(block, x_BLD, up_BLD, slices):
    """Output and grads of sum over slices of (out * up).sum() + block loss."""
    x_BLD = x_BLD.clone().requires_grad_()
    outs, total = [], torch.zeros(())
    for s in slices:
        out_BLD, loss = block(x_BLD[s])
        outs.append(out_BLD)
        total = total + (out_BLD * up_BLD[s]).sum() + loss
    total.backward()
    grads = {name: p.grad.clone() for name, p in block.named_parameters()}
    return torch.cat(outs).detach(), x_BLD.grad, grads


def _sum_replicated_grads(model, grads):
    """What data parallel does: sum the grads of replicated params over the group."""
    sharded = sharded_parameter_names(model)
    for name, grad in grads.items():
        if name not in sharded:
            dist.all_reduce(grad)
    return sharded


def _compare(rank, got, want, sharded, num_local):
    """Output and input grad of this rank's rows (None: not compared), then every param grad."""
    experts = slice(rank * num_local, (rank + 1) * num_local)
    if got[0] is not None:
        torch.testing.assert_close(got[0], want[0][_own(rank, want[0].shape[0])], **CLOSE)
    if got[1] is not None:
        torch.testing.assert_close(got[1], want[1][_own(rank, want[1].shape[0])], **CLOSE)
    assert set(got[2]) == set(want[2])
    for name, grad in got[2].items():
        expected = want[2][name][experts] if name in sharded else want[2][name]
        torch.testing.assert_close(grad, expected, msg=lambda m, n=name: f"{n}: {m}", **CLOSE)


def _check_block(rank, cfg, backend, *, concatenated=False, train=False):
    ep, ref = _blocks(cfg, backend)
    num_local = cfg.num_experts // WORLD
    for name in ("w13", "w2"):  # the shard is the matching slice of the full weights
        want = getattr(ref.experts, name)[rank * num_local : (rank + 1) * num_local]
        assert torch.equal(getattr(ep.experts, name), want)
    ep.train(train)
    ref.train(train)
    x_BLD, up_BLD = _batch()
    got = _run(ep, x_BLD[_own(rank, ROWS)], up_BLD[_own(rank, ROWS)], [slice(None)])
    sharded = _sum_replicated_grads(ep, got[2])
    assert sharded == {"experts.w13", "experts.w2"}
    slices = [slice(None)] if concatenated else [_own(r, ROWS) for r in range(WORLD)]
    _compare(rank, got, _run(ref, x_BLD, up_BLD, slices), sharded, num_local)
    return ep, ref, x_BLD


def case_no_capacity_matches_the_concatenated_batch(rank):
    cfg = _cfg(aux_loss_coeff=0.0)  # the aux loss is not additive over slices
    ep, _, _ = _check_block(rank, cfg, "loop", concatenated=True)
    assert (ep.dispatcher.observed, ep.dispatcher.fallback_reason) == (EP_LOOP, None)


def case_capacity_drops_per_rank_and_counters_stay_per_rank(rank):
    cfg = _cfg(capacity_factor=0.6, z_loss_coeff=0.01)
    ep, ref, x_BLD = _check_block(rank, cfg, "loop", train=True)
    got = ep.read_and_reset_counters()
    ref.read_and_reset_counters()
    with torch.no_grad():
        ref(x_BLD[_own(rank, ROWS)])  # this rank's tokens alone: the counters EP must report
    want = ref.read_and_reset_counters()
    assert int(got["dropped_per_expert"].sum()) > 0 and got["capacity"] == want["capacity"]
    for key in ("tokens_per_expert", "dropped_per_expert", "shared_only_tokens"):
        assert torch.equal(got[key], want[key]), key
    torch.testing.assert_close(got["aux_loss"], want["aux_loss"])


def case_null_slot_with_grouped_compute(rank):
    cfg = _cfg(null_slot=True, capacity_factor=1.0, drop_policy="position")
    ep, _, _ = _check_block(rank, cfg, "auto", train=True)
    counters = ep.read_and_reset_counters()
    assert counters["tokens_per_expert"].shape == (5,)  # global slots, null slot last
    assert int(counters["tokens_per_expert"][4]) > 0
    grouped = grouped_mm_unavailable_reason(torch.device("cpu"), torch.float32, 16, 8) is None
    assert ep.dispatcher.observed == (EP_GROUPED if grouped else EP_LOOP)


def case_rank_that_receives_no_rows(rank):
    # Every choice goes to expert 0 (rank 0): rank 1 sends all its rows and receives none.
    cfg = _cfg(top_k=1, score="sigmoid")
    for backend in ("grouped", "loop"):
        ep, ref = _blocks(cfg, backend)
        for block in (ep, ref):
            block.router.expert_bias[0] = 100.0
        x_BLD, up_BLD = _batch()
        got = _run(ep, x_BLD[_own(rank, ROWS)], up_BLD[_own(rank, ROWS)], [slice(None)])
        sharded = _sum_replicated_grads(ep, got[2])
        want = _run(ref, x_BLD, up_BLD, [_own(r, ROWS) for r in range(WORLD)])
        _compare(rank, got, want, sharded, num_local=2)
        assert (rank == 1) == bool((got[2]["experts.w13"] == 0).all())


def case_model_matches_the_ep_size_1_model(rank):
    cfg = _cfg(pattern="AE*2", null_slot=True, capacity_factor=1.0, vocab_size=64)
    ep = build_model(cfg, seed=3, dispatch_backend="auto", ep_group=dist.group.WORLD)
    ref = build_model(cfg, seed=3, dispatch_backend="loop")
    gen = torch.Generator().manual_seed(2)
    tokens_BL = torch.randint(0, 64, (WORLD * 2, 9), generator=gen)

    def run(model, slices):
        total, logits = torch.zeros(()), []
        for s in slices:
            logits_BLV, aux = model(tokens_BL[s, :-1])
            total = total + F.cross_entropy(logits_BLV.flatten(0, 1), tokens_BL[s, 1:].flatten())
            total, logits = total + aux, [*logits, logits_BLV]
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        return torch.cat(logits).detach(), None, grads  # token ids have no gradient

    got = run(ep, [_own(rank, 4)])
    sharded = _sum_replicated_grads(ep, got[2])
    assert len(sharded) == 4  # w13, w2 of two E blocks
    want = run(ref, [_own(r, 4) for r in range(WORLD)])
    _compare(rank, got, want, sharded, num_local=2)
    assert all(o["observed"] in (EP_GROUPED, EP_LOOP) for o in ep.dispatch_observations())


def _sign_step(counts_E):
    return torch.sign(counts_E.float().mean() - counts_E.float())


def case_router_bias_step_uses_the_counts_of_every_rank(rank):
    cfg = _cfg(pattern="AE", bias_update_rate=0.01)
    ep = build_model(cfg, seed=3, ep_group=dist.group.WORLD).train()
    ref = build_model(cfg, seed=3).train()
    tokens_BL = torch.randint(0, 256, (WORLD * 2, 8), generator=torch.Generator().manual_seed(4))
    tokens_BL[_own(1, 4)] = 7  # rank 1's loads are skewed unlike rank 0's
    with torch.no_grad():
        ep(tokens_BL[_own(rank, 4)])
        ref(tokens_BL)  # no capacity: routing is per token, so the counts simply add up
    local_E, total_E = (
        ep.moe_blocks[0].router.bias_counts[:4],
        ref.moe_blocks[0].router.bias_counts[:4],
    )
    differs = torch.tensor(int(not torch.equal(_sign_step(local_E), _sign_step(total_E))))
    dist.all_reduce(differs)
    assert int(differs) > 0  # a rank stepping from its own counts alone would drift
    ep.update_router_biases()
    ref.update_router_biases()
    bias_S = ep.moe_blocks[0].router.expert_bias
    assert bias_S.abs().sum() > 0
    torch.testing.assert_close(bias_S, ref.moe_blocks[0].router.expert_bias)


def case_ep_size_that_does_not_divide_the_experts_is_refused(rank):
    cfg = _cfg(num_experts=3)
    with pytest.raises(ValueError, match=r"ep_size: 2 must divide num_experts=3"):
        MoEBlock(cfg, ep_group=dist.group.WORLD)
    with pytest.raises(ValueError, match=r"ep_size: 2 must divide num_experts=3"):
        build_model(_cfg(cfg, pattern="A"), seed=0, ep_group=dist.group.WORLD)


def _gradient_exchange(rank, world, ep_size):
    """moe_core.parallel: each rank's loss on its own batch, then sync_and_clip, against the
    ep_size=1 model on the mean of the ranks' losses (what DDP computes): the same replicated
    grads, each shard the slice of the expert grads, the same norm; and clipped alike."""
    from moe_core.parallel import make_layout, sync_and_clip

    layout = make_layout(ep_size)
    assert (layout.world, layout.ep_rank) == (world, rank % ep_size)
    assert layout.expert_dp_size == world // ep_size
    cfg = _cfg(pattern="AE*2", capacity_factor=1.0, vocab_size=64)
    rows = [slice(2 * r, 2 * r + 2) for r in range(world)]  # two sequences per rank
    tokens_BL = torch.randint(0, 64, (world * 2, 9), generator=torch.Generator().manual_seed(5))

    def loss(model, s):
        logits_BLV, aux = model(tokens_BL[s, :-1])
        return F.cross_entropy(logits_BLV.flatten(0, 1), tokens_BL[s, 1:].flatten()) + aux

    # The third time only the experts train, so the norm is theirs alone: summed over shards.
    for clip, experts_only in ((False, False), (True, False), (True, True)):
        ep = build_model(cfg, seed=3, ep_group=layout.ep_group)
        ref = build_model(cfg, seed=3)
        for model in (ep, ref) if experts_only else ():
            for p in model.parameters():
                p.requires_grad_(p.ndim == 3)  # the stacked expert weights
        loss(ep, rows[rank]).backward()
        (sum(loss(ref, s) for s in rows) / world).backward()
        trained = [p for p in ref.parameters() if p.requires_grad]
        want_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trained]))
        max_norm = float(want_norm) / 2 if clip else 1e9
        got_norm = sync_and_clip(ep, layout, max_norm)
        torch.testing.assert_close(got_norm, want_norm, **CLOSE)
        if clip:
            torch.nn.utils.clip_grad_norm_(trained, max_norm)
        want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
        got = {n: p.grad for n, p in ep.named_parameters() if p.requires_grad}
        local = cfg.num_experts // ep_size
        sharded = sharded_parameter_names(ep)
        _compare(layout.ep_rank, (None, None, got), (None, None, want), sharded, local)


def case_the_loop_gradient_exchange_gives_the_data_parallel_step(rank):
    _gradient_exchange(rank, WORLD, WORLD)


CASES = {name: fn for name, fn in globals().items() if name.startswith("case_")}


def _init(rank: int, store_path: str, world: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store_path}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),  # a desynced case fails instead of hanging
    )


def _worker(rank: int, store_path: str, out_dir: str) -> None:
    _init(rank, store_path, WORLD)
    results = {}
    for name, case in CASES.items():
        try:
            case(rank)
            results[name] = "ok"
        except Exception:  # reported per case by the tests below
            results[name] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ep_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ep")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")  # inherited by the children before torch loads
        torch.multiprocessing.spawn(_worker, args=(str(tmp / "store"), str(tmp)), nprocs=WORLD)
    return [json.loads((tmp / f"rank{rank}.json").read_text()) for rank in range(WORLD)]


def _assert_case_ok(ep_results, name):
    for rank, results in enumerate(ep_results):
        assert results[name] == "ok", f"rank {rank}:\n{results[name]}"


def test_ep_block_without_capacity_matches_the_concatenated_batch(ep_results):
    _assert_case_ok(ep_results, "case_no_capacity_matches_the_concatenated_batch")


def test_ep_block_drops_per_rank_and_keeps_per_rank_counters(ep_results):
    _assert_case_ok(ep_results, "case_capacity_drops_per_rank_and_counters_stay_per_rank")


def test_ep_block_with_null_slot_and_grouped_local_compute(ep_results):
    _assert_case_ok(ep_results, "case_null_slot_with_grouped_compute")


def test_ep_block_where_a_rank_receives_no_rows(ep_results):
    _assert_case_ok(ep_results, "case_rank_that_receives_no_rows")


def test_ep_model_matches_the_ep_size_1_model_built_with_the_same_seed(ep_results):
    _assert_case_ok(ep_results, "case_model_matches_the_ep_size_1_model")


def test_ep_router_bias_step_keeps_the_replicated_routers_identical(ep_results):
    _assert_case_ok(ep_results, "case_router_bias_step_uses_the_counts_of_every_rank")


def test_ep_block_refuses_a_group_size_that_does_not_divide_the_experts(ep_results):
    _assert_case_ok(ep_results, "case_ep_size_that_does_not_divide_the_experts_is_refused")


def test_the_training_loops_gradient_exchange_equals_data_parallel(ep_results):
    _assert_case_ok(ep_results, "case_the_loop_gradient_exchange_gives_the_data_parallel_step")


def _four_ranks_worker(rank: int, store_path: str, out_dir: str) -> None:
    _init(rank, store_path, 4)
    try:
        _gradient_exchange(rank, world=4, ep_size=2)
        result = "ok"
    except Exception:
        result = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_the_gradient_exchange_with_two_expert_parallel_groups_equals_data_parallel(tmp_path):
    """4 ranks, ep_size 2: two groups, each shard held by 2 ranks (the expert data-parallel
    group the shard's gradients are summed over)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        torch.multiprocessing.spawn(
            _four_ranks_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=4
        )
    for rank in range(4):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result == "ok", f"rank {rank}:\n{result}"


def test_ep_size_is_checked_up_front_naming_both_fields():
    check_ep_size(2, 4)
    with pytest.raises(ValueError, match=r"ep_size: 3 must divide num_experts=4"):
        check_ep_size(3, 4)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=r"ep_size: must be a positive integer"):
            check_ep_size(bad, 4)
    with pytest.raises(ValueError, match=r"ep_size: 3 must divide num_experts=4"):
        RoutedExperts(4, 8, 8, ep_rank=0, ep_size=3)


def test_expert_shard_init_is_the_slice_of_the_full_weights_and_rng_advances_alike():
    torch.manual_seed(5)
    full = RoutedExperts(6, 8, 4)
    after_full = torch.rand(3)
    for rank in range(3):
        torch.manual_seed(5)
        shard = RoutedExperts(6, 8, 4, ep_rank=rank, ep_size=3)
        assert shard.is_shard and (shard.num_experts, shard.first_expert) == (2, 2 * rank)
        for name in ("w13", "w2"):
            assert torch.equal(getattr(shard, name), getattr(full, name)[2 * rank : 2 * rank + 2])
        assert torch.equal(torch.rand(3), after_full)  # later layers draw the same numbers


@pytest.mark.parametrize(
    ("requested", "dims", "observed", "reason"),
    [
        ("loop", (16, 8), EP_LOOP, None),
        ("padded", (16, 8), EP_LOOP, "padded has no expert-parallel form"),
        ("grouped", (16, 6), EP_LOOP, "grouped fell back to loop"),
        ("auto", (16, 6), EP_LOOP, "auto chose loop"),
    ],
)
def test_ep_dispatcher_reports_the_exchange_and_the_local_compute(
    requested, dims, observed, reason
):
    experts = RoutedExperts(4, *dims)
    dispatcher = ExpertParallelDispatcher(requested, group=None)
    x_TD = torch.zeros(2, dims[0])
    got_observed, got_reason = dispatcher.resolve(x_TD, None, experts.w13, experts.w2)
    assert got_observed == observed
    assert got_reason is None if reason is None else reason in got_reason


def test_ep_dispatcher_refuses_an_unknown_backend():
    with pytest.raises(ValueError, match="dispatch_backend.*'megablocks'"):
        ExpertParallelDispatcher("megablocks", group=None)
