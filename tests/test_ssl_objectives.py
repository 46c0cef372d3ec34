"""Self-supervised objectives: masking statistics, targets, masked-only losses, the DINO teacher, centring."""

from __future__ import annotations

import math

import pytest
import torch

import vitlab
from vitlab.ssl import DINO, MAE, BlockMasking, MaskedPatchPrediction, RandomMasking, patch_grid, patchify
from vitlab.ssl.beit import BEiT, BlockMasker, KMeansTokenizer
from vitlab.ssl.dino import DINOHead, DINOLoss, teacher_momentum
from vitlab.ssl.mae import mae_loss
from vitlab.ssl.mpp import PatchCorruption, mean_colour_targets

torch.set_num_threads(1)


def tiny(**kw):
    torch.manual_seed(0)
    opts = dict(num_classes=0, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
    opts.update(kw)
    return vitlab.create_model("vit_tiny_patch16_224", **opts)


# ------------------------------------------------------------------------------------ the masking hook
def test_masking_hook_keeps_the_chosen_tokens_with_their_positions():
    model = tiny().eval()
    x = torch.randn(2, 3, 16, 16)
    everything = RandomMasking(0.0, noise=torch.arange(16.0).expand(2, 16))  # keeps all, in grid order
    assert torch.allclose(model.forward_features(x, mask=everything), model.forward_features(x), atol=1e-6)
    m = RandomMasking(0.75)
    out = model.forward_features(x, mask=m)
    assert out.shape == (2, 1 + 4, 32)
    # the kept tokens, embedded by hand: patch embedding + own position, class token (+ slot 0) in front
    tokens = model.patch_embed(x) + model.pos_embed[:, 1:]
    kept = torch.gather(tokens, 1, m.ids_keep.unsqueeze(-1).expand(-1, -1, 32))
    seq = torch.cat([(model.cls_token + model.pos_embed[:, :1]).expand(2, -1, -1), kept], dim=1)
    assert torch.allclose(out, model.norm(model.blocks(seq)), atol=1e-5)


def test_patch_grid_is_asked_through_the_hook():
    assert patch_grid(tiny()) == ((4, 4), (4, 4))
    with pytest.raises(TypeError, match="token-masking hook"):
        patch_grid(vitlab.create_model("resnet18", num_classes=0, img_size=32) if "resnet18" in vitlab.list_models()
                   else _NoHook())


class _NoHook(torch.nn.Module):
    preprocessing = vitlab.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=8, depth=1,
                                        num_heads=1).preprocessing

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward_features(self, x):
        return x


# ------------------------------------------------------------------------------------------- MAE
def test_random_masking_statistics_over_seeds():
    N, ratio = 49, 0.75
    keep = int(N * (1 - ratio))
    freq = torch.zeros(N)
    for seed in range(200):
        torch.manual_seed(seed)
        m = RandomMasking(ratio)
        m(torch.zeros(3, N, 4), (7, 7))
        assert m.ids_keep.shape == (3, keep)
        assert torch.all(m.mask.sum(1) == N - keep)  # exactly 75% (rounded down kept) removed, per sample
        assert torch.all(m.mask.gather(1, m.ids_keep) == 0)  # kept positions are the zeros of the mask
        ar = torch.arange(N).expand(3, N)
        shuffle = torch.argsort(m.noise, dim=1)
        assert torch.equal(torch.gather(shuffle, 1, m.ids_restore), ar)  # ids_restore inverts the shuffle
        freq += m.mask.sum(0)
    p = freq / (200 * 3)  # every position is removed with probability (N - keep) / N
    assert torch.allclose(p, torch.full((N,), (N - keep) / N), atol=0.08)


def test_mae_targets_are_normalised_per_patch_with_unbiased_variance():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4) ** 1.5
    t = patchify(x, (2, 2))  # (2, 4, 12): pixels of a patch row-major, channels last
    assert t.shape == (2, 4, 12)
    assert torch.equal(t[0, 1, :3], x[0, :, 0, 2])  # first pixel of the patch at row 0, column 1
    assert torch.equal(t[0, 1, 3:6], x[0, :, 0, 3])
    pred = torch.zeros_like(t)
    mask = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 0]])
    patch = t[0, 0]
    normed = (patch - patch.mean()) / math.sqrt(float(patch.var(unbiased=True)) + 1e-6)
    assert torch.allclose(mae_loss(pred, t, mask), (normed**2).mean(), atol=1e-6)
    assert torch.allclose(mae_loss(pred, t, mask, norm_pix_loss=False), (patch**2).mean())


