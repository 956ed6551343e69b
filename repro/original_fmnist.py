#!/usr/bin/env python3
"""Runs the ORIGINAL AST code (mengjian0502/AST, NeurIPS 2022) on Fashion-MNIST, on CPU.

The original is not copied into this repository. This script extracts it from its git mirror
(`git archive`) into a work directory, applies a few minimal textual patches there (CUDA away,
a Fashion-MNIST branch in main.py's dataset switch; every patch is listed in PATCHES below and
must apply exactly), then runs the original's own `main.py` in-process with `runpy`, with
three in-process hooks:

* `get_data.get_loader` is replaced by a Fashion-MNIST loader built like ours (first N
  training images of the IDX files, 28x28 placed centred on a 32x32 canvas of raw zeros,
  repeated to 3 channels, `(raw/255 - 0.2860) / 0.3530` in float32, the constants of
  ast-train/src/data/transform.rs `Normalize::fashion_mnist`), no augmentation; the training
  loader is the original's `DataLoader(shuffle=True, batch_size, drop_last=False)` (the last
  partial batch is kept, as the original does), with `num_workers=0` instead of 2 (worker
  processes do not change the sample order: the sampler and the base seed both draw from the
  main process's generator either way);
* `train.test` is wrapped: after the original evaluates (once per epoch, all sub-nets) the
  wrapper records its per-sub-net top-1 and each sub-net's mask density;
* `wandb`, `torchvision`, `pandas` and `tabulate` are replaced by small stand-ins ONLY when
  they are not installed (the run never calls wandb or torchvision with --wandb False and our
  loader; pandas is only used by unused statistics code; tabulate only formats the log line).

Density of sub-net i = 1 - zeros/total over the `mask{i}` buffers of every SparsConv2d and
SparsLinear module, zeros counted as `mask.eq(0)`: exactly the original's
`Mask._param_stats()` with sub-net i switched in. That is the 18 masked 3x3 block convs, the
two masked 1x1 shortcut convs and the masked classifier weight; the stem conv, BatchNorms and
the classifier bias are not masked and are not counted.

Usage (settings default to the comparison in compare_fmnist.sh):
    /work/venv/bin/python repro/original_fmnist.py --epochs 10 --train-subset 12000 \
        --threads 2 --seed 0 --out /tmp/original.json
Writes a JSON file with per-sub-net final top-1 (%) and density, the per-epoch history and
the wall time; prints one progress line per epoch on stderr. The original's own log (its
stdout/stderr) goes to <workdir>/original.log.
"""
import argparse
import contextlib
import gzip
import importlib
import json
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
import types

DEFAULT_MIRROR = "/work/.mirror/mengjian0502+AST/repo"
DEFAULT_DATA = "/usr/share/datasets/fashion-mnist"

# Fashion-MNIST statistics, as ast-train/src/data/transform.rs (FASHION_MNIST_MEAN / _STD).
FMNIST_MEAN = 0.2860
FMNIST_STD = 0.3530

# (file, old, new, expected number of occurrences). Applied to the extracted copy only.
PATCHES = [
    # Mask buffers are created with .cuda(); keep them on the CPU.
    ("models/sparsmodule.py", "torch.ones_like(self.weight).cuda()", "torch.ones_like(self.weight)", 3),
    # ERK initialisation moves the new mask to the GPU.
    ("pruners/sparse.py", ".float().data.cuda()", ".float().data", 1),
    # Batches are moved to the GPU in train(), test() and trainIter().
    ("train.py", ".cuda(non_blocking=True)", "", 3),
    ("train.py", ".cuda()", "", 3),
    # No GPU: never move the model; the loss modules are moved unconditionally.
    ("main.py", "args.use_cuda = torch.cuda.is_available()", "args.use_cuda = False", 1),
    ("main.py", "LabelSmoothing(args.label_smoothing).cuda()", "LabelSmoothing(args.label_smoothing)", 1),
    ("main.py", "nn.CrossEntropyLoss().cuda()", "nn.CrossEntropyLoss()", 1),
    # main() only calls get_loader for CIFAR datasets; let it do so for ours too.
    ("main.py", "if 'cifar' in args.dataset:",
     "if 'cifar' in args.dataset or args.dataset == 'fashion-mnist':", 1),
]


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--train-subset", type=int, default=12000, help="first N training images")
    p.add_argument("--test-subset", type=int, default=None, help="first N test images (default: all)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--seed", type=int, default=0,
                   help="torch seed (the original seeds 0 in utils.py at import; this re-seeds after)")
    p.add_argument("--out", required=True, help="output JSON file")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--prune-rate", type=float, default=0.5)
    p.add_argument("--init-density", type=float, default=1.0)
    p.add_argument("--slist", type=float, nargs="+", default=[0.1, 0.05, 0.02])
    p.add_argument("--update-frequency", type=int, default=30)
    p.add_argument("--init-prune-epoch", type=int, default=0)
    p.add_argument("--final-prune-epoch", type=int, default=6)
    p.add_argument("--iteroffset", type=int, default=5)
    p.add_argument("--model", default="uresnet20", help="constructor name in the original's models/")
    p.add_argument("--data-path", default=DEFAULT_DATA, help="directory of the gzipped IDX files")
    p.add_argument("--mirror", default=DEFAULT_MIRROR, help="bare git mirror of the original")
    p.add_argument("--workdir", default=None,
                   help="where to extract and run the original (default: a temp dir, removed after)")
    p.add_argument("--keep-workdir", action="store_true", help="keep the temp work dir")
    return p.parse_args()


