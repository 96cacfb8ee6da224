"""Training pieces without a Trainer: accumulation, optimizer groups, schedule, locking, config, data loading."""

from __future__ import annotations

import argparse
import io
import math
import tarfile
from pathlib import Path

import pytest
import torch

from clipforge.data.loading import BadItemCounter, EpochBatchSampler, PairDataset, Pairs, ShardStream, collate_pairs
from clipforge.data.synthetic import make_scenes, write_caption_dataset
from clipforge.model.precision import lightning_precision as resolve_precision
from clipforge.tokenizer import Tokenizer
from clipforge.train.averaging import WeightAverage
from clipforge.train.config import (
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    config_from_dict,
    load_config,
    save_config,
)
from clipforge.train.models import build_model
from clipforge.train.module import CLIPTrainingModule, lr_at
from clipforge.train.parameters import group_names, lock_towers, match_optimizer_state, param_groups
from clipforge.transforms import image_transform

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.image_size=32", "model.vision_width=64", "model.vision_layers=2", "model.patch_size=8",
        "model.text_width=64", "model.text_layers=2", "model.text_heads=2", "model.embed_dim=64",
        "model.context_length=16"]


def _tiny_model(*overrides: str):
    torch.manual_seed(0)
    return build_model(load_config(None, [*TINY, *overrides]).model)[0]


# ------------------------------------------------------------------------------------------- optimisation


def test_accumulation_gives_the_gradient_of_the_whole_batch() -> None:
    """accum_freq=4 (features cached, each micro-batch re-encoded with gradient) == one pass over the batch."""
    torch.manual_seed(1)
    images = torch.randn(16, 3, 32, 32)
    texts = torch.randint(1, 49000, (16, 16))
    texts[:, 7] = 49407  # end-of-text

    grads = []
    for accum in (1, 4):
        module = CLIPTrainingModule(_tiny_model(), OptimConfig(accum_freq=accum), LossConfig())
        if accum == 1:  # an ordinary step: Lightning's backward of the step's loss
            loss = module.compute_loss(*module.encode(images, texts))
            loss.backward()
        else:
            module.manual_backward = lambda loss: loss.backward()  # no Trainer here
            loss = module._accumulated_backward(images, texts)
        grads.append((loss, {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
    (loss1, g1), (loss4, g4) = grads
    assert loss4.item() == pytest.approx(loss1.item(), rel=1e-5)
    assert g1.keys() == g4.keys() and len(g1) > 20
    for name in g1:
        assert torch.allclose(g1[name], g4[name], rtol=1e-4, atol=1e-7), name
    # Not the same as averaging per-micro-batch losses (fewer negatives): that would differ visibly.
    module = CLIPTrainingModule(_tiny_model(), OptimConfig(), LossConfig())
    per_chunk = sum(module.compute_loss(*module.encode(i, t)) for i, t in zip(images.chunk(4), texts.chunk(4),
                                                                              strict=True)) / 4
    assert abs(per_chunk.item() - loss1.item()) > 0.1


def test_gradients_are_clipped_in_the_hook_lightning_calls_after_unscaling() -> None:
    """Clipping lives in on_before_optimizer_step, which Lightning runs inside opt.step() after 16-mixed's
    scaler has unscaled the gradients (clipping before opt.step() clipped the scaled ones)."""
    module = CLIPTrainingModule(_tiny_model(), OptimConfig(grad_clip=1.0), LossConfig())
    optimizer = module.configure_optimizers()
    for param in module.parameters():
        param.grad = torch.full_like(param, 3.0)
    module.on_before_optimizer_step(optimizer)
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in module.parameters()]))
    assert norm.item() == pytest.approx(1.0, rel=1e-2)  # from 3 * sqrt(#params), about 1e4


