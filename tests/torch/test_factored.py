"""Factored per-layer sketches (docs/factored.md): exact against explicit Kronecker matrices times materialised
per-example gradients, unbiased over seeds, and refusing what they cannot compute."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from sketcharray.torch import select_params
from sketcharray.torch.factored import FactoredSketchError, factored_sketch, sketch_batch, split_budget

FACTORS = ("afjl", "qk", "dense")


# ------------------------------------------------------------------ small models
class TinyTransformer(nn.Module):
    """Two pre-norm-free encoder layers written from Linear, LayerNorm and Embedding, with a padding mask,
    position embeddings looked up with (1, T) ids (broadcast over the batch) and masked mean pooling."""

    def __init__(self, vocab=13, hidden=8, ffn=12, layers=2, classes=3, max_len=6):
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden, padding_idx=0)
        self.pos = nn.Embedding(max_len, hidden)
        self.norm0 = nn.LayerNorm(hidden)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            self.layers.append(nn.ModuleDict({
                "q": nn.Linear(hidden, hidden), "k": nn.Linear(hidden, hidden), "v": nn.Linear(hidden, hidden),
                "o": nn.Linear(hidden, hidden), "n1": nn.LayerNorm(hidden),
                "f1": nn.Linear(hidden, ffn), "f2": nn.Linear(ffn, hidden), "n2": nn.LayerNorm(hidden)}))
        self.head = nn.Linear(hidden, classes)

    def forward(self, input_ids, attention_mask):
        t = input_ids.shape[1]
        x = self.norm0(self.tok(input_ids) + self.pos(torch.arange(t)[None, :]))
        additive = (1.0 - attention_mask.float())[:, None, :] * torch.finfo(torch.float32).min
        for layer in self.layers:
            scores = layer["q"](x) @ layer["k"](x).transpose(1, 2) / math.sqrt(x.shape[-1]) + additive
            x = layer["n1"](x + layer["o"](torch.softmax(scores, -1) @ layer["v"](x)))
            x = layer["n2"](x + layer["f2"](F.gelu(layer["f1"](x))))
        mask = attention_mask[..., None].float()
        return self.head((x * mask).sum(1) / mask.sum(1))


class TiedLM(nn.Module):
    """An embedding whose weight is also the output layer's (tied), a per-token loss over unmasked tokens."""

    def __init__(self, vocab=11, hidden=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, input_ids, attention_mask):
        return self.out(torch.tanh(self.mix(self.embed(input_ids))))


class FunctionalTie(TiedLM):
    """The same tie written as ``F.linear(h, self.embed.weight)``: no module sees the second use."""

    def forward(self, input_ids, attention_mask):
        return F.linear(torch.tanh(self.mix(self.embed(input_ids))), self.embed.weight)


def lm_loss(logits, batch):
    ids, mask = batch["input_ids"], batch["attention_mask"].float()
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                reduction="none").reshape(ids.shape[0], -1)
    return (per_token * mask[:, 1:]).sum(1)


def class_loss(out, batch):
    labels = batch["labels"] if isinstance(batch, dict) else batch[1]
    return F.cross_entropy(out, labels, reduction="none")


def token_forward(model, batch):
    return model(batch["input_ids"], batch["attention_mask"])


