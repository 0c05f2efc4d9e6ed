"""Configs shared by the infrastructure tests (a nested Config with a tuple field)."""

from researchlab.design.core import Config


class Optim(Config):
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


class Cfg(Config):
    seed: int = 0
    optim: Optim = Optim()
