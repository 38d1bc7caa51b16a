"""`python -m jaxllm COMMAND [flags]`: the `jaxllm` command (`jaxllm.cli.main`)."""

from jaxllm.cli.main import main

main()
