"""What a run's mask learned, in one picture: ``python -m metamask_fast.dims --run runs/<folder>``.

The paper's dimensional analysis of a finished run (:func:`metamask_fast.evaluate.dimension_analysis`): kNN
top-1 on the run's masked backbone features (its kNN monitor's protocol: ``knn_k``, ``knn_temperature``)
keeping only the ``n`` dimensions with the highest mask values, the ``n`` lowest and ``n`` at random, for
``n`` from 1 to all on a log scale. Writes ``dims.png`` and ``dims.json`` into the run folder (``--output``
elsewhere; existing files are never overwritten: a MetaMask run folder already has the trainer's
``dims.png``). If the mask separates useful from confounding dimensions, the curves part.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Sequence

from metamask_fast.config import ConfigError, OneLineArgumentParser
from metamask_fast.evaluate import dimension_analysis
from metamask_fast.runs import labelled_features, load_run, resolve_device

PROG = "metamask_fast.dims"


def build_parser() -> OneLineArgumentParser:
    parser = OneLineArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished run folder (config.yaml, backbone.pt, mask.pt)")
    parser.add_argument("--output", help="folder for dims.png and dims.json (default: the run folder)")
    parser.add_argument("--draws", type=int, default=5, help="random subsets per count, averaged (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subsets (default 0)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--data-dir", help="the dataset's folder, if not the run's")
    parser.add_argument("--workers", type=int, default=2, help="image-decoding processes (default 2)")
    return parser


def _check(args) -> Path:
    if args.draws < 1:
        raise ConfigError(f"argument --draws: must be >= 1, got {args.draws}")
    if not 0 <= args.seed < 2**63:
        raise ConfigError(f"argument --seed: must be an integer in [0, 2**63), got {args.seed}")
    if args.workers < 0:
        raise ConfigError(f"argument --workers: must be >= 0, got {args.workers}")
    if not Path(args.run).is_dir():
        raise ConfigError(f"argument --run: {args.run!r} is not a folder; pass the folder of a finished "
                          "python -m metamask_fast.train run")
    output = Path(args.output) if args.output else Path(args.run)
    if not output.is_dir():
        raise ConfigError(f"argument --output: the folder {str(output)!r} does not exist")
    for name in ("dims.png", "dims.json"):
        if (output / name).exists():
            raise ConfigError(f"argument --output: {str(output / name)!r} exists; refusing to overwrite it "
                              "(pass --output with another folder)")
    return output


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_request:
        return exit_request.code if isinstance(exit_request.code, int) else 2
    try:
        output = _check(args)
        device = resolve_device(args.device)
        config, model = load_run(args.run, device)
        features = labelled_features(model, config, device, data_dir=args.data_dir, workers=args.workers)
        result = dimension_analysis(*features, model.mask().detach(), k=config.knn_k,
                                    temperature=config.knn_temperature, draws=args.draws, seed=args.seed)
    except ConfigError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    from metamask_fast.plots import write_plots

    result.update(run=str(args.run), dataset=config.dataset, method=config.method,
                  seconds=time.perf_counter() - started)
    try:
        write_plots(output, [{"epoch": 0}], dims=result)
        (output / "dims.json").write_text(json.dumps(result, indent=2) + "\n")
    except OSError as error:
        print(f"{PROG}: error: argument --output: cannot write into {str(output)!r}: {error.strerror or error}",
              file=sys.stderr)
        return 2
    best = max(range(len(result["dims"])), key=lambda i: result["highest"][i] - result["lowest"][i])
    n = result["dims"][best]
    print(f"kNN top-1 on {n} of {max(result['dims'])} dimensions: highest mask values "
          f"{100 * result['highest'][best]:.2f}%, lowest {100 * result['lowest'][best]:.2f}%, random "
          f"{100 * result['random'][best]:.2f}%; all {100 * result['all']:.2f}%  -> {output / 'dims.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
