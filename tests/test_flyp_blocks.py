"""FLYP building blocks: differentiable all-gather, contrastive loss, text tower, head refresh, caption rows."""

from __future__ import annotations

import json
import math
import os
import socket
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from robustft.data.captions import (
    CaptionDataset,
    CaptionRowSampler,
    FeistelPermutation,
    captions,
    collate_caption_rows,
)
from robustft.distributed import DistEnv, all_gather_with_grad, init_distributed
from robustft.errors import ConfigError, ModelError
from robustft.model import ClassifierHead, ImageClassifier, build_zeroshot_weights, load_clip
from robustft.model.text import TextTower, refresh_head, zeroshot_head_from_text, zeroshot_weights_from_text
from robustft.ops.contrastive import clip_contrastive_loss, contrastive_logits, positive_targets

CLASSNAMES = ["cat", "dog", "golden retriever", "red car", "tree"]
TEMPLATES = ["a photo of a {}.", "a drawing of the {}.", "itap of a {}."]


# ----------------------------------------------------------------------------- all_gather_with_grad, one process
def test_gather_is_the_identity_with_one_process() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x
    assert all_gather_with_grad(x, DistEnv()) is x


# ----------------------------------------------------------------------------- contrastive loss
def _hand_loss(img: np.ndarray, txt: np.ndarray, log_scale: float, labels: list[int] | None) -> float:
    """Explicit loops over rows: mean soft-target CE over image rows and over text rows, averaged."""
    n = img.shape[0]
    img = img / np.linalg.norm(img, axis=1, keepdims=True)
    txt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    s = math.exp(log_scale)
    logits = [[s * float(np.dot(img[i], txt[j])) for j in range(n)] for i in range(n)]

    def positives(i: int) -> list[int]:
        return [i] if labels is None else [j for j in range(n) if labels[j] == labels[i]]

    def direction(rows: list[list[float]]) -> float:
        total = 0.0
        for i in range(n):
            log_z = math.log(sum(math.exp(v) for v in rows[i]))
            pos = positives(i)
            total += sum(-(rows[i][j] - log_z) / len(pos) for j in pos)
        return total / n

    transposed = [[logits[j][i] for j in range(n)] for i in range(n)]
    return (direction(logits) + direction(transposed)) / 2


@pytest.mark.parametrize("labels", [None, [0, 1, 0, 2, 1, 0]])
def test_contrastive_loss_equals_a_hand_computation(labels: list[int] | None) -> None:
    gen = torch.Generator().manual_seed(3)
    img, txt = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(6, 5, generator=gen,
                                                                                     dtype=torch.float64)
    log_scale = torch.tensor(math.log(7.0))
    loss = clip_contrastive_loss(img, txt, log_scale, labels=None if labels is None else torch.tensor(labels))
    expected = _hand_loss(img.numpy(), txt.numpy(), math.log(7.0), labels)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_default_mode_treats_same_class_captions_as_negatives() -> None:
    img, txt = torch.randn(4, 8), torch.randn(4, 8)
    labels = torch.tensor([0, 0, 1, 2])  # rows 0 and 1 share a class
    plain = clip_contrastive_loss(img, txt, torch.tensor(2.0))
    multi = clip_contrastive_loss(img, txt, torch.tensor(2.0), labels=labels)
    assert plain.item() != pytest.approx(multi.item())


def test_multi_positive_with_distinct_labels_equals_the_default() -> None:
    img, txt = torch.randn(7, 6), torch.randn(7, 6)
    scale = nn.Parameter(torch.tensor(math.log(30.0)))
    plain = clip_contrastive_loss(img, txt, scale)
    multi = clip_contrastive_loss(img, txt, scale, labels=torch.tensor([6, 2, 3, 0, 1, 5, 4]))
    torch.testing.assert_close(plain, multi, rtol=1e-6, atol=1e-6)
    plain.backward()
    assert scale.grad is not None and scale.grad.abs().item() > 0  # the temperature trains


def test_contrastive_helpers_and_errors() -> None:
    targets = positive_targets(torch.tensor([1, 1, 2]))
    torch.testing.assert_close(targets, torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]))
    img = torch.randn(3, 4)
    logits = contrastive_logits(img * 5, img, 0.0)  # normalised inside, scale exp(0) = 1
    torch.testing.assert_close(torch.diagonal(logits), torch.ones(3))
    with pytest.raises(ConfigError, match="one caption per image"):
        clip_contrastive_loss(torch.randn(3, 4), torch.randn(2, 4), 0.0)
    with pytest.raises(ConfigError, match="same D"):
        contrastive_logits(torch.randn(3, 4), torch.randn(3, 5), 0.0)
    with pytest.raises(ConfigError, match="labels must be"):
        clip_contrastive_loss(torch.randn(3, 4), torch.randn(3, 4), 0.0, labels=torch.tensor([0, 1]))


