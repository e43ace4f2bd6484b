"""What the command line reports as one line instead of a traceback.

`InputError` is every check of ours that rejects a value: a config key, a data record, a
checkpoint, an argument. It is a `ValueError`, so callers may catch it as one; a `ValueError`
that is not an `InputError` (raised inside a library, or by a bug) keeps its traceback.
"""


class InputError(ValueError):
    """A value given to the pipeline (config, data, checkpoint, argument) that it rejects; the
    message names the key, file or record and what was expected."""
