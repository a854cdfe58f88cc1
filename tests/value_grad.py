"""A helper shared by the adapter and equivalence tests (a module of its own: tests/book has another conftest)."""


def value_and_grad(logp, fn):
    """(loss, d loss / d logp) of ``fn()`` (a loss, or a tuple whose first entry is one) for a leaf ``logp``."""
    logp.grad = None
    loss = fn()
    loss = loss[0] if isinstance(loss, tuple) else loss
    loss.backward()
    g = logp.grad.clone()
    logp.grad = None
    return loss.detach(), g
