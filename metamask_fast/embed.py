"""Export the frozen, masked features of a run: ``python -m metamask_fast.embed --run DIR --output F.npy``.

Features of every image of ``--split`` (evaluation transform, no augmentation), with their labels and names
(file paths for image folders, ``<split>/<index>`` otherwise), written by
:func:`metamask_fast.export.write_embeddings`: ``.pt`` (one dict) or ``.npy`` (features, ``.labels.npy``,
``.names.txt``), and with ``--csv`` also a CSV. Existing files are never overwritten.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from metamask_fast.config import ConfigError, OneLineArgumentParser
from metamask_fast.export import write_embeddings
from metamask_fast.runs import load_run, resolve_device, split_features

PROG = "metamask_fast.embed"


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description="Write the masked features of a dataset split, with "
                                                          "labels and names, for a metamask_fast.train run.")
    parser.add_argument("--run", required=True, help="the run folder (config.yaml, backbone.pt, mask.pt)")
    parser.add_argument("--output", required=True, help="FILE.pt or FILE.npy")
    parser.add_argument("--split", default="test", help="train, test (STL-10 also unlabeled, train+unlabeled); "
                                                        "default %(default)s")
    parser.add_argument("--csv", action="store_true", help="also write FILE.csv (name, label, features)")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N; default cuda if available")
    parser.add_argument("--data-dir", default=None, help="where the dataset is now (default: the run's data_dir)")
    parser.add_argument("--workers", type=int, default=2, help="data-loading processes; default %(default)s")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:
        return exit_request.code if isinstance(exit_request.code, int) else 2
    try:
        if Path(args.output).suffix not in (".pt", ".npy"):
            raise ConfigError(f"argument --output: must end in .pt or .npy, got {args.output!r}")
        if args.workers < 0:
            raise ConfigError(f"argument --workers: must be >= 0, got {args.workers}")
        if Path(args.output).exists():  # before the feature pass (write_embeddings checks its other files)
            raise ConfigError(f"argument --output: {args.output!r} exists; refusing to overwrite it")
        device = resolve_device(args.device)
        config, model = load_run(args.run, device)
        features, labels, names = split_features(model, config, args.split, device, data_dir=args.data_dir,
                                                 workers=args.workers)
        written = write_embeddings(args.output, features, labels, names, csv=args.csv)
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except (FileExistsError, OSError, ValueError) as error:
        print(f"{PROG}: error: argument --output: {error}", file=sys.stderr)
        return 2
    print(f"{features.shape[0]} x {features.shape[1]} features of {config.dataset} {args.split} -> "
          + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
