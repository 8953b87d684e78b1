"""``rmiot dataset generate``: build the benchmark district (see
``query.dataset``) in a database of its own, with a progress bar on stderr;
prints what was built (or found already built) as one JSON object.

Exit codes follow ``rmiot``: 0 done, 1 failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import orjson

from rmiot.config import Config
from rmiot.query import dataset


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``dataset`` to rmiot's sub-parsers."""
    text = "a realistic district's devices and data, for benchmarks and demonstrations"
    parser: argparse.ArgumentParser = subparsers.add_parser("dataset", help=text,
                                                            description=text)
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    generate = actions.add_parser(
        "generate", help="build it (kept when the same dataset is already there)")
    spec = dataset.DatasetSpec()
    generate.add_argument("--hospitals", type=int, default=spec.hospitals)
    generate.add_argument("--devices", type=int, default=spec.devices)
    generate.add_argument("--days", type=int, default=spec.days)
    generate.add_argument("--database", default=dataset.DEFAULT_DATABASE,
                          help=f"the database to build it in (default {dataset.DEFAULT_DATABASE}"
                               "; dropped and re-created)")
    generate.add_argument("--force", action="store_true", help="rebuild even if present")
    return parser


def main(cfg: Config, args: argparse.Namespace) -> int:
    if args.hospitals < 1 or args.devices < args.hospitals or args.days < 1:
        print("rmiot: need at least one hospital, one device per hospital and one day")
        return 2
    spec = dataset.DatasetSpec(args.hospitals, args.devices, args.days)
    info = dataset.generate(dataset.configured(cfg, args.database), spec, force=args.force,
                            progress=dataset.ProgressBar())
    print(orjson.dumps({**dataclasses.asdict(info), "database": args.database},
                       default=str).decode())
    return 0