def token_batch(b=5, t=6, vocab=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([t, t - 2, 2, t - 1, 3][:b])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
    ids = torch.randint(1, vocab, (b, t), generator=g) * mask  # padding id 0 where the mask is 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(0, 3, (b,), generator=g)}


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


# ------------------------------------------------------------------ the reference
def materialised(model, loss_fn, batch, paramset, forward=None):
    """Per-example gradients by plain autograd, one example at a time, float64: (B, N)."""
    params = dict(model.named_parameters())
    b = len(batch["labels"]) if isinstance(batch, dict) else len(batch[0])
    rows = []
    for i in range(b):
        one = ({k: v[i:i + 1] for k, v in batch.items()} if isinstance(batch, dict)
               else tuple(v[i:i + 1] for v in batch))
        out = forward(model, one) if forward else model(one[0])
        grads = torch.autograd.grad(loss_fn(out, one).sum(), [params[n] for n in paramset.names], allow_unused=True)
        rows.append(torch.cat([(torch.zeros(s) if g is None else g).reshape(-1).double()
                               for g, s in zip(grads, paramset.shapes)]))
    return torch.stack(rows)


def matrix(op) -> np.ndarray:
    """A factor's matrix, from its own ``apply`` to the identity (float64)."""
    return op.apply(np.eye(op.n_in)).T


def explicit(sketch, g: torch.Tensor) -> np.ndarray:
    """The factored sketch as one explicit matrix: block-diagonal kron(P_r, P_c) and the small sketch."""
    starts = np.cumsum([0, *sketch.param_sizes])
    where = dict(zip(sketch.param_names, zip(starts[:-1], starts[1:])))
    g = g.numpy()
    out = np.zeros((g.shape[0], sketch.n_out))
    for b in sketch.blocks:
        a, z = where[b.param]
        K = np.kron(matrix(sketch.row_factor(b)), matrix(sketch.col_factor(b)))  # row-major vec
        out[:, b.offset:b.offset + b.size] = g[:, a:z] @ K.T
    if sketch.small is not None:
        parts = np.concatenate([g[:, slice(*where[n])] for n in sketch.small.params], axis=1)
        out[:, sketch.small.offset:sketch.small.offset + sketch.small.n_out] = parts @ matrix(sketch.small_op()).T
    return out


def assert_exact(got: torch.Tensor, want: np.ndarray, sketch) -> None:
    """Every block within float32 rounding of the explicit product: the hooks sum a few hundred float32
    products of numbers of the block's size, so 1e-5 of the block's largest entry bounds the rounding by
    orders of magnitude, while a missing or misplaced term moves a block by O(1) of its size."""
    got = got.double().numpy()
    spans = [(b.param, b.offset, b.size) for b in sketch.blocks]
    if sketch.small is not None:
        spans.append(("small", sketch.small.offset, sketch.small.n_out))
    for name, off, size in spans:
        ref = want[:, off:off + size]
        scale = max(np.abs(ref).max(), 1e-30)
        err = np.abs(got[:, off:off + size] - ref).max()
        assert err <= 1e-5 * scale, f"{name}: error {err:.3g} against largest entry {scale:.3g}"


# ------------------------------------------------------------------ exactness
@pytest.mark.parametrize("factor", FACTORS)
def test_an_mlp_with_layernorm_matches_the_explicit_kronecker_matrix(factor):
    model = mlp()
    g = torch.Generator().manual_seed(1)
    batch = (torch.randn(6, 7, generator=g), torch.randint(0, 3, (6,), generator=g))
    ps = select_params(model)
    sk = factored_sketch(model, 48, factor=factor, seed=3)
    got = sketch_batch(model, class_loss, batch, ps, sk)
    ref = materialised(model, class_loss, batch, ps)
    assert_exact(got["grad"], explicit(sk, ref), sk)
    np.testing.assert_allclose(sk.apply(ref).numpy(), explicit(sk, ref), rtol=1e-9, atol=1e-12)
    assert bool(got["valid"].all())


@pytest.mark.parametrize("factor", FACTORS)
def test_a_two_layer_transformer_with_padding_matches_the_explicit_kronecker_matrix(factor):
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    batch = token_batch()
    ps = select_params(model)
    sk = factored_sketch(model, 512, factor=factor, seed=0)
    assert {b.param for b in sk.blocks} >= {"tok.weight", "pos.weight", "layers.1.f2.weight", "head.weight"}
    got = sketch_batch(model, class_loss, batch, ps, sk, forward=token_forward)
    ref = materialised(model, class_loss, batch, ps, forward=token_forward)
    assert_exact(got["grad"], explicit(sk, ref), sk)
    # padding tokens contribute nothing: other ids under the mask leave every sketch as it was
    other = dict(batch, input_ids=torch.where(batch["attention_mask"] == 1, batch["input_ids"], 7))
    again = sketch_batch(model, class_loss, other, ps, sk, forward=token_forward)
    torch.testing.assert_close(again["grad"], got["grad"], rtol=1e-5, atol=1e-6)


def test_a_tied_embedding_and_output_layer_add_both_uses():
    torch.manual_seed(0)
    model = TiedLM()
    batch = token_batch(vocab=11)
    ps = select_params(model)
    assert "out.weight" not in ps.names  # one parameter, listed once
    sk = factored_sketch(model, 30, factor="afjl", seed=2)
    got = sketch_batch(model, lm_loss, batch, ps, sk, forward=token_forward)
    ref = materialised(model, lm_loss, batch, ps, forward=token_forward)
    assert_exact(got["grad"], explicit(sk, ref), sk)


def test_a_layer_called_twice_adds_both_calls():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.lin(torch.tanh(self.lin(x))))

    torch.manual_seed(0)
    model = Twice()
    batch = (torch.randn(5, 4), torch.randint(0, 2, (5,)))
    ps = select_params(model)
    sk = factored_sketch(model, 16, factor="dense", seed=0)
    got = sketch_batch(model, class_loss, batch, ps, sk)
    assert_exact(got["grad"], explicit(sk, materialised(model, class_loss, batch, ps)), sk)


