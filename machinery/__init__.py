"""What a learner need not open: the command line made from main_mnist.py's block, run folders and their records,
the report at the end of a run, --compare, --find-lr, figures, and the image reading predict.py and app.py share."""


class UserError(Exception):
    """A problem the person running a script can fix (a bad setting, a damaged file, no network): said in one line,
    `error: ...`, with exit status 1."""
