"""Write the summary of a multirun folder: `python -m mame_lightning.sweep outputs/multirun/<name>`.

`sweep_summary.{csv,md,json}` from the records its jobs left (`runs/multirun.py`); jobs that never
recorded an end are listed as such. Multiruns write it themselves when their last job ends.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from mame_lightning.runs.multirun import RECORDS, read_records, rows_to_markdown, write_summary

    parser = argparse.ArgumentParser(
        prog="python -m mame_lightning.sweep",
        description="Write sweep_summary.{csv,md,json} for a multirun folder (outputs/multirun/<name>) from the "
                    "records its jobs left; jobs that never recorded an end are listed as such.")
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder (hydra.sweep.dir)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"error: {args.sweep_dir} is not a folder", file=sys.stderr)
        return 2
    if not read_records(args.sweep_dir):
        print(f"error: {args.sweep_dir} holds no multirun jobs (no {RECORDS}/jobs/*.json, no */.hydra/overrides.yaml)",
              file=sys.stderr)
        return 2
    rows = write_summary(args.sweep_dir)
    print(f"Sweep summary ({len(rows)} runs): {args.sweep_dir / 'sweep_summary.md'}")
    print(rows_to_markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
