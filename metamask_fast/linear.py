"""Offline linear probe of a trained run: ``python -m metamask_fast.linear --run runs/<folder>``.

The backbone and mask of the run stay frozen; the masked features of the labelled training split and of
the test split (evaluation transform: no augmentation) are extracted once, then one linear classifier is
trained on them by :func:`metamask_fast.evaluate.linear_probe` (standardised features, AdamW, cosine, see
its docstring). Prints top-1 and top-5 on the test split and writes them, with the protocol, to
``<run>/linear.json`` (``--output`` elsewhere; an existing file is never overwritten).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

from metamask_fast.config import ConfigError, OneLineArgumentParser
from metamask_fast.evaluate import LINEAR_PROBE_LR, linear_probe
from metamask_fast.runs import LABELLED_TRAIN_SPLIT, labelled_features, load_run, resolve_device

PROG = "metamask_fast.linear"


def _positive(kind):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise ValueError from None
        if not value > 0 or value != value or value == float("inf"):
            raise ValueError
        return value

    convert.__name__ = f"positive {kind.__name__}"
    return convert


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description="Linear probe (top-1/top-5) on the frozen, masked "
                                                          "features of a metamask_fast.train run.")
    parser.add_argument("--run", required=True, help="the run folder (config.yaml, backbone.pt, mask.pt)")
    parser.add_argument("--epochs", type=_positive(int), default=100, help="default %(default)s")
    parser.add_argument("--batch-size", type=_positive(int), default=256, help="default %(default)s")
    parser.add_argument("--lr", type=_positive(float), default=LINEAR_PROBE_LR, help="AdamW lr; default %(default)s")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="default %(default)s")
    parser.add_argument("--seed", type=int, default=0, help="default %(default)s")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N; default cuda if available")
    parser.add_argument("--data-dir", default=None, help="where the dataset is now (default: the run's data_dir)")
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes; default %(default)s")
    parser.add_argument("--output", default=None, help="result file; default <run>/linear.json")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:
        return exit_request.code if isinstance(exit_request.code, int) else 2
    try:
        if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
            raise ConfigError(f"argument --weight-decay: must be a finite number >= 0, got {args.weight_decay}")
        if not 0 <= args.seed < 2**63:
            raise ConfigError(f"argument --seed: must be an integer in [0, 2**63), got {args.seed}")
        if args.workers < 0:
            raise ConfigError(f"argument --workers: must be >= 0, got {args.workers}")
        output = Path(args.output) if args.output else Path(args.run) / "linear.json"
        if output.exists():
            raise ConfigError(f"argument --output: {str(output)!r} exists; refusing to overwrite it")
        if not output.parent.is_dir():
            raise ConfigError(f"argument --output: the folder {str(output.parent)!r} does not exist")
        device = resolve_device(args.device)
        config, model = load_run(args.run, device)
        features = labelled_features(model, config, device, data_dir=args.data_dir, workers=args.workers)
        result = linear_probe(*features, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                              weight_decay=args.weight_decay, seed=args.seed, device=device)
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    result.pop("state", None)
    result.update(run=str(args.run), dataset=config.dataset, backbone=config.backbone,
                  train_split=LABELLED_TRAIN_SPLIT, seconds=time.perf_counter() - started)
    try:
        output.write_text(json.dumps(result, indent=2) + "\n")
    except OSError as error:
        print(f"{PROG}: error: argument --output: cannot write {str(output)!r}: {error.strerror or error}",
              file=sys.stderr)
        return 2
    print(f"linear probe on {result['num_test']} {config.dataset} test images ({result['num_train']} training): "
          f"top-1 {100 * result['top1']:.2f}%, top-5 {100 * result['top5']:.2f}%  -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
