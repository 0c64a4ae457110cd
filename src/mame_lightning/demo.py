"""`make demo`: the whole MAM-E flow on the built-in synthetic phantoms, on a CPU, in minutes.

Each stage is one of the project's own commands, printed before it runs so it can be copied:
prepare the synthetic set, fine-tune the tiny autoencoder, train tiny text-to-image on its cached
latents, train inpainting from it, then evaluation through the plain diffusers pipelines (prompt
fidelity, inpainting fidelity without paste-back, a small guidance sweep) and the full lesion flow.
The training recipes are conf/experiment/demo_{autoencoder,text2image,inpaint}.yaml, the evaluation
sizes conf/demo/full.yaml. `--quick` runs the same flow with a handful of steps (conf/demo/quick.yaml;
a smoke test, not a model that learns). The flow itself: `mame_lightning.runs.demo`.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from mame_lightning.runs.command_line import one_line_errors
    from mame_lightning.runs.demo import DemoError, load_profile, run

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="outputs/demo", help="where the demo's runs go (default outputs/demo)")
    parser.add_argument("--quick", action="store_true", help="a few steps per stage: checks the flow, learns nothing")
    parser.add_argument("--prepare-override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra override for the synthetic set, e.g. dataset.source.n=64 (repeatable)")
    args = parser.parse_args(argv)
    with one_line_errors((DemoError,)):
        run(Path(args.root), load_profile("quick" if args.quick else "full"), args.prepare_override)


if __name__ == "__main__":
    main()