def extract_and_patch(mirror, dest):
    commit = subprocess.run(["git", "-C", mirror, "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", mirror, "archive", "HEAD"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
    for rel, old, new, count in PATCHES:
        path = os.path.join(dest, rel)
        with open(path) as f:
            text = f.read()
        found = text.count(old)
        if found != count:
            raise SystemExit(f"patch of {rel}: expected {count}x {old!r}, found {found}x "
                             "(the original changed; review PATCHES)")
        with open(path, "w") as f:
            f.write(text.replace(old, new))
    return commit


def install_stand_ins():
    """Minimal modules for optional dependencies that are not installed."""
    import importlib.machinery

    def missing(name):
        try:
            importlib.import_module(name)
            return False
        except ImportError:
            return True

    def stand_in(name):
        mod = types.ModuleType(name)
        # A spec without origin: importlib.util.find_spec (torch probes some libraries) works.
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None)
        sys.modules[name] = mod
        return mod

    if missing("wandb"):
        stand_in("wandb")  # only used with --wandb True
    if missing("pandas"):
        stand_in("pandas")  # only used by MaskStat.sparsity/overlap and the csv helpers
    if missing("torchvision"):
        tv = stand_in("torchvision")  # only used by the CIFAR/ImageNet loaders
        tv.transforms = stand_in("torchvision.transforms")
        tv.datasets = stand_in("torchvision.datasets")
    if missing("tabulate"):
        tab = stand_in("tabulate")  # only formats utils.print_table's log line

        def tabulate(rows, headers=(), tablefmt="simple", floatfmt="8.4f", **_):
            fmt = lambda v: format(v, floatfmt) if isinstance(v, float) else str(v)
            headers = [str(h) for h in headers]
            cells = [[fmt(v) for v in r] for r in rows]
            width = [max([len(h)] + [len(r[i]) for r in cells if i < len(r)])
                     for i, h in enumerate(headers)]
            line = lambda vs: "  ".join(str(v).rjust(w) for v, w in zip(vs, width))
            return "\n".join([line(headers), "  ".join("-" * w for w in width)]
                              + [line(r) for r in cells])

        tab.tabulate = tabulate


def read_idx(path):
    import numpy as np
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[0:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fmnist_tensors(data_path, split, limit):
    """First `limit` images of a split as normalised float32 [N, 3, 32, 32] and int64 labels."""
    import numpy as np
    import torch
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(os.path.join(data_path, f"{prefix}-images-idx3-ubyte.gz"))
    labels = read_idx(os.path.join(data_path, f"{prefix}-labels-idx1-ubyte.gz"))
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    n, h, w = images.shape
    canvas = np.zeros((n, 32, 32), dtype=np.float32)  # raw zeros, normalised below like ours
    top, left = (32 - h) // 2, (32 - w) // 2
    canvas[:, top:top + h, left:left + w] = images
    x = (canvas / np.float32(255.0) - np.float32(FMNIST_MEAN)) / np.float32(FMNIST_STD)
    x = np.repeat(x[:, None], 3, axis=1)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(labels.astype(np.int64))


def make_get_loader(opts):
    def get_loader(args):
        import torch
        from torch.utils.data import DataLoader, TensorDataset
        xtr, ytr = fmnist_tensors(opts.data_path, "train", opts.train_subset)
        xte, yte = fmnist_tensors(opts.data_path, "test", opts.test_subset)
        # As the original's CIFAR loaders (shuffle, drop_last=False), num_workers 0 for 2.
        trainloader = DataLoader(TensorDataset(xtr, ytr), batch_size=args.batch_size,
                                 shuffle=True, num_workers=0)
        testloader = DataLoader(TensorDataset(xte, yte), batch_size=args.batch_size,
                                shuffle=False, num_workers=0)
        return trainloader, testloader, 10
    return get_loader


def subnet_densities(model, nsub):
    from models import SparsConv2d, SparsLinear
    out = []
    for i in range(nsub):
        total = zeros = 0
        for m in model.modules():
            if isinstance(m, (SparsConv2d, SparsLinear)):
                mask = getattr(m, f"mask{i}").data
                total += mask.numel()
                zeros += mask[mask.eq(0)].numel()
        out.append({"nonzero": total - zeros, "total": total, "density": 1 - zeros / total})
    return out


def main():
    opts = parse_args()
    opts.out = os.path.abspath(opts.out)
    opts.data_path = os.path.abspath(opts.data_path)
    os.environ.setdefault("OMP_NUM_THREADS", str(opts.threads))
    os.environ.setdefault("MKL_NUM_THREADS", str(opts.threads))
    import torch
    torch.set_num_threads(opts.threads)
    torch.set_num_interop_threads(opts.threads)

    tmp = opts.workdir is None
    workdir = tempfile.mkdtemp(prefix="ast-original-") if tmp else os.path.abspath(opts.workdir)
    src = os.path.join(workdir, "src")
    if os.path.exists(src):
        shutil.rmtree(src)
    os.makedirs(src)
    commit = extract_and_patch(opts.mirror, src)
    log_path = os.path.join(workdir, "original.log")
    err = sys.stderr
    print(f"[original] {opts.mirror} @ {commit} -> {src}; log {log_path}", file=err, flush=True)

    install_stand_ins()
    sys.path.insert(0, src)
    os.chdir(src)
    utils = importlib.import_module("utils")  # seeds torch with 0 at import, as the original
    del utils
    torch.manual_seed(opts.seed)
    get_data = importlib.import_module("get_data")
    get_data.get_loader = make_get_loader(opts)
    train_mod = importlib.import_module("train")
    original_test = train_mod.test

    history = []
    t0 = time.time()
    last = [t0]

    def recording_test(model, testloader=None, criterion=None, args=None, slist=None):
        res = original_test(model, testloader, criterion, args, slist=slist)
        dens = subnet_densities(model, len(slist))
        now = time.time()
        entry = {"epoch": len(history), "seconds": now - last[0], "subnets": [
            {"subnet": i, "target_density": s, "top1": res[str(s)]["top1_acc"],
             "loss": res[str(s)]["loss"], **dens[i]} for i, s in enumerate(slist)]}
        last[0] = now
        history.append(entry)
        print("[original] epoch {} ({:.1f} s): ".format(entry["epoch"], entry["seconds"])
              + "  ".join("s{} top1 {:.2f}% density {:.4f}".format(e["subnet"], e["top1"], e["density"])
                          for e in entry["subnets"]), file=err, flush=True)
        return res

    train_mod.test = recording_test

    save_path = os.path.join(workdir, "save") + "/"
    argv = ["main.py", "--model", opts.model, "--dataset", "fashion-mnist",
            "--data_path", opts.data_path,
            "--lr", str(opts.lr), "--wd", str(opts.wd), "--momentum", str(opts.momentum),
            "--epochs", str(opts.epochs), "--batch_size", str(opts.batch_size),
            "--prune-rate", str(opts.prune_rate), "--init-density", str(opts.init_density),
            "--final-density", str(opts.slist[-1]),
            "--update-frequency", str(opts.update_frequency),
            "--init-prune-epoch", str(opts.init_prune_epoch),
            "--final-prune-epoch", str(opts.final_prune_epoch),
            "--slist", *[str(s) for s in opts.slist],
            "--pruner", "iterative", "--lr_scheduler", "cosine",
            "--gmomentum", "0.0", "--reset_buffer", "False", "--wandb", "False",
            "--label_smoothing", "0", "--iter", "--iteroffset", str(opts.iteroffset),
            "--save_path", save_path, "--log_file", "train.log"]
    sys.argv = argv
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        runpy.run_path(os.path.join(src, "main.py"), run_name="__main__")
    seconds = time.time() - t0

    if len(history) != opts.epochs:
        raise SystemExit(f"expected {opts.epochs} evaluations, recorded {len(history)}; see {log_path}")
    result = {
        "source": f"mengjian0502/AST@{commit}",
        "argv": argv[1:],
        "settings": {k: v for k, v in vars(opts).items() if k not in ("out", "workdir", "keep_workdir")},
        "threads": torch.get_num_threads(),
        "top1_unit": "percent",
        "density_counts": "mask{i} of every SparsConv2d/SparsLinear (as Mask._param_stats)",
        "epochs": opts.epochs,
        "subnets": history[-1]["subnets"],
        "history": history,
        "seconds": seconds,
    }
    out = opts.out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"[original] done in {seconds:.1f} s -> {out}", file=err, flush=True)
    if tmp and not opts.keep_workdir:
        os.chdir("/")
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
