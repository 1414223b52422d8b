"""The one registry of the library's losses: name -> how a trainer calls it.

A trainer reads a loss name, a temperature and that loss's options from its
config. The options and their defaults are the loss function's own keyword
arguments (plus the few defaults a trainer should use instead, given here), so a
new loss is added with one line in `LOSSES` and nowhere else.

  loss_fn, state = registry.make("gamma", {"eps_shape": 4.0}, num_examples=N)
  loss, state = loss_fn(a, b, state, index, key, temperature=0.1, axis_name="data")

Every made loss has that one signature, whatever the function underneath takes:
stateless losses return the state they were given; losses of augmented views
(`l_con`) read `a_aug` / `b_aug`.
"""

import dataclasses
import inspect
from typing import Any, Callable, Optional
import warnings

import jax

from contrastive_jax.losses import gamma
from contrastive_jax.losses import infonce
from contrastive_jax.losses import sigmoid
from contrastive_jax.losses import sogclr

# Keyword arguments that the trainer supplies per call, not options of the config.
# progress (the fraction of training done) drives the rate schedules of stateful losses.
_PER_CALL = ("temperature", "axis_name", "progress")


@dataclasses.dataclass(frozen=True)
class Entry:
  """How to call one loss function.

  fn: the pure loss function; positional (a, b[, a_aug, b_aug][, state, index][, key]).
  init_state: (num_examples, options) -> initial state; None for stateless losses.
  random: fn takes a PRNG key after the index.
  augmented: fn takes the augmented views a_aug, b_aug after a, b.
  defaults: option defaults a trainer uses instead of the function's own.
  """
  fn: Callable
  init_state: Optional[Callable] = None
  random: bool = False
  augmented: bool = False
  defaults: dict = dataclasses.field(default_factory=dict)

  @property
  def stateful(self) -> bool:
    return self.init_state is not None


_gamma_state = lambda n, o: gamma.init_gamma_state(n, o["estimator"])

LOSSES: dict[str, Entry] = {
    "nt_xent": Entry(infonce.nt_xent),
    "dcl": Entry(infonce.dcl_loss),
    "clip": Entry(infonce.clip_loss),
    "l_con": Entry(infonce.modality_contrastive_loss, augmented=True),
    "sigmoid": Entry(sigmoid.sigmoid_loss, defaults={"bias": -5.0}),  # -1/(2 t) at t = 0.1
    "sogclr": Entry(sogclr.sogclr_loss, init_state=lambda n, o: sogclr.init_sogclr_state(
        n, shared=o["shared_state"])),
    # Their defaults (rate 0.5; eps = 1 for two views, shape 1 for gamma_clip) are the
    # functions' own: see gamma.gamma_loss. configs/captions_gamma.py sets gamma_clip's
    # measured best (eps = 1, update_first).
    "gamma": Entry(gamma.gamma_loss, init_state=_gamma_state, random=True),
    "gamma_clip": Entry(gamma.gamma_clip_loss, init_state=_gamma_state, random=True),
}


def get(name: str) -> Entry:
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}: set --config.loss to one of {', '.join(LOSSES)}")
  return LOSSES[name]


def options(name: str) -> dict:
  """{option: default} of a loss: its keyword-only arguments, trainer defaults applied."""
  entry = get(name)
  params = inspect.signature(entry.fn).parameters.values()
  opts = {p.name: p.default for p in params
          if p.kind is p.KEYWORD_ONLY and p.name not in _PER_CALL}
  opts.update(entry.defaults)
  missing = [k for k, v in opts.items() if v is inspect.Parameter.empty]
  if missing:  # a new loss with a required option needs a default in its Entry
    raise TypeError(f"loss {name!r}: give a default for {missing} in registry.LOSSES")
  return opts


def renamed_options() -> dict:
  """{loss: {old option name: new}} of the options renamed in 0.2 (`common.renamed`): the old
  names still work for one release, with a warning, in configs and stored config.json."""
  return {name: dict(getattr(e.fn, "renamed", {})) for name, e in LOSSES.items()
          if getattr(e.fn, "renamed", None)}


def renamed_config_fields() -> dict:
  """{old dotted config field: new} of the renamed options (`loss_options.LOSS.OPTION`, as
  a stored config.json of an earlier release still names them)."""
  return {f"loss_options.{loss}.{old}": f"loss_options.{loss}.{new}"
          for loss, names in renamed_options().items() for old, new in names.items()}


def upgrade_options(name: str, opts: Optional[dict]) -> dict:
  """opts with the loss's renamed options under their new names (a DeprecationWarning
  for each old one)."""
  opts = dict(opts or {})
  for old, new in renamed_options().get(name, {}).items():
    if old in opts and new not in opts:
      warnings.warn(f"loss {name!r}: option {old!r} is now {new!r} ({old!r} will be removed "
                    "in the next release)", DeprecationWarning, stacklevel=3)
      opts[new] = opts.pop(old)
  return opts


def all_options() -> dict:
  """{loss name: {option: default}} for the losses that have options (for configs)."""
  return {name: options(name) for name in LOSSES if options(name)}


def make(name: str, opts: Optional[dict] = None,
         num_examples: Optional[int] = None) -> tuple[Callable, Any]:
  """(loss_fn, initial state) of loss `name` with `opts` over its defaults.

  ``loss_fn(a, b, state, index, key, *, temperature, axis_name=None, progress=None,
  a_aug=None, b_aug=None) -> (scalar loss, new state)``; a, b [B, D] raw embeddings;
  progress, the fraction of training done, reaches the losses that schedule a rate.
  """
  entry = get(name)
  bound = options(name)
  opts = upgrade_options(name, opts)
  unknown = sorted(set(opts) - set(bound))
  if unknown:
    raise ValueError(f"loss {name!r} has no option {', '.join(unknown)}: its options are "
                     f"{', '.join(bound) or 'none'}")
  bound.update(opts)
  scheduled = "progress" in inspect.signature(entry.fn).parameters

  def loss_fn(a: jax.Array, b: jax.Array, state: Any, index: Optional[jax.Array],
              key: Optional[jax.Array], *, temperature, axis_name=None, progress=None,
              a_aug: Optional[jax.Array] = None, b_aug: Optional[jax.Array] = None):
    args = [a, b]
    if entry.augmented:
      if a_aug is None or b_aug is None:
        raise ValueError(f"loss {name!r} needs augmented views of both inputs (a_aug, b_aug); "
                         "the two-view task has none: use it for image-text")
      args += [a_aug, b_aug]
    if entry.stateful:
      args += [state, index]
    if entry.random:
      args.append(key)
    extra = {"progress": progress} if scheduled else {}
    out = entry.fn(*args, temperature=temperature, axis_name=axis_name, **extra, **bound)
    return out if entry.stateful else (out, state)

  state = entry.init_state(num_examples, bound) if entry.stateful else {}
  return loss_fn, state
