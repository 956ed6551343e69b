"""Loads a sub-net exported with `ast-cli export --format pytorch` into the original code's
model definition (github.com/mengjian0502/AST: models/uspars_cifar_resnet.py for ResNet-20/32/56,
models/uspars_cifar_wide_resnet.py for the wide ResNet-32 (`--wide`), models/uspars_resnet.py for
ResNet-18/50 (`--resnet 18|50`), models/uspars_mobilenet.py for MobileNet-V1 (`--mobilenet`);
nspars=1) with
`load_state_dict(strict=True)`, runs the check input stored in the file and compares the logits
with ours (stored beside it). Exit status 1 when they differ by more than the tolerance.

    python3 -m venv .venv && .venv/bin/pip install torch safetensors numpy
    git clone https://github.com/mengjian0502/AST /tmp/AST
    ast-cli export --run runs/r20 --format pytorch --subnets 2 --out r20-k2.safetensors
    .venv/bin/python repro/check_pytorch_export.py r20-k2.safetensors /tmp/AST --depth 20
    .venv/bin/python repro/check_pytorch_export.py wrn32-k1.safetensors /tmp/AST --wide
    .venv/bin/python repro/check_pytorch_export.py r18-k0.safetensors /tmp/AST --resnet 18
"""
import argparse
import sys

import torch
from safetensors.torch import load_file

p = argparse.ArgumentParser()
p.add_argument("file")
p.add_argument("original", help="a checkout of the original code")
p.add_argument("--depth", type=int, default=20, choices=[20, 32, 56])
p.add_argument("--wide", action="store_true", help="the wide ResNet-32")
p.add_argument("--resnet", type=int, choices=[18, 50], help="ResNet-18/50 (CIFAR stem)")
p.add_argument("--mobilenet", action="store_true", help="MobileNet-V1")
p.add_argument("--tolerance", type=float, default=1e-4)
a = p.parse_args()

# The original allocates its masks with `.cuda()`: on a CPU-only machine that is the identity.
torch.Tensor.cuda = lambda self, *args, **kwargs: self
sys.path.insert(0, a.original)

state = load_file(a.file)
x = state.pop("__check__.input")
ours = state.pop("__check__.logits")
if a.mobilenet:
    from models.uspars_mobilenet import Net  # noqa: E402

    model = Net(num_classes=ours.shape[1], nspars=1, uspars=True)
elif a.resnet:
    from models.uspars_resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402

    block, blocks = (BasicBlock, [2, 2, 2, 2]) if a.resnet == 18 else (Bottleneck, [3, 4, 6, 3])
    model = ResNet(block, blocks, ours.shape[1], nspars=1, uspars=True)
elif a.wide:
    from models.uspars_cifar_wide_resnet import BasicBlock, ResNet  # noqa: E402

    model = ResNet(BasicBlock, [5] * 3, ours.shape[1], nspars=1, uspars=True)
else:
    from models.uspars_cifar_resnet import CifarResNet  # noqa: E402

    model = CifarResNet(a.depth, ours.shape[1], nspars=1, uspars=True)
model.load_state_dict(state, strict=True)
model.eval()
with torch.no_grad():
    theirs = model(x)
diff = (theirs - ours).abs().max().item()
scale = max(1.0, ours.abs().max().item())
print(f"{len(state)} tensors loaded (strict); max |logit difference| = {diff:.3e} "
      f"(logits up to {scale:.3f}; tolerance {a.tolerance} × that)")
# Float rounding grows with the logits' size: the tolerance is relative above 1.
sys.exit(0 if diff <= a.tolerance * scale else 1)
