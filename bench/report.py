"""Print the ratios of one benchmark run: ``python bench/report.py RESULTS.json``.

For every benchmark group, each case's median time and how many times faster it is than the group's
baseline (the case named ``authors``, ``authors_second_order`` or ``pil_loader``, whichever the group has), where the
group has them, than ``authors_compiled``, ``faithful`` and ``barlow_twins``, and where it has ``foreach`` cases, than the fastest of them
(the best ``torch._foreach`` sequence); then its ``extra_info`` (peak extra memory on CUDA), and GB/s where
a case gives the megabytes it must move (``mbytes_moved``).
"""

import json
import sys

BASELINES = ("authors", "authors_second_order", "pil_loader")
# Further references where a group has them: torch.compile of the authors' loss; in the step groups the
# faithful mode (for the exact mode's target) and the plain Barlow Twins step (the unit of cost).
SECOND_BASELINES = ("authors_compiled", "faithful", "barlow_twins")


def main(path: str) -> None:
    with open(path) as f:
        run = json.load(f)
    groups: dict[str, dict[str, dict]] = {}
    for bench in run["benchmarks"]:
        impl = bench["params"].get("impl", bench["name"].split("[")[0].removeprefix("test_"))
        groups.setdefault(bench["group"], {})[impl] = bench
    print(f"machine: {run['machine_info'].get('cpu', {}).get('brand_raw', '?')}, {run['datetime']}")
    for group, cases in groups.items():
        base = next((cases[b] for b in BASELINES if b in cases), None)
        foreach = [bench for impl, bench in cases.items() if impl.startswith("foreach")]
        best_foreach = min(foreach, key=lambda bench: bench["stats"]["median"]) if foreach else None
        bases = [b for b in (base, *(cases.get(name) for name in SECOND_BASELINES), best_foreach) if b is not None]
        print(f"\n{group}")
        for impl, bench in cases.items():
            median = bench["stats"]["median"]
            ratios = "".join(
                f"  {base['stats']['median'] / median:6.2f}x vs {base['params']['impl']:16s}" for base in bases
            )
            info = bench.get("extra_info", {})
            extra = "".join(f"  {k}={v:.3g}" if isinstance(v, float) and abs(v) < 10 else f"  {k}={v:.1f}"
                            for k, v in info.items())
            if "mbytes_moved" in info:
                extra += f"  {info['mbytes_moved'] / 1e3 / median:.1f} GB/s"
            print(f"  {impl:28s} {median * 1e3:10.2f} ms{ratios}{extra}")


if __name__ == "__main__":
    main(sys.argv[1])