# ------------------------------------------------------------------ unbiased inner products
def test_inner_products_are_unbiased_over_seeds():
    """E<Sg, Sh> = <g, h> (independent factors with E[P^T P] = I; the small vector's sketch too).  Over S
    seeds the mean's standard error is the sample standard deviation over sqrt(S); 4 standard errors bound
    a false failure at 6e-5 (normal approximation of a mean of 400 draws)."""
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    batch = token_batch()
    ps = select_params(model)
    g = materialised(model, class_loss, batch, ps, forward=token_forward)
    pairs = [(0, 1), (2, 3), (0, 0)]
    seeds = 400
    values = np.zeros((seeds, len(pairs)))
    for s in range(seeds):
        sk = factored_sketch(model, 128, factor="afjl", seed=s)
        y = sk.apply(g).numpy()
        values[s] = [y[i] @ y[j] for i, j in pairs]
    truth = np.array([float(g[i] @ g[j]) for i, j in pairs])
    se = values.std(axis=0, ddof=1) / math.sqrt(seeds)
    assert np.all(np.abs(values.mean(axis=0) - truth) <= 4 * se), (values.mean(0), truth, se)
    assert np.all(se > 0)


# ------------------------------------------------------------------ refusals
def test_batchnorm_in_training_mode_is_refused_by_name():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    with pytest.raises(FactoredSketchError, match=r"module '1' \(BatchNorm1d\) normalises with the statistics "
                                                  r"of the batch"):
        factored_sketch(model, 8)
    model.eval()  # running statistics: per example, but BatchNorm's own parameters are not supported
    with pytest.raises(FactoredSketchError, match=r"parameter '1.weight' belongs to a BatchNorm1d"):
        factored_sketch(model, 8)
    sk = factored_sketch(model, 8, params=["0.*", "2.*"])
    assert sk.n_out == 8


def test_a_parameter_used_outside_its_module_is_refused_by_name():
    torch.manual_seed(0)
    model = FunctionalTie()
    batch = token_batch(vocab=11)
    ps = select_params(model)
    sk = factored_sketch(model, 30, seed=0)
    with pytest.raises(FactoredSketchError, match=r"'embed.weight' \(in linear\) are used outside the module"):
        sketch_batch(model, lm_loss, batch, ps, sk, forward=token_forward)


def test_unsupported_modules_are_named():
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with pytest.raises(FactoredSketchError, match=r"'self_attn.in_proj_weight' belongs to a MultiheadAttention"):
        factored_sketch(layer, 64)


