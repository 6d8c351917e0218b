#!/usr/bin/env python3
"""PyTorch twin of `host-trainer bench`: Mini-ResNet training-step and
inference throughput on the CPU, on random data.

The network is the one of host-trainer/src/model.rs: stem conv3x3 s1 p1
3->w0 (no bias) + BN + ReLU, max pool 3x3 s2 p1, basic blocks per stage (the
first block of every stage after the first has stride 2 and a 1x1 stride-2
conv + BN shortcut; add, then ReLU), global average pool, Linear. The
training step is the one host-trainer times: forward in training mode,
label-smoothed (0.1) cross entropy, backward, SGD step (momentum 0.9,
Nesterov, weight decay 5e-4 on conv/FC weights only, as the default recipe).
Inference is a forward pass in eval mode under torch.inference_mode().

Each figure is the median of --runs timed steps after --warmup untimed ones.
Progress goes to stderr; the last line on stdout is one JSON object:
{"torch_version", "threads", "batch_size", "runs", "train_images_per_sec",
 "infer_images_per_sec", ...}.

    bench/.venv/bin/python bench/pytorch_bench.py --batch-size 64 --threads 2
"""

import argparse
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

SEED_WIDTHS = [16, 32, 64, 128]
SEED_BLOCKS = [3, 4, 6, 3]
SEED_PARAMS = 1_334_618


def conv_bn(cin, cout, k, stride):
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
        nn.BatchNorm2d(cout, eps=1e-5),
    )


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = conv_bn(cin, cout, 3, stride)
        self.c2 = conv_bn(cout, cout, 3, 1)
        self.shortcut = conv_bn(cin, cout, 1, stride) if stride != 1 or cin != cout else None

    def forward(self, x):
        y = F.relu(self.c1(x))
        y = self.c2(y)
        s = x if self.shortcut is None else self.shortcut(x)
        return F.relu(y + s)


class MiniResNet(nn.Module):
    def __init__(self, widths, blocks, maxpool=True, classes=10):
        super().__init__()
        self.stem = conv_bn(3, widths[0], 3, 1)
        self.maxpool = maxpool
        layers = []
        cin = widths[0]
        for s, (width, n) in enumerate(zip(widths, blocks)):
            for b in range(n):
                stride = 2 if s > 0 and b == 0 else 1
                layers.append(BasicBlock(cin, width, stride))
                cin = width
        self.blocks = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        if self.maxpool:
            x = F.max_pool2d(x, 3, stride=2, padding=1)
        x = self.blocks(x)
        x = x.mean(dim=(2, 3))  # global average pool
        return self.fc(x)


def int_list(s):
    return [int(v) for v in s.split(",") if v]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--runs", type=int, default=10, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    p.add_argument("--widths", type=int_list, default=SEED_WIDTHS)
    p.add_argument("--blocks", type=int_list, default=SEED_BLOCKS)
    p.add_argument("--no-maxpool", action="store_true")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument(
        "--expect-params",
        type=int,
        default=None,
        help="fail unless the model has this many parameters "
        f"(default: {SEED_PARAMS} for the seed architecture)",
    )
    a = p.parse_args(argv)
    if a.batch_size < 1 or a.runs < 1 or a.warmup < 0 or a.threads < 1:
        p.error("--batch-size, --runs and --threads must be positive, --warmup non-negative")
    if len(a.widths) != len(a.blocks) or not a.widths:
        p.error("--widths and --blocks need the same, non-zero number of stages")
    if a.expect_params is None and (
        a.widths == SEED_WIDTHS and a.blocks == SEED_BLOCKS and not a.no_maxpool and a.classes == 10
    ):
        a.expect_params = SEED_PARAMS
    return a


def timed(fn, warmup, runs):
    times = []
    for i in range(warmup + runs):
        t0 = time.perf_counter()
        fn()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format

    model = MiniResNet(a.widths, a.blocks, maxpool=not a.no_maxpool, classes=a.classes)
    params = sum(p.numel() for p in model.parameters())
    if a.expect_params is not None and params != a.expect_params:
        raise SystemExit(f"pytorch_bench: model has {params} parameters, expected {a.expect_params}")
    model = model.to(device=a.device, memory_format=fmt)

    decay = [p for p in model.parameters() if p.dim() > 1]  # conv and FC weights
    no_decay = [p for p in model.parameters() if p.dim() <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-4}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.01,
        momentum=0.9,
        nesterov=True,
    )
    x = torch.randn(a.batch_size, 3, 32, 32).to(a.device).contiguous(memory_format=fmt)
    y = (torch.arange(a.batch_size) % a.classes).to(a.device)

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
        loss.backward()
        opt.step()
        loss.item()

    model.train()
    train_s = timed(train_step, a.warmup, a.runs)

    model.eval()

    def infer_step():
        with torch.inference_mode():
            model(x).sum().item()

    infer_s = timed(infer_step, a.warmup, a.runs)

    r = {
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch_size": a.batch_size,
        "runs": a.runs,
        "warmup": a.warmup,
        "channels_last": a.channels_last,
        "device": a.device,
        "parameters": params,
        "train_images_per_sec": a.batch_size / train_s,
        "infer_images_per_sec": a.batch_size / infer_s,
    }
    print(
        f"pytorch {r['torch_version']} {a.device}, {r['threads']} threads, batch {a.batch_size}: "
        f"train {r['train_images_per_sec']:.1f} images/s, "
        f"inference {r['infer_images_per_sec']:.1f} images/s (median of {a.runs})",
        file=sys.stderr,
    )
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
