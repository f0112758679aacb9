"""The lean LoRA dropout: the same dropout as PEFT's (output and gradients equal under the same mask), one kept
input instead of a dropped copy per layer, the same mask in a checkpoint's recomputed forward."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from stagereason.train.lora_dropout import DroppedInputLinear, _dropped, _DroppedInputMatmul, _keep, fuse_lora_dropout


class _Block(nn.Module):
    """Three projections reading one input (like q/k/v), then one reading their sum (like o_proj)."""

    def __init__(self, width=24, inner=40):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(width, inner), nn.Linear(width, inner), nn.Linear(width, inner)
        self.o = nn.Linear(inner, width)

    def forward(self, x):
        return self.o(torch.tanh(self.q(x) + self.k(x) * self.v(x)))


def _lora(p=0.3, seed=0):
    torch.manual_seed(seed)
    model = get_peft_model(_Block(), LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules=["q", "k", "v", "o"]))
    for n, w in model.named_parameters():  # lora_B starts at zero: make the path count
        if "lora_B" in n:
            nn.init.normal_(w, std=0.5)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_function_equals_dropout_then_matmul_under_the_same_mask(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 7, 16, requires_grad=True)
    w = torch.randn(5, 16, requires_grad=True)
    g = torch.randn(3, 7, 5)
    out = _DroppedInputMatmul.apply(x, w, 0.25, 1234, dtype)
    out.backward(g.to(dtype))
    got = out.detach(), x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    keep = _keep(x, 0.25, 1234)
    assert 0 < keep.float().mean() < 1 and torch.equal(keep, _keep(x, 0.25, 1234))  # a mask, drawn again alike
    ref = (x.to(dtype) * keep / 0.75) @ w.to(dtype).t()
    ref.backward(g.to(dtype))
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    assert got[0].dtype == dtype and got[1].dtype == x.dtype and got[2].dtype == w.dtype
    torch.testing.assert_close(got[0], ref.detach(), **tol)
    torch.testing.assert_close(got[1], x.grad, **tol)
    torch.testing.assert_close(got[2], w.grad, **tol)


def test_a_fused_lora_layer_equals_peft_with_the_same_mask_and_matches_in_evaluation():
    peft_model, fused = _lora(), _lora()
    assert fuse_lora_dropout(fused) == 4
    assert all(type(m) is DroppedInputLinear for n, m in fused.named_modules() if n.endswith("lora_A.default"))
    assert all(type(m) is nn.Identity for n, m in fused.named_modules() if n.endswith("lora_dropout.default"))
    assert fused.state_dict().keys() == peft_model.state_dict().keys()  # the adapter saves as before
    x = torch.randn(2, 5, 24)
    with torch.no_grad():  # no dropout in evaluation: exactly PEFT's output
        assert torch.equal(fused.eval()(x), peft_model.eval()(x))
    fused.train(), peft_model.train()
    # PEFT's dropout given the masks the fused layers draw: the seeds come from the CPU generator in call order
    torch.manual_seed(7)
    seeds = [int(torch.randint(0, 2**62, (1,)).item()) for _ in range(4)]
    for name, seed in zip(("q", "k", "v", "o"), seeds, strict=True):
        layer = getattr(peft_model.base_model.model, name)
        layer.lora_dropout["default"] = _Masked(0.3, seed)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(7)
    fused(xa).square().sum().backward()
    peft_model(xb).square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    for n, p in fused.named_parameters():  # gradients of a few hundred: float32 sums in another order
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-4, msg=n)


class _Masked(nn.Module):
    """PEFT's dropout with the mask of a given seed."""

    def __init__(self, p, seed):
        super().__init__()
        self.p, self.seed = p, seed

    def forward(self, x):
        return x * _keep(x, self.p, self.seed) / (1 - self.p)


def _saved_bytes(model, x) -> int:
    """Bytes of the distinct tensors a forward pass keeps for backward, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(kept.values())


def test_the_layers_reading_one_input_keep_it_once_instead_of_a_dropped_copy_each():
    x = torch.randn(4, 64, 24, requires_grad=True)
    peft_model, fused = _lora().train(), _lora().train()
    fuse_lora_dropout(fused)
    base = _lora(p=0.0).train()  # no dropout: what the block itself keeps, lora paths included
    before, after, floor = _saved_bytes(peft_model, x), _saved_bytes(fused, x), _saved_bytes(base, x)
    # PEFT: q, k, v and o each keep a dropped copy of their input and its mask (float32 on the CPU); fused: what
    # the block without dropout keeps, i.e. x once (o's input, tanh's output, is kept by tanh anyway)
    assert after == floor
    o_input = 4 * 64 * 40 * 4
    assert before - after == 2 * (3 * x.nbytes + o_input) - x.nbytes


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_checkpoint_recomputes_the_same_masks(reentrant):
    from torch.utils.checkpoint import checkpoint

    x = torch.randn(2, 6, 24)
    grads = []
    for wrapped in (False, True):
        model = _lora().train()
        fuse_lora_dropout(model)
        torch.manual_seed(3)
        xi = x.clone().requires_grad_()
        out = checkpoint(model, xi, use_reentrant=reentrant) if wrapped else model(xi)
        out.square().sum().backward()
        grads.append([xi.grad] + [p.grad for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


def test_what_is_not_plain_dropout_keeps_peft_s_forward():
    none = _lora(p=0.0)
    assert fuse_lora_dropout(none) == 0
    torch.manual_seed(0)
    dora = get_peft_model(_Block(), LoraConfig(r=4, lora_dropout=0.2, target_modules=["q"], use_dora=True))
    assert fuse_lora_dropout(dora) == 0
    assert isinstance(dora.base_model.model.q.lora_dropout["default"], nn.Dropout)


def test_the_lean_dropout_drops_a_share_p_of_the_inputs_and_scales_the_rest():
    x = torch.ones(200, 500)
    dropped = _dropped(x, _keep(x, 0.3, 99), 0.3, torch.float32)
    assert dropped.unique().tolist() == pytest.approx([0.0, 1 / 0.7])
    assert abs((dropped == 0).float().mean().item() - 0.3) < 0.01
    assert not torch.equal(dropped, _dropped(x, _keep(x, 0.3, 100), 0.3, torch.float32))  # another seed, another mask
