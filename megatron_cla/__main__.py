"""``python -m megatron_cla <command>``: the ``megatron-cla`` command (:mod:`megatron_cla.cli`)."""

from megatron_cla.cli.main import main

if __name__ == "__main__":
    main()
