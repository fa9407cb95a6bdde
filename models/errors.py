"""`UserError`: the one base class of errors caused by what a user gave depthlab.

A recipe key or value, a path, a data folder, a checkpoint, a sweep file: library code raises a
subclass with one line naming the offending key, value or file, and every entry point catches
`UserError` (trainer/cli.py) to print that line as `error: ...` and exit with code 2. It lives in
models/, the package every other one imports, so that diagnostics/ can raise it without the trainer.
"""


class UserError(ValueError):
    """Bad input from the user; the message is the whole story (no traceback is shown)."""
