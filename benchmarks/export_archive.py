"""Write a ``torch.export`` archive of a bench network, so that ``occlusion-audit bench --model
export:FILE`` times the archive against the eager network it was exported from.

    python benchmarks/export_archive.py torchvision:mobilenet_v2 64 /tmp/mnv2.pt2
    occlusion-audit bench --model export:/tmp/mnv2.pt2 --image-size 64 ...
    occlusion-audit bench --model torchvision:mobilenet_v2 --image-size 64 ...

The archive holds the same seeded, BatchNorm-calibrated weights that ``bench --model NAME``
builds (:func:`pipeline.bench.nets.build_bench_model`), exported in eval mode with a dynamic
batch dimension, as the README asks of users' archives.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from pipeline.bench.nets import build_bench_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a bench model name: resnet50, timm:NAME, torchvision:NAME")
    parser.add_argument("image_size", type=int, help="square input side in pixels")
    parser.add_argument("out", type=Path, help="the .pt2 file to write")
    args = parser.parse_args()
    model = build_bench_model(args.model, args.image_size)
    x = torch.rand(2, 3, args.image_size, args.image_size)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, args.out)
    print(f"wrote {args.out} ({args.model}, {args.image_size} px)")


if __name__ == "__main__":
    main()