def test_make_sketch_and_the_hvp_paths_refuse_a_factored_spec():
    import sketcharray as sa
    from sketcharray.workloads import digits

    with pytest.raises(ValueError, match="needs|cannot be built from n_in alone"):
        sa.make_sketch("factored", 100, 10)
    w = digits()
    x, y = w.train[:20]
    with pytest.raises(ValueError, match="factored sketches are for gradients only"):
        sa.sketch_hvps(w.model_factory, w.loss_fn, [(x, y)], {"method": "factored", "n_out": 64}, probes=2)


# ------------------------------------------------------------------ the split of D
def test_the_split_fills_d_exactly_with_powers_of_two_per_side():
    blocks = [("emb", 30522, 384), ("q", 384, 384), ("f1", 1536, 384), ("head", 4, 384)]
    for d in (64, 256, 4096, 1000):
        dims, small = split_budget(blocks, 5000, d)
        assert sum(r * c for r, c in dims) + small == d
        for (name, rows, cols), (dr, dc) in zip(blocks, dims):
            assert dr & (dr - 1) == 0 and dc & (dc - 1) == 0 and dr <= rows and dc <= cols, (name, dr, dc)
    dims, _ = split_budget(blocks, 5000, 4096)
    sizes = [r * c for r, c in dims]
    assert sizes[0] == max(sizes) and sizes[3] == min(sizes)  # the share grows with sqrt(rows * cols)
    # without small parameters a power of two fills exactly with powers of two; another D gives its rest to one
    # weight whose second side is then any integer
    dims, small = split_budget(blocks, 0, 512)
    assert small == 0 and sum(r * c for r, c in dims) == 512
    assert all(r & (r - 1) == 0 and c & (c - 1) == 0 for r, c in dims)
    dims, small = split_budget(blocks, 0, 513)
    assert small == 0 and sum(r * c for r, c in dims) == 513
    tied = [("embed", 11, 6), ("mix", 6, 6)]  # 32 = 16 + 8 + 8 would leave 8 for 6 small entries
    dims, small = split_budget(tied, 6, 32)
    assert 1 <= small <= 6 and sum(r * c for r, c in dims) + small == 32
    with pytest.raises(FactoredSketchError, match=r"n_out=1024 cannot be split .* \(qk factors need them\); \d+ or "):
        split_budget([("0", 32, 64), ("2", 32, 32), ("4", 10, 32)], 74, 1024, pow2=True)
    digits = [("0", 32, 64), ("2", 32, 32), ("4", 10, 32)]
    for d in range(200, 3403, 7):
        dims, small = split_budget(digits, 74, d)
        assert 1 <= small <= 74 and sum(r * c for r, c in dims) + small == d
        assert all(r <= rows and c <= cols for (r, c), (_, rows, cols) in zip(dims, digits))
    with pytest.raises(FactoredSketchError, match="smaller than the 4 weight block"):
        split_budget(blocks, 0, 3)
    with pytest.raises(FactoredSketchError, match="exceeds what the layers can hold"):
        split_budget([("w", 3, 3)], 2, 100)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("factor", FACTORS)
def test_the_same_code_on_a_cuda_device_gives_the_cpu_numbers(factor):
    """The factors' matrices are made on the device from the same seeds; float32 sums in another order on
    the GPU: 1e-5 of each block's largest entry, as for the CPU against the explicit matrix."""
    torch.manual_seed(0)
    model = TinyTransformer().eval()
    batch = token_batch()
    ps = select_params(model)
    sk = factored_sketch(model, 512, factor=factor, seed=0)
    cpu = sketch_batch(model, class_loss, batch, ps, sk, forward=token_forward)
    cuda = sketch_batch(model.cuda(), class_loss, {k: v.cuda() for k, v in batch.items()}, ps, sk,
                        forward=token_forward)
    assert cuda["grad"].device.type == "cuda"
    ref = materialised(model.cpu(), class_loss, batch, ps, forward=token_forward)
    assert_exact(cuda["grad"].cpu(), explicit(sk, ref), sk)
    assert_exact(cpu["grad"], explicit(sk, ref), sk)
