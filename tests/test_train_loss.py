"""Contrastive losses: known values, and the 2-process gathered loss equal to the single-process loss."""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from clipforge.train.loss import ClipLoss, SigLipLoss, build_loss

WORLD = 2
BATCH, DIM, EMBED = 6, 5, 4  # per-rank batch; input width; embedding width


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.nn.Linear, torch.nn.Linear]:
    """A global batch of inputs and two small 'towers' (linear maps), identical in every process."""
    g = torch.Generator().manual_seed(seed)
    x_img = torch.randn(WORLD * BATCH, DIM, generator=g, dtype=torch.float64)
    x_txt = torch.randn(WORLD * BATCH, DIM, generator=g, dtype=torch.float64)
    towers = []
    for _ in range(2):
        tower = torch.nn.Linear(DIM, EMBED, bias=False).double()
        with torch.no_grad():
            tower.weight.copy_(torch.randn(EMBED, DIM, generator=g, dtype=torch.float64))
        towers.append(tower)
    return x_img, x_txt, towers[0], towers[1]


def _loss_and_grads(loss_fn, x_img, x_txt, img_tower, txt_tower, scale, bias):
    img = F.normalize(img_tower(x_img), dim=-1)
    txt = F.normalize(txt_tower(x_txt), dim=-1)
    loss = loss_fn(img, txt, scale, bias)
    loss.backward()
    return torch.cat([loss.detach().reshape(1), img_tower.weight.grad.flatten(), txt_tower.weight.grad.flatten(),
                      scale.grad.reshape(1), torch.zeros(1) if bias.grad is None else bias.grad.reshape(1)])


# (loss kind, local_loss, gather_with_grad) run in the 2-process group; one spawn for all of them keeps it fast.
VARIANTS = [("clip", False, True), ("clip", True, True), ("siglip", False, True), ("clip", False, False)]


def _packed(kind: str, local_loss: bool, gather_with_grad: bool, rows: slice) -> torch.Tensor:
    """[loss, tower gradients..., d/d scale, d/d bias] for the rows `rows` of the global batch."""
    x_img, x_txt, img_tower, txt_tower = _batch()
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    loss_fn = build_loss(kind, local_loss=local_loss, gather_with_grad=gather_with_grad)
    return _loss_and_grads(loss_fn, x_img[rows], x_txt[rows], img_tower, txt_tower, scale, bias)


def _worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        out = []
        for variant in VARIANTS:
            packed = _packed(*variant, slice(rank * BATCH, (rank + 1) * BATCH))
            dist.all_reduce(packed)  # what DDP does with gradients: average them over ranks
            out.append((packed / WORLD).tolist())
        if rank == 0:
            results.put(out)
        dist.barrier()  # both ranks are done with gloo before either tears it down
    finally:
        dist.destroy_process_group()
    # Leave without interpreter teardown: gloo's worker threads can still be joinable when the C++ statics are
    # destroyed, which aborts the process (SIGABRT, "terminate called without an active exception") in about one
    # run in six, after every result has been delivered.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gathered_loss_equals_single_process() -> None:
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_worker, args=(_free_port(), results), nprocs=WORLD, join=True)
    rows = results.get()
    everything = slice(None)
    for variant, row in zip(VARIANTS, rows, strict=True):
        got = torch.tensor(row, dtype=torch.float64)
        kind, _, with_grad = variant
        expected = _packed(kind, False, True, everything)
        assert expected[1:-2].abs().min() > 1e-6  # every tower gradient compared is non-trivial
        # The losses compute in float32: agreement is to float32 rounding, far below any real difference.
        assert got[0].item() == pytest.approx(expected[0].item(), rel=1e-6), variant
        if with_grad:
            assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7), (variant, (got - expected).abs().max())
        else:
            # Gathering without gradient drops the other ranks' terms: same loss, visibly different gradients
            # (which also shows the comparison above can fail).
            assert (got[1:] - expected[1:]).abs().max() > 1e-3, variant


def test_clip_loss_known_values() -> None:
    # Perfectly aligned orthogonal pairs: logits are scale on the diagonal, 0 elsewhere.
    feats = torch.eye(3)
    scale = torch.tensor(5.0)
    expected = -math.log(math.exp(5) / (math.exp(5) + 2))
    assert ClipLoss()(feats, feats, scale).item() == pytest.approx(expected, rel=1e-6)
    # Against a hand-written reference on random features, both directions averaged.
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    logits = 20 * img @ txt.T
    manual = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.T, torch.arange(5))) / 2
    assert ClipLoss()(img, txt, torch.tensor(20.0)).item() == pytest.approx(manual.item(), rel=1e-6)


def test_clip_loss_label_smoothing_known_value() -> None:
    # Orthogonal pairs, B=3, smoothing e: each row's target puts 1 - e + e/3 on the match and e/3 elsewhere.
    feats, scale, eps = torch.eye(3), torch.tensor(5.0), 0.3
    log_z = math.log(math.exp(5) + 2)
    expected = -((1 - eps + eps / 3) * (5 - log_z) + 2 * (eps / 3) * (0 - log_z))
    assert ClipLoss(label_smoothing=eps)(feats, feats, scale).item() == pytest.approx(expected, rel=1e-6)
    assert build_loss("clip", label_smoothing=eps)(feats, feats, scale).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        ClipLoss(label_smoothing=1.0)
    with pytest.raises(ValueError, match="clip loss only"):
        build_loss("siglip", label_smoothing=0.1)


def test_siglip_loss_known_values() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scale, bias = torch.tensor(10.0), torch.tensor(-5.0)
    # Diagonal logits 10 - 5 = 5 (positives), off-diagonal -5 (negatives): 4 terms of -log sigmoid(5), over B=2.
    expected = 4 * -F.logsigmoid(torch.tensor(5.0)).item() / 2
    assert SigLipLoss()(img, img, scale, bias).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="logit_bias"):
        SigLipLoss()(img, img, scale)


def test_loss_is_float32_under_bf16_autocast() -> None:
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(64, 32, generator=g), dim=-1)
    txt = F.normalize(torch.randn(64, 32, generator=g), dim=-1)
    exact = ClipLoss()(img, txt, torch.tensor(100.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = ClipLoss()(img, txt, torch.tensor(100.0))
    assert under_autocast.dtype == torch.float32
    assert under_autocast.item() == pytest.approx(exact.item(), rel=1e-6)


def test_bad_shapes_and_kind() -> None:
    with pytest.raises(ValueError, match="same shape"):
        ClipLoss()(torch.zeros(3, 4), torch.zeros(2, 4), torch.tensor(1.0))
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("triplet")
