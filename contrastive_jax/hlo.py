"""Cross-device collectives of a compiled XLA program, read off its HLO text.

  hlo = jax.jit(f).lower(*args).compile().as_text()
  collective_bytes(hlo)  # {"all-gather": 3072, "all-reduce": 2461960}

Proves communication claims (what a loss or a train step moves per step) in tests
and benchmarks. Async collectives count once (their -start op); tuple-shaped
(combined) collectives count every element of the tuple.
"""

import re

import numpy as np

KINDS = ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter")
_OP = re.compile(r"= (.+?) (" + "|".join(KINDS) + r")(?:-start)?\(")
_ITEM_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4,
               "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def result_bytes(result_type: str) -> int:
  """Bytes of an HLO result type: f32[32,16]{1,0}, or a tuple (f32[64]{0}, s32[8]{0})."""
  total = 0
  for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", result_type):
    total += _ITEM_BYTES.get(dtype, 4) * int(np.prod([int(d) for d in dims.split(",") if d]
                                                     or [1]))
  return total


def collectives(hlo: str) -> list[tuple[str, int]]:
  """[(kind, result bytes)] of every collective in the program, in order."""
  return [(m.group(2), result_bytes(m.group(1))) for m in _OP.finditer(hlo)]


def collective_bytes(hlo: str) -> dict:
  """{kind: summed result bytes}: what the program's collectives move per call."""
  out = {}
  for kind, n in collectives(hlo):
    out[kind] = out.get(kind, 0) + n
  return out


_MATMUL = re.compile(r"stablehlo\.(dot_general|convolution)\b.* : \(tensor<([^>]*)>, "
                     r"tensor<([^>]*)>\) -> tensor<([^>]*)>")


def matmul_dtypes(stablehlo: str) -> list[tuple[str, str, str, str]]:
  """[(op, lhs dtype, rhs dtype, result dtype)] of every dot_general and convolution of a
  lowered program (`jax.jit(f).lower(*args).as_text()`, StableHLO): the compute dtype the
  program asks for, before a backend rewrites it (XLA:CPU upcasts bfloat16 dots)."""
  dtype = lambda t: t.rsplit("x", 1)[-1]
  return [(m.group(1), dtype(m.group(2)), dtype(m.group(3)), dtype(m.group(4)))
          for m in _MATMUL.finditer(stablehlo)]
