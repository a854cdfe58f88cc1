"""xxpo: the policy-optimization family behind LLM post-training, as readable, tested PyTorch.

Layers (imports point down): ``xxpo.functional`` <- ``xxpo.objectives`` <- the engine
(``xxpo.tasks``, ``xxpo.models``, ``xxpo.rollout``, ``xxpo.train``).
"""

__version__ = "0.1.0"
