"""Print the ratios of one benchmark run: ``python bench/report.py RESULTS.json``.

For every benchmark group, each case's median time and how many times faster it is than the group's
baseline (the case named ``authors`` or ``authors_second_order``, whichever the group has) and, where the
group has one, than ``authors_compiled``; then its ``extra_info`` (peak extra memory on CUDA).
"""

import json
import sys

BASELINES = ("authors", "authors_second_order")
SECOND_BASELINE = "authors_compiled"


def main(path: str) -> None:
    with open(path) as f:
        run = json.load(f)
    groups: dict[str, dict[str, dict]] = {}
    for bench in run["benchmarks"]:
        impl = bench["params"]["impl"]
        groups.setdefault(bench["group"], {})[impl] = bench
    print(f"machine: {run['machine_info'].get('cpu', {}).get('brand_raw', '?')}, {run['datetime']}")
    for group, cases in groups.items():
        base = next((cases[b] for b in BASELINES if b in cases), None)
        bases = [b for b in (base, cases.get(SECOND_BASELINE)) if b is not None]
        print(f"\n{group}")
        for impl, bench in cases.items():
            median = bench["stats"]["median"]
            ratios = "".join(
                f"  {base['stats']['median'] / median:6.2f}x vs {base['params']['impl']:16s}" for base in bases
            )
            extra = "".join(f"  {k}={v:.1f}" for k, v in bench.get("extra_info", {}).items())
            print(f"  {impl:28s} {median * 1e3:10.2f} ms{ratios}{extra}")


if __name__ == "__main__":
    main(sys.argv[1])
