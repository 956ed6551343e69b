"""Golden values of ast-core's optimizer tests (`ast-core/src/optimizer.rs`).

Two steps of torch.optim.Adam / AdamW from w = (1, -2) with gradients (0.5, -1) then (0.5, 0),
lr 0.1, PyTorch's default betas and eps. Run: python golden/torch_optimizers.py (torch from PyPI).
"""
import torch

for cls, kw in [
    (torch.optim.Adam, {}),
    (torch.optim.Adam, {"weight_decay": 0.1}),
    (torch.optim.AdamW, {"weight_decay": 0.1}),
]:
    w = torch.tensor([1.0, -2.0], requires_grad=True)
    opt = cls([w], lr=0.1, **kw)
    for g in ([0.5, -1.0], [0.5, 0.0]):
        w.grad = torch.tensor(g)
        opt.step()
        print(cls.__name__, kw, w.tolist())