def test_mae_loss_reads_removed_patches_only():
    model = tiny()
    mae = MAE(model, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    x = torch.randn(2, 3, 16, 16)
    out = mae.forward(model, x)
    pred = out.pred.detach().requires_grad_(True)
    loss = mae_loss(pred, patchify(x, (4, 4)), out.mask)
    loss.backward()
    visible = out.mask == 0
    assert torch.all(pred.grad[visible] == 0) and torch.any(pred.grad[~visible] != 0)
    # the encoder saw 25% of the patches: one fifth of 1 + 16 tokens
    assert int(out.mask.sum()) == 2 * 12


def test_mae_objective_trains_the_decoder_and_the_encoder():
    model = tiny()
    mae = MAE(model, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    loss, metrics = mae.step(model, (torch.randn(2, 3, 16, 16), torch.zeros(2)))
    loss.backward()
    assert set(mae.trainable_modules()) == {"decoder"} and "recon" in metrics
    assert all(p.grad is not None for p in mae.parameters())
    assert model.patch_embed.proj.weight.grad is not None
    assert mae.decoder.pos_embed.requires_grad is False and "pos_embed" not in mae.decoder.state_dict()


# ------------------------------------------------------------------------------------------- MPP
def test_mpp_corruption_split_over_many_seeds():
    B, N, D = 8, 64, 6
    counts = torch.zeros(3)
    emb = torch.full((D,), 7.0)
    for seed in range(100):
        torch.manual_seed(seed)
        tokens = torch.randn(B, N, D)
        c = PatchCorruption(emb)
        out, keep = c(tokens, (8, 8))
        assert keep is None
        assert torch.all(c.corrupted.sum(1) == N // 2)  # exactly half of every image
        assert torch.equal(c.corrupted, c.replaced | c.swapped | c.kept)
        assert not (c.replaced & c.swapped).any()
        assert torch.equal(out[~c.corrupted], tokens[~c.corrupted])  # untouched patches unchanged
        assert torch.all(out[c.replaced] == 7.0)
        assert torch.equal(out[c.kept], tokens[c.kept])
        b, n = c.swapped.nonzero(as_tuple=True)
        src = c.source[b, n]
        assert torch.all(src != n)  # another patch, of the same image
        assert torch.equal(out[b, n], tokens[b, src])
        counts += torch.stack([c.replaced.sum(), c.swapped.sum(), c.kept.sum()]).float()
    frac = counts / counts.sum()
    assert torch.allclose(frac, torch.tensor([0.8, 0.1, 0.1]), atol=0.01)


def test_mpp_targets_are_3_bit_mean_colours():
    # two 2x2 patches with known mean colours, in [0, 1] pixels, normalised with mean 0.5 / std 0.5
    pix = torch.zeros(1, 3, 2, 4)
    pix[0, :, :, :2] = torch.tensor([0.99, 0.0, 0.5]).view(3, 1, 1)  # levels (7, 0, 4)
    pix[0, 0, 0, 2:], pix[0, 0, 1, 2:] = 0.1, 0.3  # red mean 0.2 -> level 1; green 1 -> 7; blue 0.26 -> 2
    pix[0, 1, :, 2:] = 1.0
    pix[0, 2, :, 2:] = 0.26
    x = (pix - 0.5) / 0.5
    t = mean_colour_targets(x, (2, 2), mean=(0.5,) * 3, std=(0.5,) * 3)
    assert t.tolist() == [[7 * 64 + 0 * 8 + 4, 1 * 64 + 7 * 8 + 2]]
    gray = mean_colour_targets(torch.full((1, 1, 2, 2), 0.0), (2, 2), mean=(0.5,), std=(0.5,))
    assert gray.tolist() == [[4]]  # 8 classes for one channel


def test_mpp_step_predicts_corrupted_patches_only():
    model = tiny(img_size=8, patch_size=2, in_chans=1, mean=(0.5,), std=(0.5,))
    mpp = MaskedPatchPrediction(model)
    assert mpp.head.out_features == 8  # 3 bits of one channel
    loss, metrics = mpp.step(model, torch.randn(4, 1, 8, 8))
    loss.backward()
    assert 0 <= float(metrics["masked_acc"]) <= 1
    assert mpp.mask_embedding.weight.grad is not None and mpp.mask_embedding.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------ DINO
def test_dino_loss_pairs_temperatures_and_centring_order():
    torch.manual_seed(0)
    K, B = 5, 3
    loss_fn = DINOLoss(K, student_temp=0.1, teacher_temp=0.04, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, K))
    old = loss_fn.center.clone()
    s = torch.randn(4 * B, K)  # 2 global + 2 local views
    t = torch.randn(2 * B, K)
    loss, _ = loss_fn(s, t, 4)
    q = torch.softmax((t - old) / 0.04, dim=-1).chunk(2)  # centred with the OLD centre
    ls = torch.log_softmax(s / 0.1, dim=-1).chunk(4)
    terms = [-(q[i] * ls[v]).sum(-1).mean() for i in range(2) for v in range(4) if v != i]
    assert len(terms) == 6
    assert torch.allclose(loss, torch.stack(terms).mean(), atol=1e-5)
    assert torch.equal(loss_fn.center, old)  # the centre moves once per optimiser step (after_optimizer_step)
    loss_fn.update_center()
    assert torch.allclose(loss_fn.center, 0.9 * old + 0.1 * t.mean(0, keepdim=True), atol=1e-6)  # after


def test_dino_head_layout_and_weight_norm():
    head = DINOHead(32, 64, hidden_dim=48, bottleneck_dim=16)
    names = set(head.state_dict())
    assert {"mlp.0.weight", "mlp.2.weight", "mlp.4.weight", "last_layer.parametrizations.weight.original0",
            "last_layer.parametrizations.weight.original1"} <= names
    g = head.last_layer.parametrizations.weight.original0
    assert torch.all(g == 1) and not g.requires_grad  # norm_last_layer: unit-norm rows, fixed
    w = head.last_layer.weight
    assert torch.allclose(w.norm(dim=1), torch.ones(64), atol=1e-5)


def _dino(**kw):
    model = tiny(dynamic_img_size=True)
    d = DINO(model, out_dim=32, hidden_dim=24, bottleneck_dim=8, **kw)
    return model, d


def _views(B=2):
    return [torch.randn(B, 3, 16, 16), torch.randn(B, 3, 16, 16), torch.randn(B, 3, 8, 8), torch.randn(B, 3, 8, 8)]


def test_dino_teacher_gets_no_gradients_and_follows_the_ema_schedule():
    model, d = _dino()
    d.setup(model, steps_per_epoch=3, total_steps=10)
    loss, metrics = d.step(model, (_views(), torch.zeros(2)))
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in d.teacher.parameters())
    assert all(p.grad is None for p in d.teacher_head.parameters())
    assert set(metrics) == {"t_entropy", "collapse"}
    before = [p.clone() for p in d.teacher.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    d.after_optimizer_step(4)  # the 4th update: momentum of iteration index 3
    m = teacher_momentum(3, 10, 0.996)
    assert m == pytest.approx(1 - 0.004 * (math.cos(math.pi * 3 / 10) + 1) / 2)
    for t0, t1, s in zip(before, d.teacher.parameters(), model.parameters(), strict=True):
        assert torch.allclose(t1, m * t0 + (1 - m) * s, atol=1e-6)
    assert teacher_momentum(0, 10) == pytest.approx(0.996) and teacher_momentum(10, 10) == pytest.approx(1.0)
    assert all(0.996 <= teacher_momentum(i, 10) <= teacher_momentum(i + 1, 10) for i in range(10))


def test_dino_last_layer_frozen_in_the_first_epoch_and_per_parameter_clipping():
    model, d = _dino(clip_per_param=0.01)
    d.setup(model, steps_per_epoch=3, total_steps=10)
    loss, _ = d.step(model, (_views(), None))
    loss.backward()
    d.before_optimizer_step(2)  # the third step: still epoch 0
    assert all(p.grad is None for p in d.head.last_layer.parameters())
    for p in list(model.parameters()) + list(d.head.parameters()):
        if p.grad is not None:
            assert float(p.grad.norm()) <= 0.01 + 1e-6  # each parameter on its own
    loss, _ = d.step(model, (_views(), None))
    loss.backward()
    d.before_optimizer_step(3)  # epoch 1: the last layer learns
    assert d.head.last_layer.parametrizations.weight.original1.grad is not None


def test_dino_collapse_is_reported(caplog):
    model, d = _dino(collapse_patience=2)
    d.setup(model, steps_per_epoch=3, total_steps=10)
    with torch.no_grad():  # every output constant: uniform teacher and student, loss = ln K
        for head in (d.head, d.teacher_head):
            head.last_layer.parametrizations.weight.original1.fill_(1.0)  # identical rows
    for _ in range(2):
        loss, metrics = d.step(model, (_views(), None))
    assert float(loss.detach()) == pytest.approx(math.log(32), abs=1e-4) and metrics["collapse"] == 1.0
    assert "collapsed" in caplog.text


# ------------------------------------------------------------------------------------------ BEiT mask
def test_block_masking_statistics_over_seeds():
    gen = BlockMasking((14, 14), 75, min_patches=16)
    counts = []
    for seed in range(200):
        m = gen(torch.Generator().manual_seed(seed))
        n = int(m.sum())
        assert n <= 75
        counts.append(n)
    mean = sum(counts) / len(counts)
    assert 60 <= mean <= 75, mean  # about 40% of 196 patches, slightly below the target as in BEiT
    # blocks, not scattered patches: most masked patches have a masked 4-neighbour
    m = gen(torch.Generator().manual_seed(1)).float()
    nb = torch.nn.functional.conv2d(m[None, None], torch.tensor([[[[0, 1, 0], [1, 0, 1], [0, 1, 0]]]]).float(),
                                    padding=1)[0, 0]
    assert float(((nb > 0) & (m > 0)).sum()) >= 0.9 * float(m.sum())


def test_weighted_knn_votes_with_exp_similarity_over_t():
    from vitlab.ssl.knn import weighted_knn

    train = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0]])
    labels = torch.tensor([0, 0, 1, 1, 1])
    test = torch.tensor([[1.0, 0.05]])
    # k=5: three class-1 neighbours but far away; exp(sim / 0.07) makes the two close ones win
    assert weighted_knn(train, labels, test, 2, k=5, temperature=0.07).tolist() == [0]
    # a very high temperature makes votes equal: the majority wins
    assert weighted_knn(train, labels, test, 2, k=5, temperature=1e6).tolist() == [1]


