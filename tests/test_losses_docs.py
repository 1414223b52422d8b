"""Every public loss documents a runnable example, and the examples run."""

import doctest
import inspect

import pytest

from contrastive_jax import losses as L

LOSSES = [n for n in L.__all__ if n.endswith("_loss") or n in ("nt_xent", "infonce")]


@pytest.mark.parametrize("name", LOSSES)
def test_docstring_example_runs(name):
  fn = getattr(L, name)
  assert "Examples:" in (fn.__doc__ or ""), f"{name} has no Examples: section"
  module = inspect.getmodule(fn)
  tests = [t for t in doctest.DocTestFinder().find(fn, name, module=module, globs={})
           if t.examples]
  assert tests, name
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
  for t in tests:
    runner.run(t)
  result = runner.summarize(verbose=False)
  assert result.attempted > 0 and result.failed == 0, f"{name}: {result}"


@pytest.mark.parametrize("name", LOSSES + ["decomposable_loss"])
def test_docstring_names_its_paper(name):
  assert "References:" in (getattr(L, name).__doc__ or ""), f"{name} has no References: section"
