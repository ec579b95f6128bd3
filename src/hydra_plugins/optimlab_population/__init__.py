"""optimlab's Hydra launcher plugin: ``python train.py -m hydra/launcher=population <sweep>`` trains
the sweep's compatible jobs as populations (one batched model per group); see docs/population.md."""