def test_weight_decay_only_on_matrices() -> None:
    module = CLIPTrainingModule(_tiny_model(), OptimConfig(), LossConfig(kind="siglip"))
    decay, no_decay = param_groups(module, 0.2)
    names = {id(p): n for n, p in module.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert {"model.visual.conv1.weight", "model.text.text_projection", "model.visual.proj",
            "model.text.token_embedding.weight", "model.text.transformer.resblocks.0.attn.in_proj_weight"} <= decayed
    assert {"model.logit_scale", "logit_bias", "model.text.positional_embedding", "model.visual.positional_embedding",
            "model.visual.class_embedding", "model.text.ln_final.weight", "model.text.ln_final.bias",
            "model.text.transformer.resblocks.0.attn.in_proj_bias"} <= kept
    assert not any("positional" in n or "ln_" in n or n.endswith("bias") for n in decayed)
    assert len(decayed) + len(kept) == len(list(module.parameters()))


def test_optimizer_state_follows_each_parameter_by_name() -> None:
    """PyTorch matches optimizer state by position; a module that lists its parameters in another order (a new
    version's layout) must still hand each parameter its own moments."""
    module = CLIPTrainingModule(_tiny_model(), OptimConfig(), LossConfig())
    groups = param_groups(module, 0.2)
    optimizer = torch.optim.AdamW(groups, lr=1e-3)
    module.compute_loss(*module.encode(torch.randn(4, 3, 32, 32), torch.randint(1, 9, (4, 16)))).backward()
    optimizer.step()
    names = group_names(module, groups)
    by_name = {name: optimizer.state[p]["exp_avg"].clone() for g, ns in zip(groups, names, strict=True)
               for p, name in zip(g["params"], ns, strict=True)}
    saved = optimizer.state_dict()
    shuffled = [list(reversed(ns)) for ns in names]  # the same parameters, listed the other way round
    match_optimizer_state(saved, names, shuffled)
    flat = [name for ns in shuffled for name in ns]
    for index, name in enumerate(flat):
        assert torch.equal(saved["state"][index]["exp_avg"], by_name[name]), name
    assert [g["params"] for g in saved["param_groups"]] == [list(range(len(shuffled[0]))),
                                                            list(range(len(shuffled[0]), len(flat)))]
    with pytest.raises(ValueError, match="optimizer state is for other parameters"):
        match_optimizer_state(optimizer.state_dict(), names, [names[0][1:], names[1]])


def test_learning_rate_schedule() -> None:
    assert lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)  # warmup: (step + 1) / warmup
    assert lr_at(9, 100, 1.0, 10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(55, 100, 1.0, 10) == pytest.approx(0.5)  # half way through the decay
    assert lr_at(100, 100, 1.0, 10) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(100, 100, 1.0, 10, min_lr_ratio=0.1) == pytest.approx(0.1)
    # A wall-time budget half spent moves the cosine to its middle even if few steps were taken.
    assert lr_at(20, 1000, 1.0, 10, time_fraction=0.5) == pytest.approx(0.5)
    assert lr_at(20, 1000, 1.0, 10, time_fraction=2.0) == pytest.approx(0.0, abs=1e-12)


def test_lock_image_tower_with_unlocked_last_groups() -> None:
    model = _tiny_model()
    lock_towers(model, ModelConfig(lock_image=True, lock_image_unlocked_groups=2))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # ViT groups: stem, block 0, block 1, head -> the last two are block 1 and the head.
    assert {"visual.proj", "visual.ln_post.weight", "visual.transformer.resblocks.1.mlp.c_fc.weight"} <= trainable
    assert not any(n.startswith(("visual.conv1", "visual.transformer.resblocks.0", "visual.positional"))
                   for n in trainable)
    assert "text.text_projection" in trainable and "text.token_embedding.weight" in trainable

    model = _tiny_model()
    lock_towers(model, ModelConfig(lock_text=True))
    assert all(n.startswith("visual.") or n == "logit_scale" for n, p in model.named_parameters() if p.requires_grad)


def test_locked_resnet_keeps_batchnorm_statistics() -> None:
    model = _tiny_model("model.arch=RN-Nano", "model.vision_width=16", "model.vision_layers=[1, 1, 1, 1]",
                        "model.patch_size=null")
    module = CLIPTrainingModule(model, OptimConfig(), LossConfig(), ModelConfig(lock_image=True))
    module.train()
    assert not model.visual.bn1.training and not model.visual.layer1[0].bn1.training
    assert model.text.transformer.training
    assert not any(p.requires_grad for p in model.visual.parameters())


def test_precision_choice() -> None:
    from clipforge.model import cpu_has_native_bf16

    if not torch.cuda.is_available():
        assert resolve_precision("auto", "cpu") == ("bf16-mixed" if cpu_has_native_bf16() else "32-true")
        with pytest.raises(ValueError, match="needs a GPU"):
            resolve_precision("16-mixed", "cpu")
    assert resolve_precision("32-true", "cpu") == "32-true"


# ------------------------------------------------------------------------------------------- config


def test_config_yaml_overrides_and_errors(tmp_path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  epochs: 3\nmodel:\n  arch: ViT-Micro-8\n")
    cfg = load_config(path, ["optim.batch_size=32", "run.devices=2", "model.vision_layers=[1, 1, 1, 1]"])
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.batch_size) == (1e-3, 3, 32)
    assert cfg.model.arch == "ViT-Micro-8" and cfg.model.vision_layers == [1, 1, 1, 1] and cfg.run.devices == 2
    assert cfg.optim.wd == 0.2 and cfg.optim.beta2 == 0.98 and cfg.optim.eps == 1e-6  # defaults kept

    save_config(cfg, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == cfg

    with pytest.raises(ValueError, match=r"optim: unknown key\(s\) \['lrate'\]"):
        load_config(path, ["optim.lrate=1"])
    with pytest.raises(ValueError, match=r"optim\.epochs must be int"):
        load_config(path, ["optim.epochs=two"])
    with pytest.raises(ValueError, match="unknown section"):
        config_from_dict({"trainer": {}})
    with pytest.raises(ValueError, match=r"section\.key=value"):
        load_config(None, ["lr=1"])
    path.write_text("optim: [1, 2\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(path)


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_recipes_are_valid_configs(recipe: Path) -> None:
    cfg = load_config(recipe)
    model = build_model(cfg.model)[0] if cfg.model.init is None else None
    assert model is None or sum(p.numel() for p in model.parameters()) > 0


def test_cli_flags_map_onto_the_config(tmp_path) -> None:
    from clipforge.cli.train import _train_args, config_from_args

    parser = argparse.ArgumentParser()
    _train_args(parser)
    (tmp_path / "run.yaml").write_text("optim: {lr: 0.1, epochs: 9}\n")
    args = parser.parse_args(["--config", str(tmp_path / "run.yaml"), "--lr", "0.002", "--batch-size", "8",
                              "--train-data", "123.csv", "--lock-image", "--vision-layers", "3", "--devices", "2",
                              "--set", "optim.warmup=7", "--set", "optim.batch_size=16"])
    cfg = config_from_args(args)
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.warmup) == (0.002, 9, 7)
    assert cfg.optim.batch_size == 16  # --set comes last
    assert cfg.data.train == "123.csv" and cfg.model.lock_image and cfg.model.vision_layers == 3
    assert cfg.run.devices == 2
    assert isinstance(cfg, TrainConfig)


# ------------------------------------------------------------------------------------------- data


def test_pair_dataset_counts_and_replaces_bad_items(tmp_path) -> None:
    table = write_caption_dataset(tmp_path, 8, size=32, seed=0)
    images = sorted((tmp_path / "images").iterdir())
    images[1].write_bytes(b"")  # empty file
    images[2].write_bytes(images[3].read_bytes()[:60])  # truncated PNG
    images[4].unlink()  # missing
    from clipforge.data.loading import pairs_from_table

    pairs = pairs_from_table(table)
    pairs.captions[5] = ["  "]  # empty caption
    dataset = PairDataset(pairs, image_transform(32, is_train=True), seed=0)
    batch = collate_pairs([dataset[(0, i)] for i in range(8)], Tokenizer(16))
    assert batch["images"].shape == (8, 3, 32, 32) and len(batch["texts"]) == 8  # the batch kept its size
    # Padding columns no caption uses are cut: the causal text tower gives the same features without them.
    longest = max(len(Tokenizer(16).encode(c)) for captions in pairs.captions for c in captions) + 2
    assert batch["texts"].shape[1] <= min(16, longest) and (batch["texts"][:, -1] != 0).any()
    reasons = dict(batch["bad"])
    assert batch["seen"] == 8 + len(batch["bad"]) and len(reasons) == 4
    assert "empty" in reasons[str(images[1])] and "truncated" in reasons[str(images[2])]
    assert "not found" in reasons[str(images[4])] and "empty caption" in reasons[f"{images[5]}"]

    # Same (epoch, index): the same crop; another epoch: another crop.
    assert torch.equal(dataset[(0, 0)][0], dataset[(0, 0)][0])
    assert not torch.equal(dataset[(0, 0)][0], dataset[(1, 0)][0])

    counter = BadItemCounter(max_fraction=0.2, min_seen=10)
    counter.update(batch["seen"], batch["bad"])
    assert counter.bad == len(batch["bad"]) >= 4 and counter.examples[0][0] in reasons
    with pytest.raises(ValueError, match=rf"{counter.bad} of {counter.seen} training items \(\d+\.\d%\) could not"):
        counter.check()
    counter = BadItemCounter(max_fraction=0.2, min_seen=100)
    counter.update(8, [("a", "b")] * 3)
    counter.check()  # too few items seen to judge yet
    with pytest.raises(ValueError, match=r"max_bad_fraction=0\.2"):
        counter.check(final=True)


def test_sample_captions_draws_one_item_per_image(tmp_path) -> None:
    scenes = make_scenes(3, size=32, seed=0)
    for i, scene in enumerate(scenes):
        scene.image.save(tmp_path / f"{i}.png")
    captions = [[f"image {i} caption {j}" for j in range(5)] for i in range(3)]
    pairs = Pairs([str(tmp_path / f"{i}.png") for i in range(3)], captions)
    assert len(PairDataset(pairs, image_transform(32))) == 15  # one item per caption
    dataset = PairDataset(pairs, image_transform(32), sample_captions=True)
    assert len(dataset) == 3
    drawn = {dataset[(epoch, 1)][1] for epoch in range(20)}
    assert drawn <= set(captions[1]) and len(drawn) >= 3  # a caption of image 1, not always the same one
    assert dataset[(7, 1)][1] == dataset[(7, 1)][1]  # but the same one for the same epoch


def test_captions_per_image_draws_distinct_captions_in_image_major_batches(tmp_path) -> None:
    scenes = make_scenes(3, size=32, seed=0)
    for i, scene in enumerate(scenes):
        scene.image.save(tmp_path / f"{i}.png")
    captions = [[f"image {i} caption {j}" for j in range(n)] for i, n in enumerate((5, 3, 1))]
    pairs = Pairs([str(tmp_path / f"{i}.png") for i in range(3)], captions)
    dataset = PairDataset(pairs, image_transform(32), sample_captions=True, captions_per_image=3)
    for epoch in range(5):
        drawn = [dataset[(epoch, i)][1] for i in range(3)]
        assert all(len(texts) == 3 and set(texts) <= set(captions[i]) for i, texts in enumerate(drawn))
        assert len(set(drawn[0])) == 3 and sorted(drawn[1]) == sorted(captions[1])  # distinct while there are 3
        assert drawn[2] == ("image 2 caption 0",) * 3  # repeated when there are fewer
    assert dataset[(4, 0)][1] == dataset[(4, 0)][1]  # seeded per (epoch, item)
    assert len({dataset[(epoch, 0)][1] for epoch in range(10)}) > 1
    tokenizer = Tokenizer(16)
    batch = collate_pairs([dataset[(0, i)] for i in range(3)], tokenizer)
    assert batch["images"].shape[0] == 3 and batch["texts"].shape[0] == 9
    expected = [text for i in range(3) for text in dataset[(0, i)][1]]  # image i's captions are rows 3i..3i+2
    assert torch.equal(batch["texts"], tokenizer(expected)[:, :batch["texts"].shape[1]])
    with pytest.raises(ValueError, match="captions_per_image must be 1, or more with sample_captions"):
        PairDataset(pairs, image_transform(32), captions_per_image=2)


def test_word_dropout_leaves_words_out_at_its_rate_and_is_seeded(tmp_path) -> None:
    make_scenes(1, size=32, seed=0)[0].image.save(tmp_path / "0.png")
    words = [f"w{i}" for i in range(40)]
    pairs = Pairs([str(tmp_path / "0.png")], [[" ".join(words), "one"]])
    dataset = PairDataset(pairs, image_transform(32), sample_captions=True, captions_per_image=2, word_dropout=0.25)
    kept = []
    for epoch in range(50):
        long, short = sorted(dataset[(epoch, 0)][1], key=len, reverse=True)
        remaining = long.split()
        assert remaining == [w for w in words if w in remaining]  # in order, nothing added
        assert short == "one"  # at least one word survives
        kept.append(len(remaining))
    assert sum(kept) / (40 * 50) == pytest.approx(0.75, abs=0.03)  # 2,000 Bernoulli draws: sd 0.01
    assert dataset[(7, 0)][1] == dataset[(7, 0)][1]
    plain = PairDataset(pairs, image_transform(32), sample_captions=True, captions_per_image=2)
    assert sorted(plain[(0, 0)][1]) == sorted(pairs.captions[0])
    with pytest.raises(ValueError, match="word_dropout must be in"):
        PairDataset(pairs, image_transform(32), word_dropout=1.0)


def test_loss_over_several_captions_is_the_mean_of_each_captions_loss() -> None:
    module = CLIPTrainingModule(_tiny_model(), OptimConfig(), LossConfig())
    g = torch.Generator().manual_seed(3)
    images = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(4, 2, 8, generator=g), dim=-1)
    expected = (module.compute_loss(images, texts[:, 0]) + module.compute_loss(images, texts[:, 1])) / 2
    got = module.compute_loss(images, texts.reshape(8, 8))
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(got.item() - module.compute_loss(images, texts[:, 0]).item()) > 1e-3


def test_caption_contrast_adds_the_loss_between_each_images_captions() -> None:
    """Hand-computed: the mean of the 3 image-caption losses plus 0.5 x the mean over the 3 caption pairs of the
    symmetric cross-entropy between captions j and m of the same images (label smoothing applied to both)."""
    g = torch.Generator().manual_seed(4)
    images = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    texts = torch.nn.functional.normalize(torch.randn(5, 3, 8, generator=g), dim=-1)
    module = CLIPTrainingModule(_tiny_model(), OptimConfig(),
                                LossConfig(caption_contrast=0.5, label_smoothing=0.1))
    scale = module.model.logit_scale.exp().item()

    def symmetric(a: torch.Tensor, b: torch.Tensor) -> float:
        logits, labels = scale * a @ b.T, torch.arange(len(a))
        return ((torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
                 + torch.nn.functional.cross_entropy(logits.T, labels, label_smoothing=0.1)) / 2).item()

    image_text = sum(symmetric(images, texts[:, j]) for j in range(3)) / 3
    text_text = (symmetric(texts[:, 0], texts[:, 1]) + symmetric(texts[:, 0], texts[:, 2])
                 + symmetric(texts[:, 1], texts[:, 2])) / 3
    got = module.compute_loss(images, texts.reshape(15, 8))
    assert got.item() == pytest.approx(image_text + 0.5 * text_text, rel=1e-5)
    assert text_text > 0.5  # the term is not negligible: the check above would notice it missing
    # One caption per image: nothing to contrast, the plain loss.
    assert module.compute_loss(images, texts[:, 0]).item() == pytest.approx(symmetric(images, texts[:, 0]), rel=1e-5)


def test_epoch_batch_sampler_splits_ranks_and_resumes() -> None:
    ranks = [EpochBatchSampler(50, 4, seed=0, rank=r, world_size=2) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(3)
    batches = [list(s) for s in ranks]
    assert [len(b) for b in batches] == [6, 6] == [len(s) for s in ranks]  # 50 // 8 global batches
    seen = [i for b in batches for batch in b for _, i in batch]
    assert len(seen) == len(set(seen)) == 48 and all(e == 3 for b in batches for batch in b for e, _ in batch)
    ranks[0].resume_at(3, 4)
    assert list(ranks[0]) == batches[0][4:]  # resumed at batch 4 of epoch 3
    assert list(ranks[0]) == batches[0]  # once only
    ranks[0].resume_at(2, 4)
    assert list(ranks[0]) == batches[0]  # another epoch's position does not apply
    ranks[0].set_epoch(4)
    assert list(ranks[0]) != batches[0]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        EpochBatchSampler(7, 4, world_size=2)


def _write_shard(path: Path, samples: list[tuple[str, bytes | None, str | None]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, image, caption in samples:
            for ext, data in (("png", image), ("txt", caption.encode() if caption is not None else None)):
                if data is not None:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_stream_batches_and_count_bad_samples(tmp_path) -> None:
    scenes = make_scenes(20, size=32, seed=0)
    encoded = []
    for scene in scenes:
        buffer = io.BytesIO()
        scene.image.save(buffer, "PNG")
        encoded.append(buffer.getvalue())
    _write_shard(tmp_path / "shard-000.tar", [(f"{i:04d}", encoded[i], scenes[i].caption) for i in range(10)])
    _write_shard(tmp_path / "shard-001.tar", [(f"{i:04d}", encoded[i], scenes[i].caption) for i in range(10, 18)]
                 + [("bad1", b"garbage", "a caption"), ("bad2", encoded[19], None)])
    stream = ShardStream(str(tmp_path / "shard-{000..001}.tar"), image_transform(32), Tokenizer(16), batch_size=4,
                         num_samples=40, shuffle_buffer=8, seed=0)
    batches = list(torch.utils.data.DataLoader(stream, batch_size=None, num_workers=0))
    assert len(batches) == len(stream) == 10  # 40 samples per epoch; shards restart when exhausted
    assert all(b["images"].shape == (4, 3, 32, 32) and len(b["texts"]) == 4 for b in batches)
    bad = [item for b in batches for item, _ in b["bad"]]
    assert any(item.endswith(":bad1") for item in bad) and any(item.endswith(":bad2") for item in bad)
    reasons = {item.rsplit(":", 1)[1]: reason for b in batches for item, reason in b["bad"]}
    assert "not an image" in reasons["bad1"] and "no caption" in reasons["bad2"]
    assert sum(b["seen"] for b in batches) == 40 + len(bad)
    captions = {tuple(Tokenizer(16)([s.caption])[0].tolist()) for s in scenes[:18]}
    padded = [torch.nn.functional.pad(b["texts"], (0, 16 - b["texts"].shape[1])) for b in batches]
    assert all(tuple(row.tolist()) in captions for texts in padded for row in texts)


def test_training_module_checkpoint_state_round_trip() -> None:
    module = CLIPTrainingModule(_tiny_model(), OptimConfig(), LossConfig())
    module.bad_items.update(10, [("x.png", "broken")])
    module._position = (2, 5)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=True)  # plain tensors and values only
    other = CLIPTrainingModule(_tiny_model(), OptimConfig(), LossConfig())
    other.on_load_checkpoint(restored)
    assert other._resume_position == (2, 5) and other.bad_items.bad == 1 and other.elapsed_before > 0
    assert math.isfinite(other.elapsed_before)


def test_weight_average_follows_its_formula_swaps_in_and_out_and_round_trips() -> None:
    model = _tiny_model("model.arch=RN-Nano", "model.vision_width=16", "model.vision_layers=[1, 1, 1, 1]",
                        "model.patch_size=null")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, decay=0.9)
    expected = {k: v.float().clone() for k, v in start.items() if v.is_floating_point()}
    for step in range(3):
        with torch.no_grad():
            for tensor in model.state_dict().values():
                if tensor.is_floating_point():
                    tensor.add_(1.0)  # parameters and BatchNorm statistics alike
        decay = min(0.9, (1 + step) / (10 + step))  # 0.1, 0.18, 0.25: the early steps count nearly in full
        live = model.state_dict()
        expected = {k: decay * v + (1 - decay) * live[k] for k, v in expected.items()}
        average.update(step)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with average.swapped_in():
        inside = model.state_dict()
        for name, value in expected.items():
            assert torch.allclose(inside[name], value, atol=1e-5), name
        assert not torch.allclose(inside["visual.bn1.running_mean"], trained["visual.bn1.running_mean"])
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())  # the live weights are back

    buffer = io.BytesIO()
    torch.save(average.state_dict(), buffer)
    buffer.seek(0)
    other = WeightAverage(model, decay=0.9)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(average.average, other.average, strict=True))
    with pytest.raises(ValueError, match="ema_decay"):
        other.load_state_dict({})
    with pytest.raises(ValueError, match="between 0 and 1"):
        WeightAverage(model, decay=1.5)


