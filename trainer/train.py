"""Train a ViT from a recipe.

    accelerate launch trainer/train.py --recipe recipes/vit_b.yaml [--set key=value ...]
        [--output DIR] [--resume auto|PATH]
    python trainer/train.py --recipe recipes/demo_digits.yaml          # one process
    python trainer/train.py --recipe recipes/vit_b.yaml --print-recipe # resolved recipe, no training
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python trainer/train.py` from a checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.cli import add_recipe_arguments, exit_on_user_error, load_recipe_from_args
from trainer.recipe import dump_recipe


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(p)
    p.add_argument("--output", metavar="DIR", help="run directory (default: train.output_dir or runs/<recipe>)")
    p.add_argument("--resume", metavar="auto|PATH", help="resume from the newest checkpoint (auto) or PATH")
    p.add_argument("--print-recipe", action="store_true", help="print the resolved recipe and exit")
    return p.parse_args(argv)


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    recipe = load_recipe_from_args(args)
    if args.print_recipe:
        print(dump_recipe(recipe, header=f"resolved from {args.recipe}"), end="")
        return
    raise SystemExit("training loop not implemented yet")  # filled in by the trainer issue


if __name__ == "__main__":
    main()
