"""BEiT's visual tokenizers: the discrete VAE, BEiT v2's VQ-KD, the tokenizer file, BEiT v2's patch
aggregation, exact resume of tokenizer runs, and the pretrain chain dvae -> beit, vqkd -> beit2."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.utils.data import Dataset

import vitlab
from vitlab.checkpoints import CheckpointError, read_vitlab, save_model
from vitlab.cli.main import main
from vitlab.ssl import VQKD, BEiT, BEiT2, KMeansTokenizer, load_tokenizer, save_tokenizer
from vitlab.ssl.dvae import (
    DiscreteVAE,
    DVAEConfig,
    DVAEObjective,
    DVAETokenizer,
    gumbel_temperature,
    logit_laplace_nll,
)
from vitlab.ssl.tokenizer import Tokenizer
from vitlab.ssl.vqkd import NormEMAQuantizer
from vitlab.train import Recipe, fit
from vitlab.train.state import load_train_state

torch.set_num_threads(1)


def tiny(**kw):
    torch.manual_seed(0)
    opts = dict(num_classes=0, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
    opts.update(kw)
    return vitlab.create_model("vit_tiny_patch16_224", **opts)


def tiny_dvae(**kw) -> DiscreteVAE:
    torch.manual_seed(0)
    opts = dict(img_size=(16, 16), in_chans=3, patch_size=4, vocab_size=16, embed_dim=8, hidden_dim=8)
    opts.update(kw)
    return DiscreteVAE(DVAEConfig(**opts))


def teacher_model():
    """Another width and patch grid than the encoders here (2x2 vs 4x4): exercises the resizing of targets."""
    return tiny(patch_size=8, embed_dim=24, depth=1, num_heads=2)


def images(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


class FixedTokenizer(torch.nn.Module):
    """A tokenizer that returns given ids (for tests of the objectives)."""

    kind = "fixed"

    def __init__(self, ids: torch.Tensor, vocab: int) -> None:
        super().__init__()
        self.ids, self._vocab = ids, vocab

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def tokenize(self, pixels):
        return self.ids

    def token_grid(self, size):
        return tuple(self.ids.shape[1:])

    def config(self):
        return {}


# ---------------------------------------------------------------------------------------------- dVAE
def test_gumbel_temperature_is_a_cosine_from_one_to_a_sixteenth():
    assert gumbel_temperature(0, 100) == 1.0
    assert gumbel_temperature(50, 100) == pytest.approx((1 + 1 / 16) / 2)
    assert gumbel_temperature(100, 100) == pytest.approx(1 / 16)
    assert gumbel_temperature(1000, 100) == pytest.approx(1 / 16)  # held after annealing
    taus = [gumbel_temperature(s, 100) for s in range(101)]
    assert all(a > b for a, b in zip(taus, taus[1:], strict=False))
    # the objective reads the step from its saved clock, over `anneal` x the run
    obj = DVAEObjective(tiny_dvae(), anneal=0.5)
    obj.setup(tiny_dvae(), steps_per_epoch=10, total_steps=200)
    obj.after_optimizer_step(50)
    assert obj.temperature(int(obj.clock.step)) == pytest.approx((1 + 1 / 16) / 2)
    assert obj.state_dict()["clock"]["step"] == 50
    assert obj.beta(0) == 0 and obj.beta(5) == pytest.approx(obj.kl_weight / 2) and obj.beta(10) == obj.kl_weight


def test_logit_laplace_loss_is_a_normalised_density():
    """exp(-nll) integrates to 1 over the squeezed pixel range when the mass lies inside it."""
    x = torch.linspace(0, 1, 20001)
    nll = logit_laplace_nll(torch.zeros(()), torch.tensor(math.log(0.1)), x)  # mu 0 (y = 0.5), scale 0.1
    dy = 0.8 * (x[1] - x[0])  # y = 0.8 x + 0.1
    assert float(torch.exp(-nll).sum() * dy) == pytest.approx(1.0, abs=2e-3)
    dvae = tiny_dvae(in_chans=1, img_size=(4, 4), patch_size=4)
    out = torch.zeros(1, 2, 1, 1)
    out[:, 1] = math.log(0.1)
    assert float(dvae.recon_loss(out, torch.full((1, 1, 1, 1), 0.3))) == pytest.approx(
        float(logit_laplace_nll(torch.zeros(()), torch.tensor(math.log(0.1)), torch.tensor(0.3))))
    # the reconstruction is the distribution's centre, mapped back to pixels
    assert float(dvae.reconstruction(out)) == pytest.approx(0.5)


@pytest.mark.parametrize("patch,recon", [(4, "logit_laplace"), (6, "mse"), (1, "l1")])
def test_dvae_tokens_lie_on_the_patch_grid(patch, recon):
    size = 12 if patch == 6 else 16
    dvae = tiny_dvae(img_size=(size, size), patch_size=patch, recon=recon)
    tok = DVAETokenizer(dvae)
    assert isinstance(tok, Tokenizer)
    ids = tok.tokenize(torch.rand(2, 3, size, size))
    assert ids.shape == (2, size // patch, size // patch) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < 16
    assert tok.token_grid((size, size)) == (size // patch, size // patch)
    assert dvae(torch.rand(2, 3, size, size)).shape == (2, 3, size, size)
    if patch > 1:
        with pytest.raises(ValueError, match="multiple of its patch size"):
            tok.tokenize(torch.rand(1, 3, size + 1, size))


def blocky(n: int) -> torch.Tensor:
    """Images whose 4x4 patches are each one of four flat colours: a 16-code dVAE can represent them exactly."""
    g = torch.Generator().manual_seed(0)
    colours = torch.tensor([[0.1, 0.1, 0.1], [0.9, 0.2, 0.2], [0.2, 0.9, 0.2], [0.9, 0.9, 0.9]])
    grid = colours[torch.randint(0, 4, (n, 4, 4), generator=g)]  # (n, 4, 4, 3)
    return grid.permute(0, 3, 1, 2).repeat_interleave(4, 2).repeat_interleave(4, 3)  # (n, 3, 16, 16)


def test_dvae_loss_decreases_in_a_few_steps():
    dvae = tiny_dvae()
    obj = DVAEObjective(dvae)
    obj.setup(dvae, steps_per_epoch=16, total_steps=16)
    opt = torch.optim.Adam(dvae.parameters(), lr=1e-2)
    x = blocky(8)
    torch.manual_seed(0)
    losses = []
    for s in range(16):
        loss, metrics = obj.step(dvae, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        obj.after_optimizer_step(s + 1)
        losses.append(float(loss.detach()))
        assert {"recon_mse", "kl", "tau", "usage"} <= set(metrics)
    assert sum(losses[-3:]) / 3 < 0.6 * sum(losses[:3]) / 3, losses
    assert metrics["tau"] < 0.1  # annealed over the run
    assert DVAETokenizer(dvae).tokenize(x).shape == (8, 4, 4)


def test_dvae_kl_to_uniform_is_zero_for_a_uniform_posterior_and_log_v_for_a_certain_one():
    dvae = tiny_dvae()
    obj = DVAEObjective(dvae)
    obj.setup(dvae, steps_per_epoch=1, total_steps=1)
    last = dvae.encoder[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
    _, m = obj.step(dvae, images(2))
    assert float(m["kl"]) == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        last.bias[3] = 100.0
    _, m = obj.step(dvae, images(2))
    assert float(m["kl"]) == pytest.approx(math.log(16), abs=1e-4)
    assert m["usage"] == 1 / 16


# ---------------------------------------------------------------------------------------------- VQ-KD
def test_norm_ema_codebook_update_matches_a_hand_computed_case():
    q = NormEMAQuantizer(3, 2, decay=0.5, kmeans_init=False)
    q.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    z = torch.tensor([[2.0, 1.0], [1.0, 0.2], [0.1, 1.0]])
    zn, z_q, ids = q.quantize(z)
    assert ids.tolist() == [0, 0, 1]
    assert torch.allclose(zn.norm(dim=-1), torch.ones(3))
    assert torch.equal(z_q, q.codebook[[0, 0, 1]])
    q.accumulate(zn, ids)
    q.ema_update(step=7)
    # by hand: code 0 gets the normalised mean of its two unit vectors, blended half-half and renormalised
    a = (2 / math.sqrt(5), 1 / math.sqrt(5))
    b = (1 / math.sqrt(1.04), 0.2 / math.sqrt(1.04))
    mean = ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2)
    r = math.hypot(*mean)
    e0 = (0.5 * 1 + 0.5 * mean[0] / r, 0.5 * 0 + 0.5 * mean[1] / r)
    e0 = (e0[0] / math.hypot(*e0), e0[1] / math.hypot(*e0))
    c = (0.1 / math.sqrt(1.01), 1 / math.sqrt(1.01))
    e1 = (0.5 * c[0], 0.5 + 0.5 * c[1])
    e1 = (e1[0] / math.hypot(*e1), e1[1] / math.hypot(*e1))
    expected = torch.tensor([e0, e1, (-1.0, 0.0)])  # the unused code keeps its value
    assert torch.allclose(q.codebook, expected, atol=1e-6)
    assert torch.allclose(q.codebook.norm(dim=-1), torch.ones(3))
    assert q.last_used.tolist() == [7, 7, 0] and float(q.pending_counts.sum()) == 0
    assert q.dead_codes(5) == 1 and q.dead_codes(8) == 0


def test_kmeans_init_gives_unit_codes_at_the_clusters():
    torch.manual_seed(0)
    q = NormEMAQuantizer(2, 2, kmeans_init=True)
    assert not bool(q.initted)
    z = torch.cat([torch.tensor([[1.0, 0.05]]) + 0.01 * torch.randn(20, 2),
                   torch.tensor([[0.05, -1.0]]) + 0.01 * torch.randn(20, 2)])
    q.kmeans_init_(z)
    assert bool(q.initted)
    got = sorted(q.codebook.tolist())
    assert got[0] == pytest.approx([0.05, -1.0], abs=0.05) and got[1] == pytest.approx([1.0, 0.05], abs=0.05)
    assert torch.allclose(q.codebook.norm(dim=-1), torch.ones(2))


def vqkd_setup(**kw):
    model = tiny()
    opts = dict(teacher=teacher_model(), vocab_size=8, code_dim=4, decoder_depth=1, kmeans_init=False)
    opts.update(kw)
    return model, VQKD(model, **opts)


def test_vqkd_straight_through_gradient_reaches_the_encoder_and_the_teacher_gets_none():
    model, obj = vqkd_setup(beta=0.0)  # no commitment loss: only the straight-through path carries gradients
    before = {k: v.clone() for k, v in obj.teacher.state_dict().items()}
    x = images(2) * 2 - 1
    loss, metrics = obj.step(model, x)
    loss.backward()
    assert {"rec_loss", "quant_loss", "usage", "dead_codes"} <= set(metrics)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.head.parameters())
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in obj.teacher.parameters())
    assert set(obj.trainable_modules()) == {"head", "decoder"}  # the codebook moves by EMA, the teacher not at all
    assert "teacher" not in obj.state_dict()
    obj.after_optimizer_step(1)
    assert all(torch.equal(before[k], v) for k, v in obj.teacher.state_dict().items())
    assert torch.allclose(obj.quantizer.codebook.norm(dim=-1), torch.ones(8))
    # the straight-through estimator: the decoder's input gradient passes to z unchanged
    z = torch.randn(5, 4, requires_grad=True)
    zn, z_q, _ = obj.quantizer.quantize(z)
    w = torch.randn(5, 4)
    (w * (zn + (z_q - zn).detach())).sum().backward()
    z2 = z.detach().clone().requires_grad_()
    (w * torch.nn.functional.normalize(z2, dim=-1)).sum().backward()  # as if there were no quantiser
    assert torch.allclose(z.grad, z2.grad)


def test_vqkd_targets_are_the_teachers_features_and_the_loss_is_cosine():
    model, obj = vqkd_setup()
    x = images(2) * 2 - 1  # the encoder's input (mean/std 0.5)
    from vitlab.ssl.vqkd import cosine_loss, teacher_features

    target = teacher_features(obj.teacher, (x + 1) / 2, (4, 4))
    assert target.shape == (2, 16, 24)
    own = obj.teacher.forward_features(x)[:, 1:]  # (2, 4, 24) on the teacher's 2x2 grid
    corner = target.view(2, 4, 4, 24)[:, 0, 0]
    assert torch.allclose(corner, own[:, 0], atol=1e-5)  # bilinear resize keeps the corner cell
    a = torch.randn(3, 5)
    assert float(cosine_loss(a, 2 * a)) == pytest.approx(0.0, abs=1e-6)
    assert float(cosine_loss(a, -a)) == pytest.approx(2.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------- BEiT v2
def test_beit2_aggregation_head_gets_gradients_and_both_losses_read_masked_positions_only():
    model = tiny(depth=3)
    ids = torch.randint(0, 8, (2, 4, 4), generator=torch.Generator().manual_seed(1))
    obj = BEiT2(model, tokenizer=FixedTokenizer(ids, 8))
    assert obj.early_layers == 1 and set(obj.trainable_modules()) == {"mask_embedding", "head", "aggregation"}
    x = images(2) * 2 - 1
    torch.manual_seed(3)
    loss, m = obj.step(model, x)
    loss.backward()
    assert {"mlm_acc", "agg_acc", "loss_mim", "loss_agg"} <= set(m)
    assert float(loss.detach()) == pytest.approx(float(m["loss_mim"] + m["loss_agg"]))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in obj.aggregation.parameters())
    torch.manual_seed(3)
    masker = obj.masker()
    model.forward_features(x, mask=masker)
    mask = masker.mask.view(2, 4, 4)
    assert 0 < int(mask.sum()) < 32
    # other targets outside the mask: the same losses; inside: others
    for where, same in ((~mask, True), (mask, False)):
        obj.tokenizer.ids = torch.where(where, (ids + 1) % 8, ids)
        torch.manual_seed(3)
        _, m2 = obj.step(model, x)
        for k in ("loss_mim", "loss_agg"):
            assert (float(m2[k]) == pytest.approx(float(m[k]), abs=1e-6)) is same, (k, where)


def test_beit2_needs_a_class_token_and_a_matching_tokenizer_grid():
    with pytest.raises(ValueError, match="class token"):
        BEiT2(tiny(class_token=False, global_pool="avg"), tokenizer=FixedTokenizer(torch.zeros(1, 4, 4).long(), 8))
    with pytest.raises(ValueError, match="3x3 token grid.*4x4 patch grid"):
        BEiT(tiny(), tokenizer=FixedTokenizer(torch.zeros(1, 3, 3).long(), 8))
    with pytest.raises(ValueError, match="vocab_size=4 but the fixed tokenizer has 8"):
        BEiT(tiny(), vocab_size=4, tokenizer=FixedTokenizer(torch.zeros(1, 4, 4).long(), 8))


# ---------------------------------------------------------------------------------------------- the file
def test_tokenizer_files_round_trip_without_code_and_refuse_other_files(tmp_path):
    x = images(3)
    model, obj = vqkd_setup()
    toks = {"dvae": DVAETokenizer(tiny_dvae()), "vqkd": obj.tokenizer(model),
            "kmeans": KMeansTokenizer(8, (4, 4), 3).fit(images(6, seed=1), iters=3)}
    for kind, tok in toks.items():
        tok.eval()
        path = save_tokenizer(tok, tmp_path / f"{kind}.safetensors")
        back = load_tokenizer(path)
        assert back.kind == kind and back.vocab_size == tok.vocab_size
        assert torch.equal(back.tokenize(x), tok.tokenize(x)), kind
        assert not any(p.requires_grad for p in back.parameters())
    run = tmp_path / "run"
    run.mkdir()
    save_tokenizer(toks["dvae"], run / "tokenizer.safetensors")
    assert load_tokenizer(run).kind == "dvae"  # a run directory
    save_model(tiny(), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a vitlab tokenizer"):
        load_tokenizer(tmp_path / "model.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no tokenizer.safetensors"):
        load_tokenizer(tmp_path / "empty")
    torch.save({"a": torch.zeros(1)}, tmp_path / "tok.pt")
    with pytest.raises(CheckpointError, match="expected a tokenizer.safetensors"):
        load_tokenizer(tmp_path / "tok.pt")


# ---------------------------------------------------------------------------------------------- resume
class Pixels(Dataset):
    def __init__(self, n: int, scale: bool) -> None:
        self.x, self.scale = images(n), scale

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return (self.x[i] * 2 - 1 if self.scale else self.x[i]), 0


def recipe(**kw) -> Recipe:
    base = {"name": "tok-test", "epochs": 3, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.05, "warmup_steps": 2,
            "log_every": 1, "augment": False, "val_fraction": 0.0, "clip_grad": 1.0}
    base.update(kw)
    return Recipe(**base)


def dvae_setup():
    m = tiny_dvae()
    return m, DVAEObjective(m, kl_weight=1.0, kl_warmup=0.2), Pixels(40, scale=False)


def vqkd_fit_setup():
    m, obj = vqkd_setup(kmeans_init=True, dead_after=3)
    return m, obj, Pixels(40, scale=True)


@pytest.mark.parametrize("setup", [dvae_setup, vqkd_fit_setup], ids=["dvae", "vqkd"])
def test_resume_of_a_tokenizer_run_is_exact(tmp_path, setup):
    rec = recipe()  # 5 steps per epoch, 15 in all
    model, obj, data = setup()
    straight = fit(model, rec, train_set=data, output_dir=tmp_path / "a", objective=obj, progress=False)
    model, obj, data = setup()
    fit(model, rec, train_set=data, output_dir=tmp_path / "b", objective=obj, progress=False, until_step=7)
    torch.manual_seed(999)
    model, obj, data = setup()
    resumed = fit(model, rec, train_set=data, output_dir=tmp_path / "b", objective=obj, progress=False, resume=True)
    assert resumed.step == 15
    a, _ = read_vitlab(tmp_path / "a" / "model.safetensors")
    b, _ = read_vitlab(tmp_path / "b" / "model.safetensors")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    sa = load_train_state(tmp_path / "a" / "train_state.pt")["objective"]
    sb = load_train_state(tmp_path / "b" / "train_state.pt")["objective"]
    assert set(sa) == set(obj.modules()) - set(obj.unsaved)
    for name in sa:
        for k in sa[name]:
            assert torch.allclose(sa[name][k].float(), sb[name][k].float(), atol=1e-6, rtol=0), (name, k)
    assert straight.history[-1]["loss"] == pytest.approx(resumed.history[-1]["loss"], abs=1e-6)
    key = {"dvae": "tau", "vqkd": "dead_codes"}[obj.name]
    assert straight.history[-1][key] == pytest.approx(resumed.history[-1][key], abs=1e-9)


def test_resume_with_a_longer_run_continues_the_temperature_schedule(tmp_path):
    """A dVAE run of 15 steps stopped at 7 and resumed as 30: tau goes on from its value at step 7 (no jump back
    up to the 30-step cosine's) and reaches tau_end at the new end, as the learning rate does; stopped again and
    resumed with that length, it equals the run resumed once (the re-planned schedule is saved)."""
    def taus(run):
        recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["tau"] for r in recs if r["kind"] == "train"}

    rec = recipe()  # 5 steps per epoch, 15 in all
    for run, stops in (("a", [7, None]), ("b", [7, 20, None])):
        for i, until in enumerate(stops):
            model, obj, data = dvae_setup()
            fit(model, rec if i == 0 else rec.replace(epochs=6), train_set=data, output_dir=tmp_path / run,
                objective=obj, progress=False, until_step=until, resume=i > 0)
    a, b = taus(tmp_path / "a"), taus(tmp_path / "b")
    old = [gumbel_temperature(s, 15, 1.0, 1 / 16) for s in range(15)]
    assert [a[s + 1] for s in range(7)] == pytest.approx(old[:7], rel=1e-5)
    # from step 7 on: progress 7/15 at step 7, running linearly to 1 at step 30
    expect = [gumbel_temperature(7 / 15 + (1 - 7 / 15) * (s - 7) / 23, 1.0, 1.0, 1 / 16) for s in range(7, 30)]
    assert [a[s + 1] for s in range(7, 30)] == pytest.approx(expect, rel=1e-5)  # logged to 6 digits
    assert all(x >= y for x, y in zip(list(a.values()), list(a.values())[1:]))  # never rises
    assert gumbel_temperature(7, 30, 1.0, 1 / 16) > a[8] * 1.2  # what a restart of the cosine over 30 would give
    assert b == pytest.approx(a)  # a second resume keeps the re-planned schedule


# ---------------------------------------------------------------------------------------------- the CLI
SMALL = ["--set", "model_overrides.depth=2", "--set", "model_overrides.embed_dim=32", "--set",
         "model_overrides.num_heads=2", "--set", "batch_size=32"]
FAST = ["--data", "digits", "--recipe", "digits", "--steps", "2", "--no-progress", "--set", "log_every=1", *SMALL]


def test_pretrain_dvae_then_beit_with_its_tokenizer(tmp_path):
    tok_run = tmp_path / "dvae"
    assert main(["pretrain", "--method", "dvae", *FAST, "--opt", "vocab_size=16", "--opt", "hidden_dim=8",
                 "--opt", "embed_dim=8", "--output", str(tok_run)]) == 0
    results = json.loads((tok_run / "results.json").read_text())
    assert results["tokenizer"] == str(tok_run / "tokenizer.safetensors")
    tok = load_tokenizer(tok_run)
    assert tok.kind == "dvae" and tok.vocab_size == 16 and tok.token_grid((8, 8)) == (4, 4)  # digits: 8 px, patch 2
    # the dVAE run's model file is not a backbone: loading it says so and points at the tokenizer file
    with pytest.raises(CheckpointError, match="not a registered vitlab model.*--tokenizer"):
        vitlab.load_model(tok_run / "model.safetensors")
    out = tmp_path / "beit"
    assert main(["pretrain", "--method", "beit", *FAST, "--tokenizer", str(tok_run), "--output", str(out)]) == 0
    state = load_train_state(out / "train_state.pt")
    assert state["objective"]["tokenizer"].keys() == tok.state_dict().keys()
    assert json.loads((out / "job.json").read_text())["options"]["tokenizer"] == str(tok_run.absolute())
    assert "dvae tokens" in json.loads((out / "recipe.json").read_text())["resolved"]["objective"]
    sd, meta = read_vitlab(out / "model.safetensors")
    assert meta["config"]["num_classes"] == 0
    # the run keeps its tokenizer: a resumed run needs nothing outside its directory
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(load_tokenizer(out).tokenize(x), tok.tokenize(x))
    (tok_run / "tokenizer.safetensors").unlink()
    assert main(["pretrain", "--output", str(out), "--resume", "--steps", "3", "--no-progress"]) == 0
    assert load_train_state(out / "train_state.pt")["step"] == 3


def test_pretrain_vqkd_with_a_teacher_then_beit2(tmp_path, caplog):
    teacher = tmp_path / "teacher.safetensors"
    torch.manual_seed(0)
    save_model(vitlab.create_model("vit_tiny_patch16_224", num_classes=0, img_size=8, in_chans=1, patch_size=4,
                                   embed_dim=16, depth=1, num_heads=2), teacher)
    assert main(["pretrain", "--method", "vqkd", *FAST, "--output", str(tmp_path / "x")]) != 0
    assert "--method vqkd needs --teacher CKPT" in caplog.text
    tok_run = tmp_path / "vqkd"
    assert main(["pretrain", "--method", "vqkd", *FAST, "--teacher", str(teacher), "--opt", "vocab_size=16",
                 "--opt", "code_dim=4", "--output", str(tok_run)]) == 0
    last = [json.loads(line) for line in (tok_run / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"rec_loss", "quant_loss", "usage", "dead_codes"} <= set(last)
    tok = load_tokenizer(tok_run / "tokenizer.safetensors")
    assert tok.kind == "vqkd" and tok.vocab_size == 16
    assert torch.allclose(tok.quantizer.codebook.norm(dim=-1), torch.ones(16), atol=1e-5)
    assert main(["pretrain", "--method", "beit2", *FAST, "--output", str(tmp_path / "y")]) != 0
    assert "--method beit2 needs --tokenizer" in caplog.text
    out = tmp_path / "beit2"
    assert main(["pretrain", "--method", "beit2", *FAST, "--tokenizer", str(tok_run), "--opt", "early_layers=1",
                 "--output", str(out)]) == 0
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"mlm_acc", "agg_acc", "loss_mim", "loss_agg"} <= set(last)
    sd, meta = read_vitlab(out / "model.safetensors")
    assert meta["config"]["num_classes"] == 0 and not any("aggregation" in k for k in sd)
