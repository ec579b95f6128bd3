"""Population training: a sweep grid trained as one batched model.

P members (one per grid point: its own seed, learning rate, weight decay, data order) share one
architecture; their weights are stacked along dim 0 (:mod:`~optimlab.population.stacked`), each
member sees exactly the batches its own run would (:mod:`~optimlab.population.data`), and one
member-wise optimizer steps them all (:mod:`~optimlab.population.loop`), a diverged member frozen
at its last finite weights. See docs/population.md.
"""

from optimlab.population.data import PopulationData
from optimlab.population.loop import MemberRecord, PopulationLoop, member_optimizer, train_population
from optimlab.population.stacked import StackedCNN, StackedMLP, StackedModel, build_member

__all__ = ["StackedCNN", "StackedMLP", "StackedModel", "build_member", "PopulationData",
           "MemberRecord", "PopulationLoop", "member_optimizer", "train_population"]