def test_contrastive_loss_is_float32_under_bf16_autocast() -> None:
    img, txt = torch.randn(5, 8), torch.randn(5, 8)
    ref = clip_contrastive_loss(img, txt, torch.tensor(math.log(100.0)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        amp = clip_contrastive_loss(img, txt, torch.tensor(math.log(100.0)))
    assert amp.dtype == torch.float32
    torch.testing.assert_close(amp, ref)


# ----------------------------------------------------------------------------- text tower
@pytest.fixture(scope="module")
def bundle():
    torch.manual_seed(0)
    b = load_clip("robustft-tiny", "none")
    b.model.eval()
    return b


def _text_keys(model: nn.Module) -> set[str]:
    return {k for k in model.state_dict() if not k.startswith("visual.")}


def test_text_tower_encodes_like_encode_text(bundle) -> None:
    tokens = bundle.tokenizer(["a photo of a cat.", "dog", "a very long caption " * 5])
    tower = TextTower.from_clip(bundle.model)
    with torch.no_grad():
        torch.testing.assert_close(tower.encode(tokens), bundle.model.encode_text(tokens), rtol=0, atol=1e-6)
        torch.testing.assert_close(tower.encode_text(tokens, normalize=True),
                                   bundle.model.encode_text(tokens, normalize=True), rtol=0, atol=1e-6)
    assert tower.encode(tokens).shape == (3, 32)


def test_text_tower_keys_sharing_and_copying(bundle) -> None:
    model = bundle.model
    shared = TextTower.from_clip(model, copy=False)
    copied = TextTower.from_clip(model)
    for tower in (shared, copied):
        assert set(tower.state_dict()) == _text_keys(model)
        assert {"token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection",
                "logit_scale", "transformer.resblocks.0.attn.in_proj_weight"} <= set(tower.state_dict())
        assert not any(k.startswith("visual.") for k in tower.state_dict())
        assert all(p.requires_grad for p in tower.parameters())
        assert sum(p.numel() for p in tower.parameters()) == sum(
            p.numel() for n, p in model.named_parameters() if not n.startswith("visual."))
    model_params = {id(p) for p in model.parameters()}
    assert all(id(p) in model_params for p in shared.parameters())
    assert not any(id(p) in model_params for p in copied.parameters())
    for name, value in copied.state_dict().items():
        assert torch.equal(value, model.state_dict()[name]), name
    before = model.logit_scale.detach().clone()
    with torch.no_grad():
        copied.logit_scale.add_(1.0)
    assert torch.equal(model.logit_scale.detach(), before)


def test_text_tower_of_a_custom_text_clip_and_gradients() -> None:
    model = open_clip.create_model("robustft-tiny", pretrained=None, force_custom_text=True).eval()
    assert type(model).__name__ == "CustomTextCLIP"
    tower = TextTower.from_clip(model)
    tokens = open_clip.get_tokenizer("robustft-tiny")(["a photo of a cat.", "a tree"])
    torch.testing.assert_close(tower.encode(tokens), model.encode_text(tokens), rtol=0, atol=1e-6)
    assert set(tower.state_dict()) == _text_keys(model)
    tower(tokens).pow(2).sum().backward()
    assert tower.text.token_embedding.weight.grad is not None


def test_text_tower_rejects_other_modules() -> None:
    with pytest.raises(ModelError, match="not an open_clip CLIP"):
        TextTower.from_clip(nn.Linear(2, 2))


def test_written_back_tower_loads_into_clip(bundle) -> None:
    tower = TextTower.from_clip(bundle.model)
    with torch.no_grad():
        tower.ln_final.weight.mul_(1.5)
    other = load_clip("robustft-tiny", "none").model
    missing, unexpected = other.load_state_dict(tower.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("visual.") for k in missing)


# ----------------------------------------------------------------------------- zero-shot head from the tower
def test_head_from_text_equals_open_clip_and_robustft_builders(bundle) -> None:
    tower = TextTower.from_clip(bundle.model)
    reference = open_clip.build_zero_shot_classifier(
        bundle.model, bundle.tokenizer, CLASSNAMES, TEMPLATES, num_classes_per_batch=2, device="cpu")  # [D, C]
    head = zeroshot_head_from_text(tower, bundle.tokenizer, CLASSNAMES, TEMPLATES, batch_classes=3)
    expected = (reference.T * bundle.model.logit_scale.exp()).detach()
    torch.testing.assert_close(head.weight.detach(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(head.bias.detach(), torch.zeros(len(CLASSNAMES)))
    ours = build_zeroshot_weights(bundle.model, bundle.tokenizer, CLASSNAMES, TEMPLATES, use_cache=False)
    from_tower = zeroshot_weights_from_text(tower, bundle.tokenizer, CLASSNAMES, TEMPLATES)
    torch.testing.assert_close(from_tower, ours, rtol=1e-5, atol=1e-6)
    assert not from_tower.requires_grad and tower.training  # no autograd; the tower's mode is restored
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a head built inside a bf16 step is still float32
        torch.testing.assert_close(zeroshot_weights_from_text(tower, bundle.tokenizer, CLASSNAMES, TEMPLATES),
                                   from_tower, rtol=0, atol=0)


def test_head_follows_the_current_tower_and_refresh_is_in_place(bundle, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROBUSTFT_CACHE", str(tmp_path))
    tower = TextTower.from_clip(bundle.model)
    classifier = ImageClassifier(bundle.model.visual, zeroshot_head_from_text(
        tower, bundle.tokenizer, CLASSNAMES, TEMPLATES), bundle.preprocess)
    with torch.no_grad():
        tower.transformer.resblocks[0].mlp.c_fc.weight.add_(0.3 * torch.randn_like(
            tower.transformer.resblocks[0].mlp.c_fc.weight))
        tower.logit_scale.add_(0.5)
        classifier.head.bias.add_(1.0)
    weight, bias = classifier.head.weight, classifier.head.bias
    old = weight.detach().clone()
    refresh_head(classifier, tower, bundle.tokenizer, CLASSNAMES, TEMPLATES)
    assert classifier.head.weight is weight and classifier.head.bias is bias
    assert not torch.allclose(weight.detach(), old)
    assert torch.equal(bias.detach(), torch.zeros(len(CLASSNAMES)))
    trained = load_clip("robustft-tiny", "none").model.eval()
    trained.load_state_dict(tower.state_dict(), strict=False)
    reference = open_clip.build_zero_shot_classifier(trained, bundle.tokenizer, CLASSNAMES, TEMPLATES, device="cpu")
    torch.testing.assert_close(weight.detach(), (reference.T * trained.logit_scale.exp()).detach(),
                               rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.rglob("*.safetensors"))  # the disk cache is never used
    with pytest.raises(ModelError, match="classifier head is"):
        refresh_head(classifier, tower, bundle.tokenizer, CLASSNAMES[:3], TEMPLATES)
    with pytest.raises(ConfigError):
        zeroshot_head_from_text(tower, bundle.tokenizer, [], TEMPLATES)
    assert isinstance(zeroshot_head_from_text(tower, bundle.tokenizer, ["cat"], ["{}"]), ClassifierHead)


# ----------------------------------------------------------------------------- caption rows
@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16, 17, 100, 1000, 4097, 12345])
def test_feistel_permutation_is_a_bijection(size: int) -> None:
    out = FeistelPermutation(size, key=11)(np.arange(size))
    assert out.dtype == np.int64 and sorted(out.tolist()) == list(range(size))


def test_feistel_orders_differ_by_key_and_look_shuffled() -> None:
    size = 10_007
    a, b = FeistelPermutation(size, 1)(np.arange(size)), FeistelPermutation(size, 2)(np.arange(size))
    assert not np.array_equal(a, b) and not np.array_equal(a, np.arange(size))
    assert np.mean(a == b) < 0.01 and np.mean(a == np.arange(size)) < 0.01
    assert abs(np.corrcoef(np.arange(size), a)[0, 1]) < 0.05
    assert np.array_equal(FeistelPermutation(size, 1)(np.arange(size)), a)  # deterministic
    big = FeistelPermutation(1_281_167 * 80, 0)(np.arange(200_000))  # ImageNet's table, no materialisation
    assert len(np.unique(big)) == big.size and big.min() >= 0 and big.max() < 1_281_167 * 80
    with pytest.raises(ConfigError):
        FeistelPermutation(0, 1)
    with pytest.raises(ConfigError):
        FeistelPermutation(5, 1)([5])


def _epoch(sampler: CaptionRowSampler, epoch: int, skip: int = 0) -> list[int]:
    sampler.set_epoch(epoch, skip=skip)
    return list(sampler)


def test_stream_reshuffles_only_when_the_table_is_exhausted() -> None:
    n, t, g = 10, 3, 4  # 30 rows; epochs of 10 // 4 = 2 batches = 8 rows
    sampler = CaptionRowSampler(n, t, global_batch=g, seed=5)
    assert sampler.num_batches == 2 and len(sampler) == 8
    stream = [row for e in range(15) for row in _epoch(sampler, e)]  # 120 rows = 4 passes
    passes = [stream[i : i + 30] for i in range(0, 120, 30)]
    for rows in passes:
        assert sorted(rows) == list(range(30))
    assert len({tuple(p) for p in passes}) == 4
    assert _epoch(CaptionRowSampler(n, t, global_batch=g, seed=6), 0) != stream[:8]


@pytest.mark.parametrize("micro", [1, 2, 4])
def test_two_ranks_split_each_global_batch_of_one_rank(micro: int) -> None:
    n, t, g = 50, 4, 8
    single = CaptionRowSampler(n, t, global_batch=g, seed=1)
    ranks = [CaptionRowSampler(n, t, rank=r, world_size=2, global_batch=g, seed=1) for r in range(2)]
    for epoch in (0, 3):
        whole = _epoch(single, epoch)
        parts = [_epoch(s, epoch) for s in ranks]
        assert len(whole) == 6 * g and all(len(p) == len(whole) // 2 for p in parts)
        # Per-rank micro-batches of `micro` rows: step s of both ranks together is single-process rows
        # [s * 2 * micro, (s + 1) * 2 * micro), whatever micro divides the per-rank batch.
        for s in range(len(parts[0]) // micro):
            union = sorted(parts[0][s * micro : (s + 1) * micro] + parts[1][s * micro : (s + 1) * micro])
            assert union == sorted(whole[s * 2 * micro : (s + 1) * 2 * micro])


def test_skip_resumes_exactly_and_keyed_mode() -> None:
    sampler = CaptionRowSampler(20, 5, rank=1, world_size=2, global_batch=6, seed=2)
    full = _epoch(sampler, 4)
    assert _epoch(sampler, 4, skip=5) == full[5:] and len(sampler) == len(full) - 5
    gen = torch.Generator()
    keyed = CaptionRowSampler(20, 5, rank=1, world_size=2, global_batch=6, seed=2, keyed=True, generator=gen)
    keyed.set_epoch(4, skip=5)
    first = gen.initial_seed()
    assert list(keyed) == [(4, row) for row in full[5:]]
    keyed.set_epoch(4, skip=5)
    assert gen.initial_seed() == first


def test_sampler_errors() -> None:
    with pytest.raises(ConfigError, match="not divisible"):
        CaptionRowSampler(20, 2, world_size=3, global_batch=8)
    with pytest.raises(ConfigError, match="no full global batch"):
        CaptionRowSampler(5, 2, global_batch=8)
    with pytest.raises(ConfigError, match="rank"):
        CaptionRowSampler(20, 2, rank=2, world_size=2, global_batch=8)
    with pytest.raises(ConfigError, match="skip"):
        CaptionRowSampler(20, 2, global_batch=8).set_epoch(0, skip=17)


class _Images(torch.utils.data.Dataset):
    """Image i is a constant image of value i / 100 with label i % 3; image 4 is unreadable."""

    def __len__(self) -> int:
        return 9

    def __getitem__(self, i: int):
        if i == 4:
            return None
        return torch.full((3, 2, 2), i / 100), i % 3, i


def test_caption_dataset_collate_and_caption_text() -> None:
    rows = CaptionDataset(_Images(), 3)
    assert len(rows) == 27
    image, label, index, template = rows[7 * 3 + 2]
    assert (label, index, template) == (1, 7, 2) and image[0, 0, 0].item() == pytest.approx(0.07)
    assert rows[4 * 3 + 1] is None
    batch = collate_caption_rows([rows[0], rows[13], rows[26]])
    assert batch["n_bad"] == 1 and batch["index"].tolist() == [0, 8]
    assert batch["template"].tolist() == [0, 2] and batch["label"].tolist() == [0, 2]
    assert batch["image"].shape == (2, 3, 2, 2)
    empty = collate_caption_rows([None])
    assert empty["template"].shape == (0,) and empty["n_bad"] == 1
    names = ["cat", "dog", "tree"]
    assert captions(batch["label"], batch["template"], names, TEMPLATES) == ["a photo of a cat.", "itap of a tree."]
    with pytest.raises(ConfigError, match="label 3"):
        captions([3], [0], names, TEMPLATES)
    with pytest.raises(ConfigError, match="template index 5"):
        captions([0], [5], names, TEMPLATES)


def test_loader_over_caption_rows_matches_across_world_sizes() -> None:
    rows = CaptionDataset(_Images(), 2)

    def run(rank: int, world: int) -> list[list[tuple[int, int]]]:
        gen = torch.Generator()
        sampler = CaptionRowSampler(9, 2, rank=rank, world_size=world, seed=0, global_batch=4, generator=gen)
        loader = DataLoader(rows, batch_size=4 // world, sampler=sampler, generator=gen,
                            collate_fn=collate_caption_rows, drop_last=True)
        sampler.set_epoch(1)
        return [list(zip(b["index"].tolist(), b["template"].tolist())) for b in loader]

    single, r0, r1 = run(0, 1), run(0, 2), run(1, 2)
    assert len(single) == 2 == len(r0) == len(r1)
    for s in range(2):
        assert sorted(r0[s] + r1[s]) == sorted(single[s])


# ----------------------------------------------------------------------------- 2 gloo processes == 1 process
class _TwoTowers(nn.Module):
    """A toy CLIP: linear image and text towers and a trainable log temperature, forward like CLIP's."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(123)
        self.image = nn.Linear(6, 4)
        self.text = nn.Linear(5, 4)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.image(x), self.text(t), self.logit_scale


def _global_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return torch.randn(8, 6, generator=gen), torch.randn(8, 5, generator=gen), torch.tensor([0, 1, 0, 2, 1, 1, 3, 0])


# Rank slices of the 8-row global batch: equal halves, and unequal (3 + 5, 8 + 0) sizes.
_SPLITS = {"equal": (4, 4), "unequal": (3, 5), "empty": (8, 0)}


def _single_process_grads(multi: bool) -> dict[str, torch.Tensor]:
    model = _TwoTowers()
    x, t, labels = _global_batch()
    img, txt, scale = model(x, t)
    clip_contrastive_loss(img, txt, scale, labels=labels if multi else None).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _gather_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    env = init_distributed("cpu", timeout_s=60.0)
    report: dict = {}
    x, t, labels = _global_batch()
    for split_name, sizes in _SPLITS.items():
        lo = sum(sizes[:rank])
        hi = lo + sizes[rank]
        for multi in (False, True):
            model = _TwoTowers()
            wrapped = env.wrap_ddp(model)
            img, txt, scale = wrapped(x[lo:hi], t[lo:hi])
            all_img, all_txt = all_gather_with_grad(img, env), all_gather_with_grad(txt, env)
            all_labels = all_gather_with_grad(labels[lo:hi], env)
            # Every rank computes the same global loss, exactly as one process would.
            loss = clip_contrastive_loss(all_img, all_txt, scale, labels=all_labels if multi else None)
            loss.backward()
            report[f"{split_name}-{multi}"] = {
                "loss": loss.item(), "labels": all_labels.tolist(),
                "grads": {name: p.grad.tolist() for name, p in model.named_parameters()}}
    # The raw convention: d/d(local) of a loss over the gathered tensor is the SUM over ranks.
    local = torch.full((rank + 1, 2), float(rank), requires_grad=True)
    gathered = all_gather_with_grad(local, env)
    weights = torch.arange(6.0).reshape(3, 2)
    (gathered * weights).sum().backward()
    report["raw"] = {"gathered": gathered.tolist(), "grad": local.grad.tolist()}
    again = local.detach().clone().requires_grad_(True)  # env=None: torch's default process group
    (all_gather_with_grad(again) * weights).sum().backward()
    report["raw_default_group"] = again.grad.tolist()
    Path(out, f"rank{rank}.json").write_text(json.dumps(report))
    env.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_gloo_processes_gather_with_grad_match_one_process(tmp_path: Path) -> None:
    mp.spawn(_gather_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    x, t, labels = _global_batch()
    for multi in (False, True):
        expected = _single_process_grads(multi)
        model = _TwoTowers()
        img, txt, scale = model(x, t)
        single_loss = clip_contrastive_loss(img, txt, scale, labels=labels if multi else None).item()
        for split_name in _SPLITS:
            for report in reports:
                entry = report[f"{split_name}-{multi}"]
                assert entry["labels"] == labels.tolist()
                assert entry["loss"] == pytest.approx(single_loss, rel=1e-6)
                for name, grad in expected.items():
                    torch.testing.assert_close(torch.tensor(entry["grads"][name]), grad, rtol=1e-5, atol=1e-6,
                                               msg=f"{split_name} multi={multi} {name}")
    weights = torch.arange(6.0).reshape(3, 2)
    for rank, report in enumerate(reports):
        assert report["raw"]["gathered"] == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]
        rows = slice(0, 1) if rank == 0 else slice(1, 3)
        assert report["raw"]["grad"] == (2 * weights[rows]).tolist()  # summed over the 2 ranks
        assert report["raw_default_group"] == report["raw"]["grad"]
