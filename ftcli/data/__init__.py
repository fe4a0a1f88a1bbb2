"""The data stage: ``read`` (sources and formats), ``examples`` (layouts, cleaning, splits, the
run's data/ folder) and ``tokenize`` (features, chat rendering, collate). Import from those."""
