"""The ``megatron-cla`` command (also ``python -m megatron_cla``): one module per subcommand.

Each module parses its command's arguments and calls library functions from the areas
(:mod:`megatron_cla.training`, :mod:`megatron_cla.inference`, :mod:`megatron_cla.serving`,
:mod:`megatron_cla.conversion`, :mod:`megatron_cla.data`, :mod:`megatron_cla.experiments`);
no library module imports from here. :mod:`megatron_cla.cli.main` dispatches,
:mod:`megatron_cla.cli.common` holds the list of commands and their quiet start and one-line
errors.
"""
