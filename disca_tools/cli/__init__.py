"""One module per tool: an options dataclass, validation, ``main()``; nothing else."""
