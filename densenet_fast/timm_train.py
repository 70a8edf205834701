"""Run timm's ``train.py`` (or any script) with the fused DenseNets registered in timm.

timm's ``train.py`` builds its model with ``timm.create_model(args.model)`` and has no plugin
hook, so the fused names (:mod:`densenet_fast.timm`) must be registered in its process
before it runs; this launcher does that and runs the script as ``python script.py`` would::

    python -m densenet_fast.timm_train train.py --model densenet121_fast [train.py's arguments]
    torchrun --nproc_per_node=8 -m densenet_fast.timm_train train.py --model densenet121_fast ...
"""

from __future__ import annotations

import os
import runpy
import sys

USAGE = ("usage: python -m densenet_fast.timm_train SCRIPT [ARGS...]\n"
         "runs SCRIPT (timm's train.py) with ARGS, densenet_fast's fused DenseNets registered "
         "in timm (densenet121_fast, densenet169_fast, densenet201_fast, densenet161_fast, "
         "densenet264d_fast, densenetblur121d_fast)")


def main(argv: list[str] | None = None) -> None:
    """Register the fused models, then run ``argv[0]`` as ``__main__`` with ``argv[1:]`` as
    its arguments and its directory first on ``sys.path``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if argv else 2)
    script = argv[0]
    if not os.path.isfile(script):
        print(f"densenet_fast.timm_train: no script at {script!r}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    from . import timm  # noqa: F401  (registers the fused models)

    sys.argv = [script, *argv[1:]]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
