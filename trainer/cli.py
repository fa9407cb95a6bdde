"""What every depthlab entry point shares: user errors become one line on stderr and exit code 2,
and the --recipe / --set arguments."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from models.errors import UserError
from trainer.recipe import load_recipe

USAGE_ERROR_EXIT_CODE = 2


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for `main()`: a `UserError` (or a missing file or folder) prints `error: ...` and exits 2,
    without a traceback."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except (UserError, FileNotFoundError, NotADirectoryError) as e:
            message = str(e)
            if isinstance(e, (FileNotFoundError, NotADirectoryError)) and e.filename:
                message = f"{e.strerror or 'not found'}: {e.filename}"
            # Under a launcher every process raises the same error at set-up: the first one says it. An error
            # met while training (a corrupt image in one shard) may be one process's alone: each says its own.
            rank = int(os.environ.get("RANK", "0"))
            if rank == 0 or getattr(e, "raised_in_training", False):
                print(f"error: {f'[rank {rank}] ' if rank else ''}{message}", file=sys.stderr)
            sys.exit(USAGE_ERROR_EXIT_CODE)

    return wrapper


def add_recipe_arguments(parser: Any, required: bool = True) -> None:
    parser.add_argument("--recipe", required=required, metavar="YAML", help="recipe file (see recipes/)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="override recipe keys, e.g. --set optim.lr=5e-4 variant.kind=grouped_mlp")


def load_recipe_from_args(args: Any) -> Any:
    return load_recipe(args.recipe, args.overrides)
