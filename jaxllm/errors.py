"""`UserError`: the base of every error that is the user's input (a config, a file, a flag, a
checkpoint or adapter that does not fit), not a bug. Commands print it as one line and exit 2
(`jaxllm.cli.common.one_line_errors`); library callers can catch it in one place. Each layer
subclasses it beside the code that raises (`config.ConfigError`, `data.corpus.CorpusError`,
`checkpoint.orbax.CheckpointError`, ...), keeping the builtin type it had (ValueError or
RuntimeError) for callers that catch those.

Imports nothing, so every layer may import it.
"""


class UserError(Exception):
  """Bad input, stated in one line by its message."""