def test_training_module_keeps_the_average_in_its_checkpoint_and_sets_the_temperature() -> None:
    module = CLIPTrainingModule(_tiny_model(), OptimConfig(ema_decay=0.99), LossConfig(init_logit_scale=30.0))
    assert module.model.logit_scale.exp().item() == pytest.approx(30.0)
    with torch.no_grad():
        module.model.text.text_projection.add_(1.0)
    module.ema.update(100)
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    other = CLIPTrainingModule(_tiny_model(), OptimConfig(ema_decay=0.99), LossConfig())
    other.on_load_checkpoint(checkpoint)
    with other.final_weights():
        assert torch.allclose(other.model.text.text_projection, module.ema.state_dict()["text_projection"])
    with pytest.raises(ValueError, match="init_logit_scale"):
        CLIPTrainingModule(_tiny_model(), OptimConfig(), LossConfig(init_logit_scale=500.0))


def test_validation_log_restarts_with_a_fresh_run_and_is_trimmed_on_resume(tmp_path) -> None:
    from clipforge.train.validation import trim_validation_log

    log = tmp_path / "val.jsonl"
    log.write_text("".join(f'{{"step": {s}, "image_retrieval_recall@1": 0.1}}\n' for s in (10, 20, 30)))
    trim_validation_log(log, 20)  # resumed from the step-20 checkpoint: step 30 is redone
    assert [line.count('"step": ') for line in log.read_text().splitlines()] == [1, 1]
    assert '"step": 30' not in log.read_text()
    trim_validation_log(log, None)  # a fresh run in the same folder
    assert log.read_text() == ""


def test_validation_table_is_read_whatever_the_training_data_kind(tmp_path) -> None:
    from clipforge.train.config import DataConfig
    from clipforge.train.datamodule import read_pairs

    table = write_caption_dataset(tmp_path / "val", 4, size=32)
    pairs = read_pairs(str(table), DataConfig(kind="wds"))  # the kind describes the training shards
    assert len(pairs.images) == 4
    with pytest.raises(ValueError, match="cannot be read as a list of pairs"):
        read_pairs(str(table), DataConfig(), kind="wds")