# ------------------------------------------------------------------------------------------ BEiT
def test_kmeans_tokenizer_separates_two_kinds_of_patch():
    # 2x2 patches that are either a left-right or a top-bottom edge (per-patch normalisation removes level)
    lr = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    tb = lr.T
    img = torch.cat([torch.cat([lr, tb], 1), torch.cat([tb, lr], 1)], 0)  # (4, 4): patches lr, tb / tb, lr
    images = img.expand(3, 1, 4, 4) * torch.tensor([1.0, 2.0, 5.0]).view(3, 1, 1, 1)
    tok = KMeansTokenizer(2, (2, 2), 1).fit(images, iters=5)
    ids = tok(images)
    assert ids.shape == (3, 4)
    assert torch.all(ids[:, 0] == ids[:, 3]) and torch.all(ids[:, 1] == ids[:, 2]) and torch.all(ids[:, 0] != ids[:, 1])


def test_beit_masks_blocks_replaces_embeddings_and_predicts_masked_tokens_only():
    torch.manual_seed(0)
    emb = torch.full((6,), 3.0)
    m = BlockMasker(emb, 0.4)
    tokens = torch.randn(4, 196, 6)
    out, keep = m(tokens, (14, 14))
    assert keep is None and m.mask.shape == (4, 196)
    assert torch.all(m.mask.sum(1) <= round(0.4 * 196)) and torch.all(m.mask.sum(1) >= 16)
    assert torch.all(out[m.mask] == 3.0) and torch.equal(out[~m.mask], tokens[~m.mask])
    model = tiny()
    beit = BEiT(model, vocab_size=8).fit_tokenizer(torch.randn(6, 3, 16, 16), iters=3)
    loss, metrics = beit.step(model, torch.randn(2, 3, 16, 16))
    loss.backward()
    assert "mlm_acc" in metrics and beit.mask_embedding.weight.grad is not None
    assert set(beit.trainable_modules()) == {"mask_embedding", "head"}  # the tokenizer is frozen
    assert "codebook" in beit.state_dict()["tokenizer"]
